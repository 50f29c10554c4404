"""The one reduction helper every loss uses."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from fusedloss import _ce_math, _checks

Reduction = Literal["none", "sum", "mean"]


def reduce_loss(
    values: jax.typing.ArrayLike,
    reduction: Reduction = "mean",
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Reduces per-example loss values, honouring a mask and per-example weights.

    Sums are accumulated in float32 (or wider); the result has the floating dtype of
    ``values``. Excluded elements contribute exactly 0 to the value and the gradient,
    even when they hold NaN: excluding an element means it is not read.

    Args:
      values: per-example losses, any shape, floating.
      reduction: ``"none"`` returns ``weights * values`` with excluded elements set
        to 0 (same shape as ``values``); ``"sum"`` returns the weighted sum over
        included elements; ``"mean"`` the weighted mean over included elements,
        i.e. ``sum(w * v) / sum(w)``, and 0 (not NaN) when nothing is included or
        the weights sum to 0.
      where: optional boolean mask with the shape of ``values``; True = include.
      weights: optional float weights with the shape of ``values``.

    Returns:
      An array with the shape of ``values`` for ``"none"``, else a scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusedloss
      >>> v = jnp.array([1.0, 2.0, 3.0, 4.0])
      >>> print(fusedloss.reduce_loss(v, "mean", where=jnp.array([True, True, False, False])))
      1.5
      >>> print(fusedloss.reduce_loss(v, "sum", weights=jnp.array([1.0, 0.0, 0.0, 0.5])))
      3.0
      >>> print(fusedloss.reduce_loss(v, "mean", where=jnp.zeros(4, bool)))
      0.0
    """
    _checks.check_reduction(reduction)
    _checks.check_floating("values", values)
    values = jnp.asarray(values)
    if where is not None:
        _checks.check_bool("where", where)
        _checks.check_shape("where", where, values.shape, "the shape of `values`")
    if weights is not None:
        _checks.check_floating("weights", weights)
        _checks.check_shape("weights", weights, values.shape, "the shape of `values`")
    out_dtype = values.dtype
    acc_dtype = _ce_math.acc_dtype(out_dtype)

    v = values.astype(acc_dtype)
    w = None if weights is None else jnp.asarray(weights).astype(acc_dtype)
    if where is not None:
        v = jnp.where(where, v, 0.0)
        if w is not None:
            w = jnp.where(where, w, 0.0)
    weighted = v if w is None else v * w

    if reduction == "none":
        return weighted.astype(out_dtype)
    total = jnp.sum(weighted)
    if reduction == "sum":
        return total.astype(out_dtype)
    if w is not None:
        denom = jnp.sum(w)
    elif where is not None:
        denom = jnp.sum(where, dtype=acc_dtype)
    else:
        denom = jnp.asarray(v.size, acc_dtype)
    safe = jnp.where(denom == 0, jnp.ones_like(denom), denom)
    return jnp.where(denom == 0, jnp.zeros_like(total), total / safe).astype(out_dtype)
