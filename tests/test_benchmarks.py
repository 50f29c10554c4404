"""The benchmark suite: options, case scaling, the heads table, a tiny run of each mode.

Timings are never asserted (they depend on the machine); what must hold anywhere is
which contenders ran or were skipped and why, the ratios of a baseline to itself,
the errors against the float32 reference and the error budget.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import pytest

# `benchmarks/` lives at the repository root, next to `tests/`, and is not installed.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import cases, cli, contenders, report, suite, targets  # noqa: E402

# ---- options ----------------------------------------------------------------------------


def test_parse_defaults_and_help(capsys):
    args = cli.build_parser().parse_args([])
    assert (args.suite, args.shapes, args.impls, args.dtype, args.out) == ("quick",) + (None,) * 4
    assert args.real_tokens == 8192 and not args.no_targets
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--real-shapes", "--no-targets", "ratios", "gpu-check", "targets", "H100"):
        assert word in text
    for name in (*cases.DEFAULT_MODELS, *cases.SERIES, *contenders.CONTENDERS):
        assert name in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--suite", "huge"], "invalid choice: 'huge'"),
        (["--shapes", "gpt5"], "invalid choice: 'gpt5'"),
        (["--impls", "cuda_magic"], "invalid choice: 'cuda_magic'"),
        (["--tokens", "0"], "expected a positive integer, got '0'"),
        (["--reps", "two"], "expected a positive integer, got 'two'"),
    ],
)
def test_parse_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_device_kind_slug():
    assert cli.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert cli.slugify("TPU v5 lite") == "tpu-v5-lite"


# ---- cases and the heads table -----------------------------------------------------------


def test_model_shapes_are_the_published_heads():
    heads = {n: (s.d, s.v, s.softcap) for n, s in cases.MODEL_SHAPES.items()}
    assert heads["gpt2"] == (768, 50257, None)
    assert heads["llama3-8b"] == (4096, 128256, None)
    assert heads["gemma2-2b"] == (2304, 256000, 30.0)
    assert heads["qwen2.5-7b"] == (3584, 152064, None)


def test_quick_cpu_scales_big_heads_and_says_so_full_gpu_does_not():
    quick = {c.name: c for c in cases.build_cases(None, "quick", "cpu")}
    for name in cases.DEFAULT_MODELS:
        real, case = cases.MODEL_SHAPES[name], quick[name]
        assert case.v == real.v and case.d <= real.d and (case.note == "") == (case.d == real.d)
    assert "4096->" in quick["llama3-8b"].note
    assert all(c.modes == ("fwd_bwd",) for c in quick.values() if c.group != "models")
    full = cases.build_cases(list(cases.DEFAULT_MODELS), "full", "gpu")
    assert [(c.n, c.d, c.v, c.note) for c in full] == [
        (8192, s.d, s.v, "") for s in map(cases.MODEL_SHAPES.get, cases.DEFAULT_MODELS)
    ]
    with pytest.raises(ValueError, match="unknown shape 'gpt5'"):
        cases.build_cases(["gpt5"], "quick", "cpu")


def test_every_head_has_a_materialized_baseline_first_and_unique_rows():
    names = [c.name for h in contenders.HEADS.values() for c in h.rows]
    assert len(names) == len(set(names)) == len(contenders.ROWS)
    assert contenders.HEADS["cross_entropy"].baseline == "optax"
    for name, head in contenders.HEADS.items():
        if name != "cross_entropy":
            assert [c.name for c in head.rows] == [f"{name}_materialized", name]
    # The compile-only targets time nothing and only use rows that exist.
    assert {r for rows in targets.ROWS.values() for r in rows} <= set(contenders.ROWS)


def test_inputs_without_a_seed_are_shapes_only():
    case = cases.Case("c", "models", 8, 16, 1000)
    x, w, ids, t_lp = contenders.inputs(case, contenders.HEADS["topk_distill"], "bfloat16", None)
    assert (x.shape, w.shape, ids.shape, t_lp.shape) == ((8, 16), (16, 1000), (8, 64), (8, 64))
    _, _, ids, t_lp = contenders.inputs(case, contenders.HEADS["topk_distill"], "float32")
    assert all(len(set(row)) == 64 for row in ids.tolist())  # distinct teacher ids
    assert 0.89 < float(sum(math.exp(v) for v in t_lp[0].tolist())) < 0.91


def test_compiled_table_ratios_and_reasons():
    def rec(case, name, temp, status="ok", reason=""):
        head = contenders.ROWS[name][0].name
        r = dict.fromkeys(suite.RESULT_KEYS) | {"case": case, "head": head, "mode": "fwd_bwd"}
        r.update(contender=name, d=4, v=8, softcap=None, temp_bytes=temp, err_loss=None)
        return r | {"status": status, "reason": reason}

    recs = [
        rec("a", "optax", None, "skipped", "optax not installed (ModuleNotFoundError: x)"),
        rec("a", "reference", 4 * 2**30),
        rec("a", "default", 2**30),
        rec("a", "pallas_tpu", None, "skipped", "TPU only (this platform is gpu)"),
        rec("a", "log_probs_materialized", 2**20),
        rec("a", "log_probs", 2**19),
    ]
    suite.ratios(recs)  # against the first row of each head that ran: reference, materialized
    header, rows = report.compiled_table(recs)
    assert header == ["contender", "a (4x8)"]
    assert [r[1] for r in rows] == [
        "optax not installed", "4 GiB (1x)", "1 GiB (0.25x)", "TPU only", "1 MiB (1x)",
        "512 KiB (0.5x)",
    ]  # fmt: skip
    assert report.reasons(recs)[0].startswith("optax (a): optax not installed")


def test_plots_are_written(tmp_path):
    results = []
    for v in (64, 128):
        for name, scale in (("optax", 2.0), ("xla_gif", 1.0)):
            r = dict.fromkeys(suite.RESULT_KEYS)
            r.update(case=f"vocab_sweep/V={v}", group="vocab_sweep", head="cross_entropy", n=8)
            r.update(contender=name, mode="fwd_bwd", status="ok", d=4, v=v, time_s=scale * v)
            results.append(r | {"temp_bytes": int(scale * 1024 * v)})
    doc = {"meta": {"dtype": "float32", "device_kind": "cpu"}, "results": results}
    assert report.write_plots(doc, tmp_path) == ["vocab_sweep.png"]
    assert (tmp_path / "vocab_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- a tiny suite end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--shapes", "tiny", "--tokens", "32", "--reps", "1", "--standard-shape", "8", "64"]
    # Third-party contenders may warn or break strict promotion; they are left out.
    argv += ["--impls", "reference", "xla_gif", "xla_recompute", "pallas_gpu"]
    # The compiled table on the tiny head (the real ones take a second each).
    argv += ["--real-shapes", "tiny", "--real-tokens", "16", "--no-targets"]
    assert cli.main([*argv, "--out", str(out), "--no-plots", "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_tiny_run_measures_skips_and_checks_errors(tiny_run):
    _, doc = tiny_run
    assert tuple(doc) == report.DOCUMENT_KEYS and doc["meta"]["matmul_peak"]["tflops"] > 0
    assert all(tuple(r) == suite.RESULT_KEYS for r in doc["results"])
    ce = {(r["contender"], r["mode"]): r for r in doc["results"] if r["head"] == "cross_entropy"}
    assert list(dict.fromkeys(k[0] for k in ce)) == [
        "optax", "reference", "xla_gif", "xla_recompute", "pallas_gpu",
    ]  # fmt: skip
    for (name, mode), r in ce.items():
        if name == "pallas_gpu":
            assert r["status"] == "skipped" and r["reason"] == "GPU only (this platform is cpu)"
            continue
        assert r["status"] == "ok", r["reason"]
        assert r["time_s"] > 0 and len(r["times_s"]) == 1 and r["temp_bytes"] is not None
        assert r["flops"] == (2 if mode == "fwd" else 6) * 32 * 64 * 1000
        errs = [r["err_loss"]] + ([r["err_dx"], r["err_dw"]] if mode == "fwd_bwd" else [])
        assert max(errs) < 1e-5, (name, mode, errs)  # float32 agrees with the reference
        assert r["within_budget"] is (None if name == "optax" else True)
    assert ce["optax", "fwd_bwd"]["time_ratio"] == ce["optax", "fwd_bwd"]["temp_ratio"] == 1.0
    std = [r for r in doc["results"] if r["group"] == "standard"]
    assert len(std) == 2 * len(suite.STANDARD)
    assert all(r["status"] == "ok" and r["err_loss"] < 1e-5 for r in std)


def test_tiny_run_times_every_head_against_its_materialized_equivalent(tiny_run):
    _, doc = tiny_run
    by = {r["contender"]: r for r in doc["results"] if r["head"] not in ("cross_entropy",)}
    by = {k: v for k, v in by.items() if v["group"] == "models"}
    for name in (h for h in contenders.HEADS if h != "cross_entropy"):
        fused, base = by[name], by[f"{name}_materialized"]
        assert fused["status"] == base["status"] == "ok", (fused["reason"], base["reason"])
        assert base["time_ratio"] == 1.0 and fused["time_ratio"] > 0
        assert fused["err_loss"] < 1e-5 and fused["within_budget"] is True


def test_tiny_run_compiles_the_real_shape_table(tiny_run):
    out, doc = tiny_run
    by = {r["contender"]: r for r in doc["real_shapes"]}
    assert list(by) == [n for n in contenders.ROWS if n != "sharded"]
    for name in ("optax", "reference", "xla_gif", "xla_recompute", "default", "log_probs"):
        assert by[name]["status"] == "ok", by[name]["reason"]
    assert by["xla_recompute"]["temp_bytes"] < by["optax"]["temp_bytes"]
    # Logits this small fit one block: the fused heads compute them at once (no regret).
    for head in ("log_probs", "topk_distill"):
        assert by[head]["temp_bytes"] <= by[head + "_materialized"]["temp_bytes"]
    assert doc["targets"] == {"docs": [], "missing": targets.HOW}
    text = (out / "results.md").read_text()
    assert text.index("## Compiled temporaries at the real heads") < text.index("## Model heads")
    assert "| log_probs_materialized |" in text and "| tiny (32x64x1000) | xla_gif | fwd |" in text
    assert "- pallas_gpu (tiny): GPU only" in text


def _fake_interpreter(tmp_path, body):
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def test_targets_run_progress_results_and_failure(tmp_path):
    # A stand-in for the targets interpreter: what `python -m benchmarks targets`
    # prints and writes (its arguments are: -m benchmarks targets --out DIR ...).
    body = 'echo "TARGETS_PROGRESS h100: compile tiny / default"; echo noise; mkdir -p "$5/h100"\n'
    body += 'echo \'{"meta": {"target": "h100"}, "real_shapes": []}\' > "$5/h100/results.json"\n'
    seen = []
    fake = _fake_interpreter(tmp_path, body)
    wait = targets.launch(fake, tmp_path, ["tiny"], 16, seen.append, [["h100"]])
    assert wait() == ([{"meta": {"target": "h100"}, "real_shapes": []}], None)
    assert seen == ["h100: compile tiny / default"]
    failing = _fake_interpreter(tmp_path, "echo 'No module named libtpu' >&2; exit 3\n")
    docs, missing = targets.launch(failing, tmp_path, ["tiny"], 16, seen.append, [["h100"]])()
    assert docs == []  # the earlier run's table is not reported as this one's
    assert missing == "the targets run failed (exit 3): No module named libtpu"


def test_targets_interpreter_from_the_environment(monkeypatch):
    monkeypatch.setenv("FUSEDLOSS_TARGETS_PYTHON", "/opt/targets/bin/python")
    assert targets.interpreter() == "/opt/targets/bin/python"


# ---- the other modes ---------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_ratios_mode(capsys, tied):
    argv = ["--tokens", "24", "--d", "8", "--vocab", "200", "--reps", "1"]
    ratios = cli.run_ratios(argv + ["--tied"] * tied)
    assert set(ratios) == {"optax", "reference", "xla_gif", "xla_recompute"}
    assert ratios["reference"] == 1.0 and all(math.isfinite(r) and r > 0 for r in ratios.values())
    out = capsys.readouterr().out
    assert "N=24 D=8 V=200 float32" in out and ("embedding.T" in out) == tied


def test_ratios_mode_of_an_objective(capsys):
    """``--head``: the fused objective against its materialized twin (the first row)."""
    argv = ["--tokens", "24", "--d", "8", "--vocab", "200", "--reps", "1", "--head", "grpo"]
    ratios = cli.run_ratios(argv)
    assert set(ratios) == {"grpo_materialized", "grpo"} and ratios["grpo_materialized"] == 1.0
    assert "ratio to grpo_materialized" in capsys.readouterr().out


def test_gpu_check_mode_on_a_cpu(tmp_path, capsys):
    if jax.default_backend() != "gpu":
        assert cli.main(["gpu-check"]) == 2  # needs a GPU unless told otherwise
    argv = ["gpu-check", "--allow-cpu", "--cases", "tiny", "--reps", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    by = {(r["contender"], r["mode"]): r for r in doc["results"]}
    assert by["xla_recompute", "fwd_bwd"]["within_budget"] is True  # bf16, vs bf16 optax
    assert by["pallas_gpu", "fwd"]["status"] == "skipped"
    assert "every fused contender within budget" in capsys.readouterr().out
    assert "| tiny (200x64x1000) | xla_gif | fwd_bwd |" in (tmp_path / "gpu_check.md").read_text()
