"""Measurements: time, compiled temp bytes, device peak bytes, matmul peak, errors.

Each measurement compiles ``jax.jit(fn)`` once (``.lower(...).compile()``, which also
yields the compiled ``memory_analysis``), calls the executable once as a warm-up (its
output is kept to compute errors), then times up to ``reps`` more calls, each ended
by ``jax.block_until_ready``, and reports the median. Compilation and warm-up are
never in the timed numbers.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Timing:
    """The outcome of :func:`time_compiled`.

    Attributes:
      times_s: the timed calls, in seconds.
      compile_s: seconds spent lowering and compiling.
      temp_bytes: the compiled program's temporaries
        (``memory_analysis().temp_size_in_bytes``), None if not reported.
      device_peak_bytes: device peak above the bytes in use before the call, when
        the backend reports memory stats (GPU/TPU), else None.
      device_peak_exact: False when the process-wide peak was not raised by this
        measurement, so ``device_peak_bytes`` is only an upper bound.
      output: the warm-up call's output (for error checks).
    """

    times_s: list[float]
    compile_s: float
    temp_bytes: int | None
    device_peak_bytes: int | None
    device_peak_exact: bool
    output: Any

    @property
    def median_s(self) -> float:
        """Median of the timed calls."""
        return statistics.median(self.times_s)


def memory_stats() -> dict[str, int] | None:
    """``jax.devices()[0].memory_stats()`` (None on backends without it, e.g. CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some PJRT plugins raise instead of returning None
        return None
    return dict(stats) if stats else None


def temp_bytes_of(compiled: Any) -> int | None:
    """``temp_size_in_bytes`` of a compiled executable's memory analysis."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if analysis is None:
        return None
    if isinstance(analysis, list | tuple):  # older jaxlibs: one per device
        analysis = analysis[0]
    value = getattr(analysis, "temp_size_in_bytes", None)
    return None if value is None else int(value)


def time_compiled(
    fn: Callable[..., Any], args: tuple[Any, ...], *, reps: int, max_seconds: float
) -> Timing:
    """Compiles ``fn(*args)`` and times it (see the module docstring).

    Args:
      fn: the function to jit.
      args: its (device) arguments.
      reps: most timed calls.
      max_seconds: no new timed call starts once this much was spent timing
        (at least one timed call is made).

    Returns:
      A :class:`Timing`.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    temp = temp_bytes_of(compiled)
    before = memory_stats()
    output = jax.block_until_ready(compiled(*args))
    times: list[float] = []
    while len(times) < max(1, reps) and (not times or sum(times) < max_seconds):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    after = memory_stats()
    peak, exact = None, False
    if before and after and "peak_bytes_in_use" in after and "bytes_in_use" in before:
        exact = after["peak_bytes_in_use"] > before.get("peak_bytes_in_use", 0)
        peak = after["peak_bytes_in_use"] - before["bytes_in_use"]
    return Timing(times, compile_s, temp, peak, exact, output)


@jax.jit
def _max_abs_diff(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def max_abs_error(got: jax.Array, want: jax.Array) -> float:
    """``max |got - want|`` in float32 (NaN anywhere gives NaN)."""
    if got.shape != want.shape:
        raise ValueError(f"shape mismatch: got {got.shape}, want {want.shape}")
    return float(_max_abs_diff(got, want))


@dataclasses.dataclass(frozen=True)
class MatmulPeak:
    """The best throughput of a plain matmul in the benchmark dtype."""

    shape: tuple[int, int, int]
    dtype: str
    seconds: float
    tflops: float


def matmul_peak(shape: tuple[int, int, int], dtype: Any, reps: int = 3) -> MatmulPeak:
    """Measures ``[M, K] @ [K, N]`` in ``dtype`` (default precision), best of ``reps``.

    The fastest call is the closest estimate of the device's attainable matmul rate,
    which the achieved TFLOP/s of the contenders are compared with.
    """
    m, k, n = shape
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (m, k), dtype)
    b = jax.random.normal(kb, (k, n), dtype)
    timing = time_compiled(lambda a, b: a @ b, (a, b), reps=reps, max_seconds=math.inf)
    best = min(timing.times_s)
    return MatmulPeak(shape, jnp.dtype(dtype).name, best, 2.0 * m * k * n / best / 1e12)
