"""The one timing harness (``benchmarks/README.md``, "How it measures"): compile, warm
up, then rounds of one call of every program, interleaved, so that drift in the
machine's speed reaches all alike; medians. Compilation and warm-up are never timed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def first_line(e: BaseException, limit: int = 200) -> str:
    """``Type: the first line of the message``."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:limit]}"


def temp_bytes(compiled: Any) -> int | None:
    """``temp_size_in_bytes`` of a compiled executable (None where not reported)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend implements it
        return None


def compile_only(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, float]:
    """``(executable, seconds)`` of ``jax.jit(fn)`` for ``args`` (arrays or
    ``ShapeDtypeStruct``s whose shardings may name a compile-only device). Runs nothing."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).trace(*args).lower().compile()
    return compiled, time.perf_counter() - t0


def _memory_stats() -> dict[str, int]:
    try:
        return dict(jax.devices()[0].memory_stats() or {})
    except Exception:  # some PJRT plugins raise instead of returning None
        return {}


def measure(
    programs: dict[Any, tuple[Callable[..., Any], tuple[Any, ...]]],
    *,
    reps: int,
    max_seconds: float,
    check: Callable[[Any, Any], dict[str, Any]] | None = None,
) -> dict[Any, dict[str, Any]]:
    """Measures ``{name: (fn, args)}`` (see the module docstring), in the given order:
    ``{name: figures}`` with ``status`` "ok" (``time_s``, the median of ``times_s``;
    ``compile_s``, ``temp_bytes``, ``device_peak_bytes``, ``device_peak_exact``: False
    when the process-wide device peak was set earlier, an upper bound; what ``check``
    returned) or "skipped" with the ``reason``: a failing program is reported, never
    raised. ``reps`` rounds at most; no new round starts once a program has spent
    ``max_seconds`` (one round always runs)."""
    out: dict[Any, dict[str, Any]] = {}
    ready: dict[Any, tuple[Any, tuple[Any, ...]]] = {}
    for name, (fn, args) in programs.items():
        m = out[name] = {"status": "ok", "times_s": []}
        try:
            compiled, m["compile_s"] = compile_only(fn, args)
            m["temp_bytes"] = temp_bytes(compiled)
            before = _memory_stats()
            result = jax.block_until_ready(compiled(*args))
            after = _memory_stats()
            if "peak_bytes_in_use" in after and "bytes_in_use" in before:
                peak = after["peak_bytes_in_use"]
                m["device_peak_exact"] = peak > before.get("peak_bytes_in_use", 0)
                m["device_peak_bytes"] = peak - before["bytes_in_use"]
            m.update(check(name, result) if check else {})
            del result
            ready[name] = (compiled, args)
        except Exception as e:  # e.g. out of memory: report, never crash
            out[name] = {"status": "skipped", "reason": f"failed: {first_line(e)}"}
    for _ in range(max(1, reps)):
        for name, (compiled, args) in ready.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            out[name]["times_s"].append(time.perf_counter() - t0)
        if max((sum(out[n]["times_s"]) for n in ready), default=max_seconds) >= max_seconds:
            break
    for name in ready:
        out[name]["time_s"] = statistics.median(out[name]["times_s"])
    return out


@jax.jit
def _rel(got: jax.Array, want: jax.Array) -> jax.Array:
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return jnp.linalg.norm((got - want).ravel()) / jnp.maximum(jnp.linalg.norm(want.ravel()), 1e-30)


def rel_error(got: Any, want: Any) -> float:
    """``||got - want|| / ||want||`` in float32 (NaN anywhere gives NaN)."""
    if np.shape(got) != np.shape(want):
        raise ValueError(f"shape mismatch: got {np.shape(got)}, want {np.shape(want)}")
    return float(_rel(jnp.asarray(got), jnp.asarray(want)))


def matmul_peak(shape: tuple[int, int, int], dtype: Any, reps: int = 3) -> dict[str, Any]:
    """The best throughput of ``reps`` plain ``[M, K] @ [K, N]`` in ``dtype``: the
    attainable rate the contenders are compared with."""
    m, k, n = shape
    rng = np.random.default_rng(1)  # random data: a GPU's clocks under a realistic load
    a, b = (jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in ((m, k), (k, n)))
    best = min(measure({"mm": (jnp.matmul, (a, b))}, reps=reps, max_seconds=1e9)["mm"]["times_s"])
    return {
        "shape": list(shape),
        "dtype": jnp.dtype(dtype).name,
        "tflops": 2e-12 * m * k * n / best,
    }
