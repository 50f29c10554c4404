"""GPU acceptance check of ``pallas_gpu``: error budget, speed and memory at real shapes.

Run on a machine with a GPU::

    python -m benchmarks.gpu_check --out DIR [--cases llama3-8b,gemma2-2b] [--quick]

For each case (an LM head ``x [N, D] @ w [D, V]`` and a dtype) it

1. checks the **error budget** (Apple Cut Cross-Entropy's criterion): the loss and
   the gradients w.r.t. ``x`` and ``w`` of every fused variant are compared with a
   float32 oracle computed at ``precision=HIGHEST``; a variant passes when its
   error is no larger than that of the plain materialized computation in the same
   dtype (``logits = x @ w`` in the input dtype, then softmax cross-entropy: what
   the fused op replaces), up to 5% and 1e-6 of slack for rounding noise;
2. times forward and forward+backward (``value_and_grad`` w.r.t. ``x`` and ``w``)
   of each contender in a fresh subprocess, so that the device's
   ``memory_stats()["peak_bytes_in_use"]`` is that contender's own peak, and
   reports achieved TFLOP/s (useful FLOPs: 2 N D V forward, 6 N D V
   forward+backward, whatever the implementation really computes) against a
   bf16 matmul peak measured in the same run.

It prints a table and writes ``gpu_check.json`` and ``gpu_check.md`` under ``DIR``.
Exit status 1 if a fused variant misses its error budget. The predictions these
numbers are compared with are in ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# Every contender runs in its own process next to this one: neither may grab 75% of
# the device up front. Read when the backend starts, so setting it here is in time.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

import fusedloss
from benchmarks.measure import matmul_peak, time_compiled
from benchmarks.runner import make_inputs
from fusedloss.heads.pallas_gpu import PallasGpuConfig

_MARK = "GPU_CHECK_RESULT "


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    d: int
    v: int
    dtype: str
    softcap: float | None = None

    @property
    def flops_fwd(self) -> float:
        return 2.0 * self.n * self.d * self.v


CASES = {
    c.name: c
    for c in (
        Case("llama3-8b", 8192, 4096, 128256, "bfloat16"),
        Case("gemma2-2b", 8192, 2304, 256000, "bfloat16", softcap=30.0),
        Case("llama3-8b-f32", 2048, 4096, 128256, "float32"),
        Case("gpt2-f32", 8192, 768, 50257, "float32"),
        # Only to try the script itself on a CPU (--allow-cpu); not part of any run.
        Case("tiny", 200, 64, 1000, "bfloat16", softcap=30.0),
    )
}
QUICK = ("llama3-8b", "gpt2-f32")

# name -> (implementation, config); "materialized" is the baseline the fused op replaces.
CONTENDERS: dict[str, tuple[str, Any]] = {
    "pallas_gpu": ("pallas_gpu", None),
    "xla": ("xla", None),
    "materialized": ("materialized", None),
}
FUSED = ("pallas_gpu", "xla")


def inputs(case: Case, seed: int = 0):
    """Hidden states ~ N(0, 1) and a head giving logits of standard deviation ~2."""
    return make_inputs(case, jnp.dtype(case.dtype), seed)


def loss_fn(contender: str, case: Case):
    """``(x, w, labels) -> mean loss`` for a contender name."""
    impl, config = CONTENDERS[contender]
    if impl == "pallas_gpu" and jax.default_backend() == "cpu":  # --allow-cpu
        config = dataclasses.replace(config or PallasGpuConfig(), interpret=True)
    if impl == "materialized":

        def materialized(x, w, labels):
            logits = (x @ w).astype(jnp.float32)  # in the input dtype, as users write it
            if case.softcap is not None:
                logits = case.softcap * jnp.tanh(logits / case.softcap)
            return jnp.mean(fusedloss.softmax_cross_entropy_with_integer_labels(logits, labels))

        return materialized

    def fused(x, w, labels):
        return fusedloss.linear_cross_entropy(
            x, w, labels, logit_softcap=case.softcap, implementation=impl, config=config
        )

    return fused


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# --------------------------------------------------------------------------------------
# one contender on one case, in a child process
# --------------------------------------------------------------------------------------


def run_child(case: Case, contender: str, reps: int) -> dict[str, Any]:
    x, w, labels = inputs(case)
    jax.block_until_ready((x, w, labels))
    base = jax.devices()[0].memory_stats() or {}
    loss = loss_fn(contender, case)
    out: dict[str, Any] = {"case": case.name, "contender": contender}
    for mode, fn in (("fwd", loss), ("fwd_bwd", jax.value_and_grad(loss, (0, 1)))):
        timing = time_compiled(fn, (x, w, labels), reps=reps, max_seconds=math.inf)
        out[f"{mode}_compile_s"] = timing.compile_s
        out[f"{mode}_temp_bytes"] = timing.temp_bytes
        seconds = timing.median_s
        out[f"{mode}_ms"] = seconds * 1e3
        useful = case.flops_fwd * (1 if mode == "fwd" else 3)
        out[f"{mode}_tflops"] = useful / seconds / 1e12
    out["inputs_bytes"] = base.get("bytes_in_use")
    out["peak_bytes"] = _peak_bytes()
    return out


def spawn_child(case: Case, contender: str, reps: int, timeout: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", case.name, contender]
    cmd += ["--reps", str(reps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"case": case.name, "contender": contender, "error": f"timeout after {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"case": case.name, "contender": contender, "error": " | ".join(tail)[-400:]}


# --------------------------------------------------------------------------------------
# error budget (in the parent, one case at a time)
# --------------------------------------------------------------------------------------


def _rel(got, want) -> float:
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.linalg.norm((got - want).ravel()) / jnp.linalg.norm(want.ravel()))


def error_budget(case: Case, fused: tuple[str, ...]) -> dict[str, Any]:
    x, w, labels = inputs(case)
    grad = lambda name, x, w: jax.jit(jax.value_and_grad(loss_fn(name, case), (0, 1)))(x, w, labels)
    with jax.default_matmul_precision("highest"):
        oracle = grad("materialized", x.astype(jnp.float32), w.astype(jnp.float32))
    oracle = jax.device_get(oracle)

    def errors(result) -> dict[str, float]:
        loss, (dx, dw) = result
        return {
            "loss": abs(float(loss) - float(oracle[0])) / abs(float(oracle[0])),
            "dx": _rel(dx, oracle[1][0]),
            "dw": _rel(dw, oracle[1][1]),
        }

    report: dict[str, Any] = {"errors": {}, "ok": {}}
    for name in ("materialized", *fused):
        try:
            report["errors"][name] = errors(grad(name, x, w))
        except Exception as e:  # a contender that cannot run is reported, not fatal
            report["errors"][name] = {"error": f"{type(e).__name__}: {e}"[:400]}
    budget = report["errors"]["materialized"]
    for name in fused:
        err = report["errors"][name]
        report["ok"][name] = "error" not in err and all(
            err[k] <= 1.05 * budget[k] + 1e-6 for k in ("loss", "dx", "dw")
        )
    return report


def matmul_peak_tflops(size: int = 8192, reps: int = 10) -> float:
    return matmul_peak((size, size, size), jnp.bfloat16, reps).tflops


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(doc: dict[str, Any]) -> str:
    peak = doc["matmul_peak_tflops"]
    head = (
        "| case | contender | fwd ms | fwd+bwd ms | TFLOP/s (% peak) | peak GiB | temp GiB "
        "| err loss / dx / dw | budget |"
    )
    lines = [head, "|" + "---|" * 9]
    for case in doc["cases"]:
        for name, t in case["timings"].items():
            err = case["budget"]["errors"].get(name, {})
            ok = case["budget"]["ok"].get(name)
            tf = t.get("fwd_bwd_tflops")
            cells = [
                case["case"],
                name,
                _fmt(t.get("fwd_ms"), ".1f"),
                _fmt(t.get("fwd_bwd_ms"), ".1f"),
                "-" if tf is None else f"{tf:.0f} ({100 * tf / peak:.0f}%)",
                _fmt(None if t.get("peak_bytes") is None else t["peak_bytes"] / 2**30, ".2f"),
                _fmt(
                    None
                    if t.get("fwd_bwd_temp_bytes") is None
                    else t["fwd_bwd_temp_bytes"] / 2**30,
                    ".2f",
                ),
                " / ".join(f"{err[k]:.1e}" for k in ("loss", "dx", "dw"))
                if "loss" in err
                else err.get("error", "-")[:40],
                {True: "ok", False: "FAIL", None: "(baseline)"}[ok],
            ]
            if "error" in t:
                cells[2:5] = ["-", "-", t["error"][:60]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory for gpu_check.json / .md")
    parser.add_argument("--cases", default=None, help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=420, help="seconds per contender")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    # Runs on a CPU too (Pallas in interpret mode): for trying the script itself.
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_child(CASES[args.child[0]], args.child[1], args.reps)
        print(_MARK + json.dumps(result), flush=True)
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    if jax.default_backend() != "gpu" and not args.allow_cpu:
        print(f"gpu_check needs a GPU; the default backend is {jax.default_backend()!r}.")
        return 2
    default = QUICK if args.quick else tuple(c for c in CASES if c != "tiny")
    names = args.cases.split(",") if args.cases else list(default)
    contenders = args.contenders.split(",")
    for name in names:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; known: {list(CASES)}")
    for name in contenders:
        if name not in CONTENDERS:
            parser.error(f"unknown contender {name!r}; known: {list(CONTENDERS)}")

    doc: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "cases": [],
    }
    for name in names:
        case = CASES[name]
        timings = {}
        for contender in contenders:  # each in a fresh process: its own memory peak
            print(f"[{name}] timing {contender} ...", flush=True)
            timings[contender] = spawn_child(case, contender, args.reps, args.timeout)
        print(f"[{name}] error budget ...", flush=True)
        budget = error_budget(case, tuple(c for c in contenders if c in FUSED))
        doc["cases"].append(
            {**dataclasses.asdict(case), "case": name, "timings": timings, "budget": budget}
        )
    doc["matmul_peak_tflops"] = matmul_peak_tflops(8192 if jax.default_backend() == "gpu" else 1024)
    text = f"device: {doc['device']}, jax {doc['jax']}, "
    text += f"bf16 matmul peak {doc['matmul_peak_tflops']:.0f} TFLOP/s\n\n{table(doc)}\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(doc, indent=2))
    (args.out / "gpu_check.md").write_text(text)
    failed = [(c["case"], n) for c in doc["cases"] for n, ok in c["budget"]["ok"].items() if not ok]
    if failed:
        print(f"error budget missed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
