"""The benchmark suite: argument parsing, case scaling, result schema, a tiny run.

Timings are never asserted (they depend on the machine); values that must hold on
any machine are: which contenders ran or were skipped, the ratios of the baseline
to itself, and the errors against the float32 reference.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

# `benchmarks/` lives at the repository root, next to `tests/`, and is not installed.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import (  # noqa: E402
    cli,
    contenders,
    plots,
    real_shapes,
    report,
    runner,
    shapes,
    standard,
)

# ---- argument parsing --------------------------------------------------------------------


def test_parse_defaults():
    args = cli.parse_args([])
    assert args.suite == "quick"
    assert args.shapes is None
    assert args.impls is None
    assert args.dtype is None
    assert args.tokens is None
    assert args.out is None
    assert not args.no_plots


def test_parse_every_option(tmp_path):
    args = cli.parse_args(
        [
            "--suite",
            "full",
            "--shapes",
            "gpt2",
            "vocab_sweep",
            "--impls",
            "xla_gif",
            "jax_cce",
            "--dtype",
            "bfloat16",
            "--tokens",
            "128",
            "--reps",
            "2",
            "--standard-shape",
            "8",
            "64",
            "--out",
            str(tmp_path),
            "--no-plots",
            "--no-standard-losses",
            "--quiet",
        ]
    )
    assert args.suite == "full"
    assert args.shapes == ["gpt2", "vocab_sweep"]
    assert args.impls == ["xla_gif", "jax_cce"]
    assert args.dtype == "bfloat16"
    assert (args.tokens, args.reps, args.standard_shape) == (128, 2, [8, 64])
    assert args.out == tmp_path
    assert args.no_plots and args.no_standard_losses and args.quiet


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--suite", "huge"], "invalid choice: 'huge'"),
        (["--shapes", "gpt5"], "invalid choice: 'gpt5'"),
        (["--impls", "cuda_magic"], "invalid choice: 'cuda_magic'"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
        (["--tokens", "0"], "expected a positive integer, got '0'"),
        (["--reps", "two"], "expected a positive integer, got 'two'"),
    ],
)
def test_parse_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--suite", "--shapes", "--impls", "--dtype", "--tokens", "--out", "--no-plots"):
        assert option in text
    for option in ("--real-shapes", "--real-tokens", "--no-real-shapes", "--no-heads"):
        assert option in text
    for name in (*shapes.DEFAULT_MODELS, *shapes.SERIES, *contenders.CONTENDERS):
        assert name in text


@pytest.mark.parametrize(
    ("kind", "slug"),
    [
        ("cpu", "cpu"),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("TPU v5 lite", "tpu-v5-lite"),
    ],
)
def test_device_kind_slug(kind, slug):
    assert cli.slugify(kind) == slug


# ---- shapes and contenders ---------------------------------------------------------------


def test_model_shapes_are_the_published_heads():
    heads = {n: (s.d, s.v, s.softcap) for n, s in shapes.MODEL_SHAPES.items()}
    assert heads["gpt2"] == (768, 50257, None)
    assert heads["llama3-8b"] == (4096, 128256, None)
    assert heads["gemma2-2b"] == (2304, 256000, 30.0)
    assert heads["qwen2.5-7b"] == (3584, 152064, None)


def test_quick_cpu_scales_big_heads_and_says_so():
    cases = {c.name: c for c in shapes.build_cases(None, "quick", "cpu")}
    for name in shapes.DEFAULT_MODELS:
        real, case = shapes.MODEL_SHAPES[name], cases[name]
        assert case.v == real.v and case.d <= real.d
        assert (case.note == "") == (case.d == real.d)
    assert "4096->" in cases["llama3-8b"].note
    assert cases["gemma2-2b"].softcap == 30.0
    assert {c.group for c in cases.values()} == {"models", "vocab_sweep", "token_sweep"}
    assert all(c.modes == ("fwd_bwd",) for c in cases.values() if c.group != "models")


def test_full_gpu_runs_real_heads_at_8192_tokens():
    cases = shapes.build_cases(list(shapes.DEFAULT_MODELS), "full", "gpu")
    assert [(c.n, c.d, c.v) for c in cases] == [
        (8192, s.d, s.v) for s in (shapes.MODEL_SHAPES[n] for n in shapes.DEFAULT_MODELS)
    ]
    assert all(c.note == "" for c in cases)


def test_tokens_override_and_unknown_shape():
    (case,) = shapes.build_cases(["tiny"], "quick", "cpu", tokens=48)
    assert (case.n, case.d, case.v) == (48, 64, 1000)
    assert case.flops_fwd_bwd == 3 * case.flops_fwd == 6 * 48 * 64 * 1000
    with pytest.raises(ValueError, match=r"unknown shape\(s\) \['gpt5'\]"):
        shapes.build_cases(["gpt5"], "quick", "cpu")


def test_select_always_adds_the_baseline_first():
    names = [c.name for c in contenders.select(["xla_gif", "xla_gif"])]
    assert names == [contenders.BASELINE, "xla_gif"]
    with pytest.raises(ValueError, match="unknown contender"):
        contenders.select(["nope"])


# ---- report pieces -----------------------------------------------------------------------


def test_fill_ratios_against_the_baseline_of_the_same_case_and_mode():
    case = shapes.Case("c", "models", "m", 4, 8, 16)
    recs = []
    for name, t, temp in (("optax", 2.0, 100), ("xla_gif", 1.0, 25)):
        r = runner.empty_record(case, name, "fwd", "float32")
        r.update(status="ok", time_s=t, temp_bytes=temp)
        recs.append(r)
    skipped = runner.empty_record(case, "jax_cce", "fwd", "float32")
    runner.fill_ratios([*recs, skipped])
    assert [(r["time_ratio"], r["temp_ratio"]) for r in recs] == [(1.0, 1.0), (0.5, 0.25)]
    assert skipped["time_ratio"] is None


def test_json_keeps_non_finite_numbers_visible(tmp_path):
    path = tmp_path / "r.json"
    report.write_json({"err": math.nan, "x": [1.0, math.inf]}, path)
    assert json.loads(path.read_text()) == {"err": "nan", "x": [1.0, "inf"]}


def test_plots_are_written(tmp_path):
    results = []
    for group, key, values in (("vocab_sweep", "v", (64, 128)), ("token_sweep", "n", (8, 16))):
        for value in values:
            base = {"n": 8, "d": 4, "v": 64} | {key: value}
            case = shapes.Case(f"{group}/{value}", group, "sweep", base["n"], 4, base["v"])
            for name, scale in (("optax", 2.0), ("xla_gif", 1.0)):
                r = runner.empty_record(case, name, "fwd_bwd", "float32")
                r.update(status="ok", time_s=scale * value, temp_bytes=int(scale * 1024 * value))
                results.append(r)
    doc = {"meta": {"dtype": "float32", "device_kind": "cpu", "jax_version": "x"}}
    doc["results"] = results
    written = plots.write_plots(doc, tmp_path)
    assert written == ["vocab_sweep.png", "token_sweep.png"]
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- a tiny suite end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--shapes",
        "tiny",
        "--tokens",
        "32",
        "--reps",
        "1",
        # Third-party contenders may warn or break strict promotion; they are left out.
        "--impls",
        "reference",
        "xla_gif",
        "xla_recompute",
        "pallas_gpu",
        # The compiled-temporaries table on the tiny head (the real ones compile for
        # a second each; they are not needed to test the table).
        "--real-shapes",
        "tiny",
        "--real-tokens",
        "16",
        "--out",
        str(out),
        "--no-plots",
        "--no-standard-losses",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_tiny_run_writes_schema_complete_json(tiny_run):
    _, doc = tiny_run
    assert tuple(doc) == report.DOCUMENT_KEYS
    assert doc["schema_version"] == report.SCHEMA_VERSION
    assert set(doc["meta"]) == set(report.META_KEYS)
    assert doc["meta"]["device_kind"] and doc["meta"]["jax_version"]
    assert doc["meta"]["contenders"] == [
        "optax",
        "reference",
        "xla_gif",
        "xla_recompute",
        "pallas_gpu",
    ]
    assert doc["meta"]["matmul_peak"]["tflops"] > 0
    assert [(c["name"], c["n"], c["d"], c["v"]) for c in doc["cases"]] == [("tiny", 32, 64, 1000)]
    for r in doc["results"]:
        assert tuple(r) == runner.RESULT_KEYS
    assert doc["standard_losses"] == []


def test_tiny_run_measures_and_skips(tiny_run):
    _, doc = tiny_run
    by = {(r["contender"], r["mode"]): r for r in doc["results"]}
    assert len(by) == 5 * 2
    for name in ("optax", "reference", "xla_gif", "xla_recompute"):
        for mode in ("fwd", "fwd_bwd"):
            r = by[(name, mode)]
            assert r["status"] == "ok", r["reason"]
            assert r["time_s"] > 0 and len(r["times_s"]) == 1
            assert r["temp_bytes"] is not None
            assert r["flops"] == (2 if mode == "fwd" else 6) * 32 * 64 * 1000
            # float32 contenders agree with the float32 highest-precision reference.
            errs = [r["err_loss"]] + ([r["err_dx"], r["err_dw"]] if mode == "fwd_bwd" else [])
            assert max(errs) < 1e-4, (name, mode, errs)
    assert by[("optax", "fwd_bwd")]["time_ratio"] == 1.0
    assert by[("optax", "fwd_bwd")]["temp_ratio"] == 1.0
    skipped = by[("pallas_gpu", "fwd")]
    if doc["meta"]["platform"] != "gpu":
        assert skipped["status"] == "skipped"
        assert "needs a GPU backend" in skipped["reason"]


def test_tiny_run_compiles_the_real_shape_table(tiny_run):
    _, doc = tiny_run
    by = {r["contender"]: r for r in doc["real_shapes"]}
    assert list(by) == real_shapes.contender_names()
    assert all((r["case"], r["n"], r["d"], r["v"]) == ("tiny", 16, 64, 1000) for r in by.values())
    for name in ("optax", "reference", "xla_gif", "xla_recompute", "default", "log_probs"):
        assert by[name]["status"] == "ok", by[name]["reason"]
    for head in ("log_probs", "topk_distill"):
        fused, materialized = by[head], by[head + "_materialized"]
        assert fused["status"] == materialized["status"] == "ok"
        # Logits this small fit one block: the default computes them at once (no regret).
        assert fused["temp_bytes"] <= materialized["temp_bytes"]
    assert by["xla_recompute"]["temp_bytes"] < by["optax"]["temp_bytes"]
    if doc["meta"]["platform"] != "gpu":
        assert by["pallas_gpu"]["status"] == "skipped"
    header, rows = real_shapes.table(doc["real_shapes"])
    assert header == ["contender", "tiny (64x1000)"]
    assert rows[0] == ["optax", real_shapes.fmt_bytes(by["optax"]["temp_bytes"])]


def test_tiny_run_times_the_heads_against_materialized(tiny_run):
    _, doc = tiny_run
    by = {r["head"]: r for r in doc["heads"]}
    assert list(by) == [
        "log_probs_materialized",
        "log_probs",
        "topk_distill_materialized",
        "topk_distill",
    ]
    for head in ("log_probs", "topk_distill"):
        r = by[head]
        assert r["status"] == "ok", r["reason"]
        # At a tiny shape the fused heads compute the logits at once: equal temporaries.
        assert r["time_s"] > 0 and r["time_ratio"] > 0 and r["temp_ratio"] <= 1
        assert r["err_loss"] < 1e-4


def test_standard_losses_against_optax():
    name = "softmax_cross_entropy_with_integer_labels"
    recs = standard.run_standard(8, 64, jnp.float32, reps=1, max_seconds=1.0, names=[name])
    assert [(r["loss"], r["impl"]) for r in recs] == [(name, "optax"), (name, "fusedloss")]
    for r in recs:
        assert tuple(r) == standard.STANDARD_KEYS
        assert r["status"] == "ok", r["reason"]
        assert (r["n"], r["v"], r["dtype"]) == (8, 64, "float32")
        assert r["err_loss"] < 1e-5 and r["err_grad"] < 1e-5
    assert recs[0]["time_ratio"] == 1.0


def test_tiny_run_writes_markdown(tiny_run):
    out, _ = tiny_run
    text = (out / "results.md").read_text()
    assert text.index("## Compiled temporaries at the real heads") < text.index("## Model heads")
    assert "compiled, not run" in text and "| log_probs_materialized |" in text
    assert "## Model heads" in text
    assert "| case | contender | mode | time (ms) |" in text
    assert "| tiny | xla_gif | fwd_bwd |" in text
    assert "pallas_gpu (tiny): " in text or "| tiny | pallas_gpu |" in text


@pytest.mark.parametrize("tied", [False, True])
def test_xla_ratios_script_runs(capsys, tied):
    from benchmarks import xla_ratios

    argv = ["--tokens", "40", "--d", "16", "--vocab", "300", "--reps", "2"]
    ratios = xla_ratios.main(argv + (["--tied"] if tied else []))
    assert set(ratios) == {"materialized", "grad_in_forward", "recompute"}
    assert ratios["materialized"] == 1.0
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    out = capsys.readouterr().out
    assert "N=40 D=16 V=300 float32" in out and ("embedding.T" in out) == tied


def test_ratios_is_a_mode_of_the_suite(capsys):
    argv = ["ratios", "--tokens", "24", "--d", "8", "--vocab", "200", "--reps", "1"]
    assert cli.main(argv) == 0
    assert "N=24 D=8 V=200 float32" in capsys.readouterr().out
