"""Benchmarks fusedloss's fused LM heads against their materialized equivalents (optax for
cross-entropy) and third-party fused implementations (jax-cce, tokamax) if installed:
compiled temporaries at the REAL heads (GPT-2, Llama-3-8B, Gemma-2-2B, Qwen-2.5-7B;
N=8192) on the host and, compiled not run, for H100, A100, TPU v5e and v6e (bf16); then
timings, TFLOP/s, device peak memory and errors where this device runs them. Writes
results.json, results.md and PNGs under benchmarks/results/<device_kind or target>/."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform as py_platform
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import fusedloss
from benchmarks import cases as cs
from benchmarks import harness, report, suite, targets
from benchmarks.contenders import CONTENDERS, CROSS_ENTROPY, HEADS, ROWS, third_party_versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"

_EPILOG = f"""\
modes (the first word; `python -m benchmarks MODE --help`):
  ratios [--tied]        the xla strategies against the materialized path
  gpu-check [--quick]    the Pallas GPU kernel's error budget, time and memory
  targets --out DIR      the compile-only targets (run by their own interpreter)
shapes: {", ".join(f"{s.name} ({s.d}x{s.v})" for s in cs.MODEL_SHAPES.values())};
  series: {", ".join(cs.SERIES)}.
"""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The suite's options (``--help`` documents each)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        epilog=_EPILOG + f"cross-entropy contenders: {', '.join(CONTENDERS)} (optax: the baseline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add, many = p.add_argument, {"nargs": "+", "metavar": "NAME"}
    add("--suite", choices=cs.SUITES, default="quick", help="quick (default) or full (GPU/TPU)")
    add("--shapes", choices=(*cs.MODEL_SHAPES, *cs.SERIES), **many, help="heads/series to time")
    add("--impls", choices=tuple(CONTENDERS), **many, help="contenders to time (default: all)")
    add("--dtype", choices=("float32", "bfloat16"), help="default: float32 on CPU, else bf16")
    add("--tokens", type=_positive, metavar="N", help="tokens of the model heads and vocab sweep")
    add("--reps", type=_positive, metavar="R", help="most timed rounds (default: the suite's)")
    add("--standard-shape", type=_positive, nargs=2, metavar=("N", "V"), help="standard losses")
    add("--no-standard-losses", action="store_true", help="skip the standard losses vs optax")
    add("--no-heads", action="store_true", help="skip timing the other fused heads")
    add("--real-shapes", choices=tuple(cs.MODEL_SHAPES), **many, help="compiled-table heads")
    add("--real-tokens", type=_positive, default=8192, metavar="N", help="their tokens (8192)")
    add("--no-real-shapes", action="store_true", help="skip the compiled-temporaries tables")
    add("--no-targets", action="store_true", help="skip the compile-only GPU/TPU targets")
    add("--targets-out", type=Path, default=RESULTS_DIR, metavar="DIR", help="their directories")
    add("--out", type=Path, metavar="DIR", help="default: benchmarks/results/<device_kind>/")
    add("--no-plots", action="store_true", help="no PNG plots")
    add("--quiet", action="store_true", help="no progress bar or console tables")
    return p


def slugify(device_kind: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "unknown"


def _meta(dtype: str, command: Sequence[str], **more: Any) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "fusedloss_version": fusedloss.__version__,
        "python_version": py_platform.python_version(),
        "third_party": third_party_versions(),
        "dtype": dtype,
        "command": " ".join(["python -m benchmarks", *map(shlex.quote, command)]),
        **more,
    }


def _timed(jobs: Sequence[tuple], matmul: tuple[int, int, int], dtype: Any, **kw: Any) -> tuple:
    """``(records, matmul peak)`` of ``suite.run_head(head, cases, rows)`` for each job;
    the peak is measured before and after (a shared machine: the better one is kept)."""
    peak = harness.matmul_peak(matmul, dtype)
    results = []
    for head, head_cases, rows in jobs:
        results += suite.run_head(head, head_cases, rows, dtype=dtype, **kw)
    again = harness.matmul_peak(matmul, dtype)
    peak = max(peak, again, key=lambda p: p["tflops"])
    for r in results:
        r["peak_fraction"] = r["tflops"] and r["tflops"] / peak["tflops"]
    return results, peak


def run_suite(argv: list[str]) -> int:
    """The default mode (see ``--help``)."""
    args = build_parser().parse_args(argv)
    started, platform = time.perf_counter(), jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    cfg = cs.suite_config(args.suite, platform)
    reps = args.reps or cfg.reps
    timed = cs.build_cases(args.shapes, args.suite, platform, args.tokens)
    jobs = [(CROSS_ENTROPY, timed, args.impls or [n for n in CONTENDERS if n != "default"])]
    head_cases = [dataclasses.replace(c, modes=("fwd_bwd",)) for c in timed if c.group == "models"]
    if args.suite == "quick" and platform == "cpu":  # the two narrowest heads say enough
        head_cases = sorted(head_cases, key=lambda c: c.n * c.v)[:2]
    if not args.no_heads:
        jobs += [(h, head_cases, [r.name for r in h.rows]) for h in HEADS.values()][1:]
    real_heads = [] if args.no_real_shapes else (args.real_shapes or list(cs.DEFAULT_MODELS))
    real = [cs.model_case(h, args.real_tokens) for h in real_heads]
    real_rows = [n for n in ROWS if n != "sharded"]
    python = None if args.no_targets or not real else targets.interpreter()
    steps = len(real) * len(real_rows) + sum(len(j[1]) for j in jobs) + 1
    steps += targets.steps(len(real)) if python else 0
    out: Path = args.out or RESULTS_DIR / slugify(jax.devices()[0].device_kind)
    con = report.Console(steps, args.quiet)
    meta = _meta(dtype.name, argv, suite=args.suite, reps=reps, max_seconds=cfg.max_seconds)
    con.log(f"fusedloss benchmarks: suite={args.suite} {meta['device_kind']} {dtype.name}")
    title = f"compiled temporaries, fwd+bwd, N={args.real_tokens}"
    try:
        # The targets compile in subprocesses while the host compiles its own table.
        wait = python and targets.launch(python, args.targets_out, real_heads,
                                         args.real_tokens, con.advance)  # fmt: skip
        recs = suite.compile_table(real, real_rows, dtype=dtype, platform=platform,
                                   advance=con.advance)  # fmt: skip
        con.table(f"{title} {dtype.name} ({meta['device_kind']}; compiled, not run)",
                  report.compiled_table(recs))  # fmt: skip
        docs, missing = wait() if wait else ([], targets.HOW if real else None)
        for t in docs:
            t["meta"]["command"] = meta["command"]
            report.write(t, args.targets_out / t["meta"]["target"], not args.no_plots)
            con.table(f"{t['meta']['device_kind']}: {title} bf16 ({targets.NOTE})",
                      report.compiled_table(t["real_shapes"]))  # fmt: skip
        if missing:
            con.log(f"targets: {missing}")
        kw = dict(reps=reps, max_seconds=cfg.max_seconds, advance=con.advance)
        results, peak = _timed(jobs, cfg.matmul, dtype, **kw)
        con.log(f"matmul peak: {peak['tflops']:.3g} TFLOP/s ({'x'.join(map(str, peak['shape']))})")
        if not args.no_standard_losses:
            n, v = args.standard_shape or cfg.standard_losses
            results += suite.run_standard(n, v, dtype, reps=reps, max_seconds=cfg.max_seconds)
        con.advance("standard losses")
    finally:
        con.close()
    meta.update(real_tokens=args.real_tokens, matmul_peak=peak)
    meta["notes"] = {c.name: c.note for c in timed if c.note}
    meta["total_seconds"] = time.perf_counter() - started
    doc = {"schema_version": report.SCHEMA_VERSION, "meta": meta, "real_shapes": recs,
           "targets": {"docs": docs, "missing": missing}, "results": results}  # fmt: skip
    written = report.write(doc, out, not args.no_plots)
    end = report.Console(None, args.quiet)
    end.table("cross-entropy, forward+backward vs optax: time ratio / temp ratio",
              report.summary(results))  # fmt: skip
    for group in ("models", "heads"):
        recs_g = [r for r in results if report.group(r) == group and r["mode"] == "fwd_bwd"]
        end.table(report.GROUPS[group], report.results_table(recs_g))
    seconds = meta["total_seconds"]
    end.log(f"wrote {out}/results.json, results.md {' '.join(written)} in {seconds:.0f} s")
    return 0


def run_ratios(argv: list[str]) -> dict[str, float]:
    """``ratios``: forward+backward of the xla strategies (or another head's fused row)
    against the materialized path."""
    p = argparse.ArgumentParser(prog="python -m benchmarks ratios", description=run_ratios.__doc__)
    p.add_argument("--tokens", type=_positive, default=2048)
    p.add_argument("--d", type=_positive, default=1024)
    p.add_argument("--vocab", type=_positive, default=32000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--reps", type=_positive, default=7)
    p.add_argument("--tied", action="store_true", help="pass w as a [V, D] embedding's .T")
    p.add_argument("--head", default="cross_entropy", choices=tuple(HEADS))
    a = p.parse_args(argv)
    case = cs.Case("ratios", "ratios", a.tokens, a.d, a.vocab, modes=("fwd_bwd",), tied=a.tied)
    head = HEADS[a.head]
    rows = ["reference", "xla_gif", "xla_recompute"] if head is CROSS_ENTROPY else None
    rows = rows or [c.name for c in head.rows]
    recs = suite.run_head(head, [case], rows, dtype=a.dtype, reps=a.reps, max_seconds=1e9)
    recs = {r["contender"]: r for r in recs if r["status"] == "ok"}
    base = rows[0]
    tied = ", w = embedding.T" if a.tied else ""
    print(f"N={a.tokens} D={a.d} V={a.vocab} {a.dtype}{tied} on {jax.devices()[0].device_kind}")
    ratios = {name: r["time_s"] / recs[base]["time_s"] for name, r in recs.items()}
    for name, r in recs.items():
        print(f"{name:>22}: {r['time_s'] * 1e3:9.1f} ms  ratio to {base} "
              f"{ratios[name]:5.2f}x  err dw {r['err_dw']:.1e}")  # fmt: skip
    return ratios


def run_gpu_check(argv: list[str]) -> int:
    """``gpu-check``: the Pallas GPU kernel's error budget, time and memory at real heads.

    Every contender's loss, dx and dw are compared with a float32 reference; a fused
    contender passes when each error is within 1.05x (+1e-6) of the materialized
    optax baseline's in the same dtype. Exit status 1 when one misses its budget.
    """
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu-check", description=__doc__)
    p.add_argument("--out", type=Path, help="default: benchmarks/results/<device_kind>/")
    p.add_argument("--cases", nargs="+", choices=tuple(cs.GPU_CASES))
    p.add_argument("--quick", action="store_true", help="only llama3-8b and gpt2-f32")
    p.add_argument("--impls", nargs="+", default=["pallas_gpu", "xla_gif", "xla_recompute"])
    p.add_argument("--reps", type=_positive, default=5)
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (to try it)")
    a = p.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    if not gpu and not a.allow_cpu:
        print(f"gpu-check needs a GPU; the default backend is {jax.default_backend()!r}.")
        return 2
    started = time.perf_counter()
    names = a.cases or (["llama3-8b", "gpt2-f32"] if a.quick else list(cs.GPU_CASES)[:4])
    jobs = [(CROSS_ENTROPY, [cs.GPU_CASES[n] for n in names], a.impls)]
    recs, peak = _timed(jobs, (8192,) * 3 if gpu else (512,) * 3, "bfloat16", reps=a.reps,
                        max_seconds=1e9)  # fmt: skip
    meta = _meta("per case", ["gpu-check", *argv], suite="gpu-check", reps=a.reps)
    meta.update(matmul_peak=peak, total_seconds=time.perf_counter() - started)
    out = a.out or RESULTS_DIR / slugify(meta["device_kind"])
    report.write({"meta": meta, "results": recs}, out, False, "gpu_check")
    print((out / "gpu_check.md").read_text())
    missed = [(r["case"], r["contender"], r["mode"]) for r in recs if r["within_budget"] is False]
    print(f"error budget missed: {missed}" if missed else "every fused contender within budget")
    return 1 if missed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the mode named by the first word (default: the suite); the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    modes = {"ratios": lambda a: 0 if run_ratios(a) else 1, "gpu-check": run_gpu_check}
    if argv and argv[0] in (*modes, "targets"):
        return {**modes, "targets": targets.main}[argv[0]](argv[1:])
    return run_suite(argv)
