"""The one timing harness: compile, warm up, then time programs interleaved; medians.

:func:`measure` compiles each program (``jax.jit(fn).lower(*args).compile()``, which
also gives the compiled ``temp_size_in_bytes``), calls it once as a warm-up (its
device peak memory and its output, handed to ``check`` for errors, come from that
call), then times rounds of one call of every program each, ended by
``jax.block_until_ready``: drift in the machine's speed (other load, clocks) reaches
every program alike instead of biasing their ratios. Compilation and warm-up are
never timed. :func:`matmul_peak` and every mode of the suite use it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Measured:
    """One program's figures; ``failure`` is set (and the rest may be missing) when it
    could not compile or run. ``peak_exact`` False: the process-wide device peak was
    set earlier, so ``peak_bytes`` is only an upper bound."""

    compile_s: float = 0.0
    temp_bytes: int | None = None
    peak_bytes: int | None = None
    peak_exact: bool = False
    times_s: list[float] = dataclasses.field(default_factory=list)
    checked: dict[str, Any] = dataclasses.field(default_factory=dict)
    failure: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def temp_bytes(compiled: Any) -> int | None:
    """``temp_size_in_bytes`` of a compiled executable (None where not reported)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    value = getattr(analysis, "temp_size_in_bytes", None)
    return None if value is None else int(value)


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


def first_line(e: BaseException, limit: int = 200) -> str:
    """``Type: the first line of the message``."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:limit]}"


def measure(
    programs: dict[Any, tuple[Callable[..., Any], tuple[Any, ...]]],
    *,
    reps: int,
    max_seconds: float,
    check: Callable[[Any, Any], dict[str, Any]] | None = None,
) -> dict[Any, Measured]:
    """Measures ``{name: (fn, args)}`` (see the module docstring), in the given order.

    ``reps`` rounds at most; no new round starts once a program has spent
    ``max_seconds`` (one round always runs). A program that fails is reported, never
    raised.
    """
    out: dict[Any, Measured] = {}
    ready: dict[Any, tuple[Any, tuple[Any, ...]]] = {}
    for name, (fn, args) in programs.items():
        m = out[name] = Measured()
        try:
            compiled, m.compile_s = compile_only(fn, args)
            m.temp_bytes = temp_bytes(compiled)
            before = _memory_stats()
            result = jax.block_until_ready(compiled(*args))
            after = _memory_stats()
            if "peak_bytes_in_use" in after and "bytes_in_use" in before:
                m.peak_exact = after["peak_bytes_in_use"] > before.get("peak_bytes_in_use", 0)
                m.peak_bytes = after["peak_bytes_in_use"] - before["bytes_in_use"]
            m.checked = check(name, result) if check else {}
            del result
            ready[name] = (compiled, args)
        except Exception as e:  # e.g. out of memory: report, never crash
            m.failure = f"failed: {first_line(e)}"
    for _ in range(max(1, reps)):
        for name, (compiled, args) in ready.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            out[name].times_s.append(time.perf_counter() - t0)
        if max((sum(out[n].times_s) for n in ready), default=max_seconds) >= max_seconds:
            break
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
    a, b = (jnp.ones(s, dtype) for s in ((m, k), (k, n)))
    best = min(measure({"mm": (jnp.matmul, (a, b))}, reps=reps, max_seconds=1e9)["mm"].times_s)
    return {
        "shape": list(shape),
        "dtype": jnp.dtype(dtype).name,
        "tflops": 2e-12 * m * k * n / best,
    }
