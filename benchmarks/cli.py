"""Command line of ``python -m benchmarks``: parse, run, write JSON / markdown / plots."""

from __future__ import annotations

import argparse
import datetime
import platform as py_platform
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import shapes
from benchmarks.contenders import BASELINE, CONTENDERS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES: tuple[str, ...] = ("float32", "bfloat16")

_DESCRIPTION = """\
Benchmark fusedloss.linear_cross_entropy (fused x @ w + softmax cross-entropy) against
the materialized optax baseline and third-party fused implementations, on named
real-model LM heads and on vocabulary / token sweeps.

First, without running anything, it compiles forward+backward at the REAL heads
(GPT-2, Llama-3-8B, Gemma-2-2B, Qwen-2.5-7B) with N=8192 tokens for every contender,
and for the log-probs and top-K distillation heads against their materialized
equivalents, and reports the compiled temporaries (temp_size_in_bytes).

For every case and contender it reports, forward (loss only) and forward+backward
(value_and_grad w.r.t. x and w): the median time of several calls (compile and a
warm-up excluded), the compiled temp bytes, the device peak bytes (GPU/TPU), the
achieved TFLOP/s against a matmul peak measured in the same run, the max abs error
of the loss and gradients against a float32 precision='highest' reference, and the
time and temp-bytes ratios to the optax baseline. Contenders that are not installed
or do not support the case or backend are reported as skipped, with the reason.

Writes results.json, results.md and PNG plots into --out."""

