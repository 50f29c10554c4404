"""Shared pieces of the post-training objectives: argument checks, masked sums and
the one fused log-probs pass that every ``linear_*`` objective makes on the head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fusedloss import _checks
from fusedloss.heads.log_probs import linear_log_probs
from fusedloss.heads.sharded import sharded_linear_log_probs
from fusedloss.heads.transposed import Transposed

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Head = jax.typing.ArrayLike | Transposed  # a [D, V] kernel or a tied [V, D] embedding


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 (no NaN, no gradient) where ``den`` is 0."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def choice(name: str, value: Any, options: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"`{name}` must be one of {tuple(options)}, got {value!r}.")


def positive(name: str, value: Any, *, low: float = 0.0) -> float:
    """A static hyperparameter ``> low`` (a Python or NumPy scalar)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"`{name}` must be a static Python float, got a traced value.")
    _checks.check_scalar_range(name, value, low, None, low_inclusive=False)
    return float(value)


def nonnegative(name: str, value: Any) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"`{name}` must be a static Python float, got a traced value.")
    _checks.check_scalar_range(name, value, 0.0, None)
    return float(value)


def static_float(name: str, value: Any) -> float:
    """A static (not traced) finite float hyperparameter."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"`{name}` must be a static Python float, got a traced value.")
    _checks.check_scalar_range(name, value)
    return float(value)


def token_array(name: str, value: Any, shape: tuple[int, ...], what: str) -> jax.Array:
    """A floating array of exactly ``shape``, as float32."""
    _checks.check_floating(name, value)
    _checks.check_shape(name, value, shape, what)
    return jnp.asarray(value).astype(jnp.float32)


def token_log_probs(name: str, log_probs: Any) -> jax.Array:
    """Per-token log-probabilities ``[B, T]`` as float32."""
    _checks.check_floating(name, log_probs)
    if jnp.ndim(log_probs) != 2:
        raise ValueError(
            f"`{name}` must have shape [batch, completion_length], got "
            f"{_checks.shape_of(log_probs)}."
        )
    return jnp.asarray(log_probs).astype(jnp.float32)


def token_mask(where: Any, shape: tuple[int, ...], name: str = "where") -> jax.Array:
    if where is None:
        return jnp.ones(shape, bool)
    _checks.check_bool(name, where)
    _checks.check_shape(name, where, shape, "the shape of `log_probs`")
    return jnp.asarray(where)


def fused_log_probs(
    x,
    w,
    tokens,
    *,
    bias,
    where,
    temperature,
    logit_softcap,
    return_entropy: bool,
    mesh,
    data_axis,
    model_axis,
    implementation,
    config,
):
    """The objective's ONE fused pass on its head (single-device or on ``mesh``)."""
    if jnp.ndim(x) != 3 or jnp.ndim(tokens) != 2:
        raise ValueError(
            "`x` must have shape [batch, completion_length, D] and `tokens` "
            f"[batch, completion_length], got {_checks.shape_of(x)} and "
            f"{_checks.shape_of(tokens)}."
        )
    kwargs = dict(
        bias=bias,
        where=where,
        temperature=temperature,
        logit_softcap=logit_softcap,
        return_entropy=return_entropy,
        implementation=implementation,
        config=config,
    )
    if mesh is None:
        return linear_log_probs(x, w, tokens, **kwargs)
    return sharded_linear_log_probs(
        x, w, tokens, mesh=mesh, data_axis=data_axis, model_axis=model_axis, **kwargs
    )


def frozen_log_probs(ref_x, ref_w, ref_bias, tokens, where, *, temperature, logit_softcap, **kw):
    """Per-token log-probs of a frozen reference head: no gradient reaches it, so the
    call holds no ``dw`` (the one-pass rule concerns the trained head)."""
    sg = jax.lax.stop_gradient
    w = jax.tree.map(sg, ref_w)
    bias = None if ref_bias is None else sg(ref_bias)
    return sg(
        fused_log_probs(
            sg(ref_x),
            w,
            tokens,
            bias=bias,
            where=where,
            temperature=temperature,
            logit_softcap=logit_softcap,
            return_entropy=False,
            **kw,
        )
    )


def check_reference_head(ref_x, ref_w, given, given_name: str) -> bool:
    """True when a frozen reference head is given; both sources at once are refused."""
    if (ref_x is None) != (ref_w is None):
        raise ValueError("`ref_x` and `ref_w` must be given together (the frozen reference head).")
    if ref_x is not None and given is not None:
        raise ValueError(
            f"Give either `{given_name}` or a reference head (`ref_x`, `ref_w`), not both."
        )
    return ref_x is not None
