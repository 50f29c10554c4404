"""The standard losses against their optax twins on ``[N, V]`` logits.

For each loss both ``fusedloss.<name>`` and ``optax.losses.<name>`` are timed as
``value_and_grad`` of the mean loss w.r.t. the first argument (the logits), with
their compiled temp bytes and their error against optax run in float32. A loss that
fusedloss does not export (yet) is reported as skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fusedloss
from benchmarks import measure

ArgsFn = Callable[[jax.Array, int, int, Any], tuple[jax.Array, ...]]
STANDARD_KEYS: tuple[str, ...] = (
    "loss",
    "impl",  # "optax" | "fusedloss"
    "status",
    "reason",
    "n",
    "v",
    "dtype",
    "time_s",
    "temp_bytes",
    "err_loss",  # max |mean loss - optax float32|
    "err_grad",  # max |d/dlogits - optax float32|
    "time_ratio",
    "temp_ratio",
)


def _logits(key: jax.Array, n: int, v: int, dtype: Any) -> jax.Array:
    return jax.random.normal(key, (n, v), dtype) * 2.0


def _int_labels(key: jax.Array, n: int, v: int, dtype: Any) -> tuple[jax.Array, ...]:
    k1, k2 = jax.random.split(key)
    return _logits(k1, n, v, dtype), jax.random.randint(k2, (n,), 0, v, jnp.int32)


def _prob_labels(key: jax.Array, n: int, v: int, dtype: Any) -> tuple[jax.Array, ...]:
    k1, k2 = jax.random.split(key)
    probs = jax.nn.softmax(jax.random.normal(k2, (n, v), jnp.float32), axis=-1)
    return _logits(k1, n, v, dtype), probs.astype(dtype)


def _binary_labels(key: jax.Array, n: int, v: int, dtype: Any) -> tuple[jax.Array, ...]:
    k1, k2 = jax.random.split(key)
    return _logits(k1, n, v, dtype), jax.random.bernoulli(k2, 0.5, (n, v)).astype(dtype)


def _log_probs(key: jax.Array, n: int, v: int, dtype: Any) -> tuple[jax.Array, ...]:
    k1, k2 = jax.random.split(key)
    log_p = jax.nn.log_softmax(jax.random.normal(k1, (n, v), jnp.float32) * 2.0, axis=-1)
    targets = jax.nn.softmax(jax.random.normal(k2, (n, v), jnp.float32), axis=-1)
    return log_p.astype(dtype), targets.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Twin:
    """A loss with the same name in ``fusedloss`` and ``optax.losses``."""

    name: str
    make_args: ArgsFn


TWINS: tuple[Twin, ...] = (
    Twin("softmax_cross_entropy_with_integer_labels", _int_labels),
    Twin("softmax_cross_entropy", _prob_labels),
    Twin("sigmoid_binary_cross_entropy", _binary_labels),
    Twin("kl_divergence", _log_probs),
)


def _mean_loss(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    def mean(*args: jax.Array) -> jax.Array:
        return jnp.mean(fn(*args).astype(jnp.float32))

    return mean


def _as_float32(a: jax.Array) -> jax.Array:
    return a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a


def _record(name: str, impl: str, n: int, v: int, dtype: str) -> dict[str, Any]:
    rec: dict[str, Any] = dict.fromkeys(STANDARD_KEYS)
    rec.update(loss=name, impl=impl, status="skipped", reason="", n=n, v=v, dtype=dtype)
    return rec


def run_standard(
    n: int,
    v: int,
    dtype: Any,
    *,
    reps: int,
    max_seconds: float,
    names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Times the twins (all of :data:`TWINS` by default, else those in ``names``).

    Returns:
      Two records (``impl`` "optax" then "fusedloss") per loss, keys
      :data:`STANDARD_KEYS`.
    """
    out: list[dict[str, Any]] = []
    dtype_name = jnp.dtype(dtype).name
    for i, twin in enumerate(TWINS):
        if names is not None and twin.name not in names:
            continue
        recs = {impl: _record(twin.name, impl, n, v, dtype_name) for impl in ("optax", "fusedloss")}
        theirs = getattr(optax.losses, twin.name, None)
        ours = getattr(fusedloss, twin.name, None)
        if theirs is None or ours is None:
            # Only twins are compared: a loss that one side lacks is not timed at all.
            missing = "optax.losses has" if theirs is None else "fusedloss exports"
            for r in recs.values():
                r["reason"] = f"{missing} no {twin.name}"
            out.extend(recs.values())
            continue
        args = jax.block_until_ready(twin.make_args(jax.random.key(100 + i), n, v, dtype))
        want_value, want_grad = jax.jit(jax.value_and_grad(_mean_loss(theirs)))(
            *(_as_float32(a) for a in args)
        )
        for impl, fn in (("optax", theirs), ("fusedloss", ours)):
            rec = recs[impl]
            try:
                timing = measure.time_compiled(
                    jax.value_and_grad(_mean_loss(fn)), args, reps=reps, max_seconds=max_seconds
                )
                value, grad = timing.output
                rec.update(
                    status="ok",
                    time_s=timing.median_s,
                    temp_bytes=timing.temp_bytes,
                    err_loss=measure.max_abs_error(value, want_value),
                    err_grad=measure.max_abs_error(grad, want_grad),
                )
            except Exception as e:  # report, never crash
                rec["reason"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        base = recs["optax"]
        for rec in recs.values():
            if rec["status"] == "ok" and base["status"] == "ok":
                rec["time_ratio"] = rec["time_s"] / base["time_s"]
                if rec["temp_bytes"] is not None and base["temp_bytes"]:
                    rec["temp_ratio"] = rec["temp_bytes"] / base["temp_bytes"]
        out.extend(recs.values())
    return out
