"""Compiled temporaries for GPUs and TPUs this machine does not have: compiled, not run.

The compile-only devices (``jax.experimental.topologies``) need ``jax[tpu]``,
``jax[cuda12-local]`` and ``nvidia-cuda-nvcc-cu12``, which cannot share the ordinary
run's environment (the CUDA plugin would register itself): ``make bench`` builds
``.venv-targets`` and the suite runs ``python -m benchmarks targets`` with it, in
subprocesses, while the host compiles its own table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks import cases as cs
from benchmarks import suite

ROOT = Path(__file__).resolve().parents[1]
# name -> (platform, topology, GPU target description under tests/targets/)
TARGETS: dict[str, tuple[str, str, str | None]] = {
    "h100": ("gpu", "1x1x1", "h100.txtpb"),
    "a100": ("gpu", "1x1x1", "a100.txtpb"),
    "tpu-v5e": ("tpu", "v5e:1x1", None),
    "tpu-v6e": ("tpu", "v6e:1x1", None),
}
# A few rows per platform: the materialized cross-entropy, the library's default for
# the chip and, on GPUs, each other fused head and its materialized equivalent (on
# TPUs those compile for 20-50 s each here; `--rows` adds them). The host-only
# baselines (optax, jax-cce, tokamax) are not installed in the targets environment.
ROWS: dict[str, tuple[str, ...]] = {
    "gpu": ("reference", "default", "log_probs_materialized", "log_probs",
            "topk_distill_materialized", "topk_distill", "distill_materialized", "distill"),
    "tpu": ("reference", "default"),
}  # fmt: skip
_ELSEWHERE = "optax, jax-cce and tokamax are not installed in the targets environment"
ROWS_NOTE = {
    "gpu": _ELSEWHERE,
    "tpu": _ELSEWHERE + "; the log_probs, topk_distill and distill heads are left out on TPU"
    " targets (20-50 s of compile each on 2 cores; `python -m benchmarks targets --rows ...`)",
}
# As the Makefile's TARGETS_ENV: JAX_PLATFORMS=cpu (the CUDA plugin needs it without a
# driver); the TPU_* variables keep libtpu from looking for a TPU host.
ENV = dict(kv.split("=") for kv in (
    "JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 TPU_SKIP_MDS_QUERY=1 TPU_WORKER_ID=0"
    " TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_HOSTNAMES=localhost").split())  # fmt: skip
NOTE = "compiled for the target, not run"
HOW = (
    "`make bench` builds `.venv-targets` (jax[tpu], jax[cuda12-local], nvidia-cuda-nvcc-cu12)"
    " and adds these tables; or set FUSEDLOSS_TARGETS_PYTHON to such an interpreter"
)
_MARK = "TARGETS_PROGRESS "


def _device(name: str) -> Any:
    platform, topology, spec = TARGETS[name]
    if platform == "gpu":
        text = (ROOT / "tests" / "targets" / spec).read_text()
        topo = topologies.get_topology_desc(name, "cuda", target_config=text, topology="1x1x1")
    else:
        topo = topologies.get_topology_desc(topology, "tpu", chips_per_host_bounds=(1, 1, 1))
    return topo.devices[0]


def main(argv: Sequence[str]) -> int:
    """``python -m benchmarks targets``: compiles the table for each target into
    ``OUT/<target>/results.json`` (run by the targets interpreter)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks targets", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="one directory per target in it")
    p.add_argument("--targets", nargs="+", choices=tuple(TARGETS), default=list(TARGETS))
    p.add_argument("--heads", nargs="+", choices=tuple(cs.MODEL_SHAPES))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rows", nargs="+", help=f"rows to compile (default: {ROWS})")
    a = p.parse_args(argv)
    cases = [cs.model_case(h, a.tokens) for h in a.heads or cs.DEFAULT_MODELS]
    for name in a.targets:
        started = time.perf_counter()
        device = _device(name)
        # A one-device mesh of the target: tracing sees the chip, as under a user's mesh.
        sharding = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
        platform = TARGETS[name][0]
        rows = a.rows or ROWS[platform]
        recs = suite.compile_table(
            cases, rows, dtype=jnp.bfloat16, platform=platform, sharding=sharding,
            advance=lambda d, t=name: print(f"{_MARK}{t}: {d}", flush=True),
        )  # fmt: skip
        meta = {"target": name, "device_kind": device.device_kind, "platform": platform}
        meta["rows_note"] = None if a.rows else ROWS_NOTE[platform]
        meta.update(dtype="bfloat16", jax_version=jax.__version__, note=NOTE)
        meta["total_seconds"] = time.perf_counter() - started
        (a.out / name).mkdir(parents=True, exist_ok=True)
        doc = {"meta": meta, "real_shapes": recs}
        (a.out / name / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


# ---- the launcher, in the main run -----------------------------------------------------------


def interpreter() -> str | None:
    """``FUSEDLOSS_TARGETS_PYTHON``, else ``.venv-targets/bin/python`` once installed."""
    venv = ROOT / ".venv-targets"
    default = str(venv / "bin" / "python") if (venv / ".installed").exists() else None
    return os.environ.get("FUSEDLOSS_TARGETS_PYTHON") or default


def steps(heads: int) -> int:
    """Progress steps of the targets' tables at ``heads`` model heads."""
    return sum(len(ROWS[platform]) for platform, _, _ in TARGETS.values()) * heads


def _read(proc: subprocess.Popen, advance: Callable[[str], None], lines: list[str]) -> None:
    assert proc.stdout is not None
    with proc.stdout:  # closed once the subprocess has said everything
        for line in proc.stdout:
            if line.startswith(_MARK):
                advance(line[len(_MARK) :].strip())
            else:
                lines.append(line.rstrip())


def launch(
    python: str, out: Path, heads: Sequence[str], tokens: int, advance: Callable[[str], None],
    groups: Sequence[Sequence[str]] | None = None,
) -> Callable[[], tuple[list[dict[str, Any]], str | None]]:  # fmt: skip
    """Starts compiling the targets (default: the GPU and the TPU ones in two
    subprocesses, both cores busy once the host's own table is done); their progress
    lines advance the caller's bar. Returns the wait for them: (their documents, why
    some are missing or None)."""
    import fusedloss

    src = str(Path(fusedloss.__file__).resolve().parents[1])
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), src])}
    cmd = [python, "-m", "benchmarks", "targets", "--out", str(out), "--tokens", str(tokens)]
    runs = []
    for names in groups or [[n for n, t in TARGETS.items() if t[0] == p] for p in ("gpu", "tpu")]:
        for name in names:  # never report an earlier run's tables as this one's
            (out / name / "results.json").unlink(missing_ok=True)
        proc = subprocess.Popen(
            [*cmd, "--targets", *names, "--heads", *heads], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        lines: list[str] = []
        reader = threading.Thread(target=_read, args=(proc, advance, lines), daemon=True)
        reader.start()
        runs.append((names, proc, reader, lines))

    def wait() -> tuple[list[dict[str, Any]], str | None]:
        docs, missing = [], None
        for names, proc, reader, lines in runs:
            code = proc.wait()
            reader.join()
            paths = [out / name / "results.json" for name in names]
            docs += [json.loads(path.read_text()) for path in paths if path.exists()]
            tail = " | ".join(line for line in lines[-3:] if line)[-400:]
            missing = missing or (code and f"the targets run failed (exit {code}): {tail}") or None
        return docs, missing

    return wait


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