_EPILOG = f"""\
shapes: {", ".join(f"{s.name} (D={s.d}, V={s.v})" for s in shapes.MODEL_SHAPES.values())};
  series: {", ".join(shapes.SERIES)}. Default: {" ".join(shapes.DEFAULT_MODELS + shapes.SERIES)}.
contenders: {", ".join(CONTENDERS)} (the baseline '{BASELINE}' always runs).

The quick suite on CPU uses N=128 tokens and caps D*V at 2e7 (D scaled down, the real V
kept; the tables say so); the full suite on a GPU/TPU runs the real heads at N=8192.
Modes (the first word; the rest goes to the mode, see `python -m benchmarks MODE --help`):
  python -m benchmarks ratios [--tied]       # xla strategies vs materialized, interleaved
  python -m benchmarks gpu-check --out DIR   # Pallas GPU error budget, time, peak memory
Examples:
  python -m benchmarks                                  # quick suite, all contenders
  python -m benchmarks --suite full                     # what benchmarks/gpu.sh runs
  python -m benchmarks --shapes gpt2 llama3-8b --impls xla_gif xla_recompute jax_cce
  python -m benchmarks --shapes tiny --tokens 64 --reps 1 --out /tmp/bench --no-plots
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``--help`` documents every option)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--suite",
        choices=shapes.SUITES,
        default="quick",
        help="quick (default: minutes on a 2-core CPU) or full (real heads at N=8192 on a "
        "GPU/TPU); sets tokens, reps and sweep points for the detected backend",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=shapes.all_shape_names(),
        metavar="NAME",
        help="model heads and/or series to run (default: every real head and both sweeps; "
        "'tiny' is a small smoke-test head)",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        choices=tuple(CONTENDERS),
        metavar="NAME",
        help=f"contenders to run (default: all; '{BASELINE}' is always added, since every "
        "ratio is taken against it)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        help="dtype of x and w (default: float32 on CPU, bfloat16 on GPU/TPU); the error "
        "reference is always float32",
    )
    p.add_argument(
        "--tokens",
        type=_positive_int,
        metavar="N",
        help="override the number of tokens N of the model heads and the vocabulary sweep",
    )
    p.add_argument(
        "--reps",
        type=_positive_int,
        metavar="R",
        help="most timed calls per measurement (default: set by the suite)",
    )
    p.add_argument(
        "--standard-shape",
        type=_positive_int,
        nargs=2,
        metavar=("N", "V"),
        help="[N, V] logits of the standard-losses-vs-optax table (default: set by the suite)",
    )
    p.add_argument(
        "--no-standard-losses",
        action="store_true",
        help="skip the standard losses vs optax table",
    )
    p.add_argument(
        "--real-shapes",
        nargs="+",
        choices=tuple(shapes.MODEL_SHAPES),
        metavar="NAME",
        help="heads of the first table, compiled temporaries of forward+backward at the "
        f"real shapes, compiled only (default: {' '.join(shapes.DEFAULT_MODELS)})",
    )
    p.add_argument(
        "--real-tokens",
        type=_positive_int,
        default=8192,
        metavar="N",
        help="tokens N of the compiled-temporaries table (default: 8192)",
    )
    p.add_argument(
        "--no-real-shapes",
        action="store_true",
        help="skip the compiled-temporaries table at the real shapes",
    )
    p.add_argument(
        "--no-heads",
        action="store_true",
        help="skip timing the log-probs and top-K distillation heads against their "
        "materialized equivalents (on the model-head cases)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output directory (default: benchmarks/results/<device_kind>/, e.g. 'cpu' or "
        "'nvidia-h100-80gb-hbm3')",
    )
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar or console tables")
    p.add_argument("--list", action="store_true", help="list the shapes and contenders, then exit")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    return build_parser().parse_args(argv)


def slugify(device_kind: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
    return slug or "unknown"


def default_dtype(platform: str) -> str:
    """float32 on CPU (no native bf16 matmul there), bfloat16 on accelerators."""
    return "float32" if platform == "cpu" else "bfloat16"


def _list_text() -> str:
    lines = ["shapes:"]
    for s in shapes.MODEL_SHAPES.values():
        cap = f" softcap={s.softcap:g}" if s.softcap else ""
        lines.append(f"  {s.name:12s} D={s.d:<5d} V={s.v:<7d}{cap:12s} {s.source}")
    lines += [f"  {name:12s} series" for name in shapes.SERIES]
    lines.append("contenders:")
    lines += [f"  {c.name:19s} {c.description}" for c in CONTENDERS.values()]
    return "\n".join(lines)


def _ratios(argv: list[str]) -> int:
    from benchmarks import xla_ratios

    xla_ratios.main(argv)
    return 0


def _gpu_check(argv: list[str]) -> int:
    from benchmarks import gpu_check

    return gpu_check.main(argv)


# Other measurements, as `python -m benchmarks MODE ...`.
MODES = {"ratios": _ratios, "gpu-check": _gpu_check}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the suite; returns the process exit code."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    if raw_argv and raw_argv[0] in MODES:
        return MODES[raw_argv[0]](raw_argv[1:])
    args = parse_args(raw_argv)
    if args.list:
        print(_list_text())
        return 0
    # Heavy imports after parsing, so that --help and --list are instant.
    import jax
    import jax.numpy as jnp
    import jaxlib

    import fusedloss
    from benchmarks import contenders, measure, plots, real_shapes, report, runner, standard
    from benchmarks.console import Console

    started = time.perf_counter()
    device = jax.devices()[0]
    platform = jax.default_backend()
    device_kind = device.device_kind
    dtype_name = args.dtype or default_dtype(platform)
    dtype = jnp.dtype(dtype_name)
    cfg = shapes.suite_config(args.suite, platform)
    reps = args.reps or cfg.reps
    cases = shapes.build_cases(args.shapes, args.suite, platform, args.tokens)
    chosen = contenders.select(args.impls)
    out_dir: Path = args.out or RESULTS_DIR / slugify(device_kind)
    out_dir.mkdir(parents=True, exist_ok=True)

    real_names = real_shapes.contender_names()
    real_heads = [] if args.no_real_shapes else (args.real_shapes or shapes.DEFAULT_MODELS)
    head_cases = [] if args.no_heads else [c for c in cases if c.group == "models"]
    if args.suite == "quick" and platform == "cpu":
        # On a small CPU the [N, V] passes dominate: the two narrowest heads say enough.
        head_cases = sorted(head_cases, key=lambda c: c.n * c.v)[:2]
    total = len(cases) * len(chosen) + len(real_heads) * len(real_names) + 4 * len(head_cases)
    console = Console(total=total, quiet=args.quiet)
    real: list[dict[str, Any]] = []
    try:
        console.log(
            f"fusedloss benchmarks: suite={args.suite} device={device_kind} ({platform}) "
            f"dtype={dtype_name} reps≤{reps} cases={len(cases)} contenders={len(chosen)}"
        )
        if real_heads:
            console.log(
                f"compiled temporaries of fwd+bwd at the real heads, N={args.real_tokens}, "
                f"{dtype_name} (compiled, not run)"
            )
            real = real_shapes.run_real_shapes(
                real_heads, args.real_tokens, dtype, real_names, console.advance
            )
            header, rows = real_shapes.table(real)
            console.print_table(
                f"compiled temporaries of fwd+bwd, N={args.real_tokens} {dtype_name} "
                f"({device_kind}; compiled, not run)",
                header,
                rows,
                name_columns=1,
            )
        peak = measure.matmul_peak(cfg.matmul, dtype)
        console.log(
            f"matmul peak: {peak.tflops:.3g} TFLOP/s "
            f"({'x'.join(map(str, peak.shape))} {peak.dtype})"
        )
        results = runner.run_cases(
            cases,
            chosen,
            dtype=dtype,
            reps=reps,
            max_seconds=cfg.max_seconds,
            peak_tflops=peak.tflops,
            listener=console,
        )
        heads = real_shapes.time_heads(
            head_cases,
            dtype,
            reps=reps,
            max_seconds=cfg.max_seconds,
            advance=console.advance,
        )
        if heads:
            header, rows = real_shapes.heads_table(heads)
            console.print_table(f"fused heads vs materialized, fwd+bwd, {dtype_name}", header, rows)
        std: list[dict[str, Any]] = []
        if not args.no_standard_losses:
            n, v = args.standard_shape or cfg.standard_losses
            console.log(f"standard losses vs optax on [{n}, {v}] {dtype_name} logits")
            std = standard.run_standard(n, v, dtype, reps=reps, max_seconds=cfg.max_seconds)
        # Measure the peak again at the end and keep the better one: on a shared
        # machine one measurement can land in a slow moment.
        again = measure.matmul_peak(cfg.matmul, dtype)
        if again.tflops > peak.tflops:
            peak = again
            for r in results:
                if r["tflops"] is not None:
                    r["peak_fraction"] = r["tflops"] / peak.tflops
        console.log(f"matmul peak (best of start and end of the run): {peak.tflops:.3g} TFLOP/s")
    finally:
        console.close()

    argv_text = " ".join(shlex.quote(a) for a in raw_argv)
    doc: dict[str, Any] = {
        "schema_version": report.SCHEMA_VERSION,
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device_kind": device_kind,
            "platform": platform,
            "device_count": jax.device_count(),
            "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__,
            "fusedloss_version": fusedloss.__version__,
            "python_version": py_platform.python_version(),
            "third_party": contenders.third_party_versions(),
            "suite": args.suite,
            "dtype": dtype_name,
            "reps": reps,
            "max_seconds": cfg.max_seconds,
            "tokens": args.tokens,
            "real_tokens": args.real_tokens,
            "matmul_peak": {
                "shape": list(peak.shape),
                "dtype": peak.dtype,
                "seconds": peak.seconds,
                "tflops": peak.tflops,
            },
            "contenders": [c.name for c in chosen],
            "command": f"python -m benchmarks {argv_text}".strip(),
            "total_seconds": time.perf_counter() - started,
        },
        "cases": [
            {
                "name": c.name,
                "group": c.group,
                "model": c.model,
                "n": c.n,
                "d": c.d,
                "v": c.v,
                "softcap": c.softcap,
                "modes": list(c.modes),
                "note": c.note,
            }
            for c in cases
        ],
        "real_shapes": real,
        "results": results,
        "heads": heads,
        "standard_losses": std,
    }
    written = [] if args.no_plots else plots.write_plots(doc, out_dir)
    doc["meta"]["total_seconds"] = time.perf_counter() - started
    report.write_json(doc, out_dir / "results.json")
    (out_dir / "results.md").write_text(report.to_markdown(doc, written))

    summary = Console(total=None, quiet=args.quiet)
    header, rows = report.summary(doc)
    if rows:
        summary.print_table(
            f"forward+backward vs {BASELINE}: time ratio / temp-bytes ratio",
            header,
            rows,
            name_columns=1,
        )
    if not args.no_plots and not written and not plots.matplotlib_available():
        summary.log("plots skipped: matplotlib is not installed (pip install '.[bench]')")
    summary.log(
        f"wrote {out_dir}/results.json, results.md"
        + (f", {', '.join(written)}" if written else "")
        + f" in {doc['meta']['total_seconds']:.0f} s"
    )
    summary.close()
    return 0
