#!/usr/bin/env bash
# GPU entry point: kernel correctness first, then the benchmark suite, in one call.
#
# On a machine with a CUDA GPU and JAX installed with CUDA support
# (e.g. `pip install -U "jax[cuda12]"` and `pip install -e ".[bench]"`), runs
#
#     pytest tests/test_pallas.py               (compiled-kernel tests run on a GPU)
#     python -m benchmarks gpu-check --quick    (error budget, time, peak memory)
#     python -m benchmarks --suite full         (every head and contender, real shapes)
#
# which writes results.json, results.md and PNG plots into
# benchmarks/results/<device_kind>/ (e.g. benchmarks/results/nvidia-h100-80gb-hbm3/).
# The full suite runs the real model heads at N=8192 tokens (< 10 min on one H100).
#
# Usage:  benchmarks/gpu.sh [more `python -m benchmarks` options, e.g. --dtype float32]
# Env:    PYTHON (default: python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

# Fail early, and clearly, when JAX does not see a GPU.
"$PYTHON" - <<'PY'
import sys

import jax

if jax.default_backend() != "gpu":
    sys.exit(
        "benchmarks/gpu.sh: JAX sees no GPU (backend: "
        f"{jax.default_backend()!r}); install a CUDA build of JAX, e.g. jax[cuda12]."
    )
print(f"benchmarks/gpu.sh: {jax.devices()[0].device_kind}, jax {jax.__version__}")
PY

# The materialized baselines at N=8192 need tens of GiB; let XLA's allocator use most
# of the GPU (the default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

out="benchmarks/results/$("$PYTHON" -c 'import jax, re; print(re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-"))')"
mkdir -p "$out"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_pallas.py 2>&1 | tee "$out/pallas_tests.log"
"$PYTHON" -m benchmarks gpu-check --quick --out "$out" 2>&1 | tee "$out/gpu_check.log"
"$PYTHON" -m benchmarks --suite full --no-targets "$@"
