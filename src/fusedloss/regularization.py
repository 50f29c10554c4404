"""Regularization penalties over a parameter pytree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusedloss import _checks

__all__ = ["l2_regularization"]


def _selected_leaves(params: Any, mask: Any) -> list[tuple[Any, Any]]:
    """``(path, leaf)`` for every leaf of ``params`` that ``mask`` selects."""
    if mask is None:
        return jax.tree_util.tree_leaves_with_path(params)
    if callable(mask):
        mask = mask(params)

    def keep(flag: Any, subtree: Any) -> Any:
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(
                f"`mask` leaves must be Python bools, got {type(flag).__name__} {flag!r}."
            )
        return subtree if flag else None

    try:
        kept = jax.tree.map(keep, mask, params)
    except ValueError as err:
        raise ValueError(
            "`mask` must be a pytree of bools with the structure of `params` (or a prefix "
            f"of it): {err}"
        ) from None
    return jax.tree_util.tree_leaves_with_path(kept)


def l2_regularization(
    params: Any,
    *,
    scale: jax.typing.ArrayLike = 1.0,
    mask: Any | Callable[[Any], Any] | None = None,
) -> jax.Array:
    """L2 penalty ``scale * 0.5 * sum(x**2)`` over every floating leaf of a pytree.

    Exactly: the sum runs over every element of every leaf of ``params`` whose dtype
    is floating (float64/32/16, bfloat16, ...; Python floats count too) and that
    ``mask`` selects. Leaves with an integer or boolean dtype (step counters, flags)
    are skipped; ``None`` is an empty subtree. Squares are accumulated in float32
    (float64 if any selected leaf is float64), whatever the leaves' dtypes. The
    gradient with respect to a leaf ``x`` is ``scale * x``.

    Args:
      params: any pytree (dicts, lists, flax/equinox structures, ...).
      scale: non-negative scalar factor, e.g. a weight-decay coefficient; the
        default 1.0 gives ``0.5 * sum(x**2)``.
      mask: optional pytree of Python bools with the structure of ``params`` or a
        prefix of it (True = penalize that subtree), or a callable mapping
        ``params`` to such a pytree, e.g. to exclude biases and norm scales (as in
        ``optax.add_decayed_weights``).

    Returns:
      A scalar: float32, or float64 if any selected leaf is float64. 0 when no
      floating leaf is selected.

    Raises:
      TypeError: a selected leaf is complex (ambiguous: ``x**2`` or ``|x|**2``) or not
        an array, or a mask leaf is not a bool.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import regularization
      >>> params = {"w": jnp.array([[1.0, 2.0]]), "b": jnp.array([3.0]), "step": 7}
      >>> print(regularization.l2_regularization(params))
      7.0
      >>> print(regularization.l2_regularization(params, scale=0.1, mask={"w": True,
      ...       "b": False, "step": False}))
      0.25
    """
    if np.ndim(scale) != 0:
        raise ValueError(f"`scale` must be a scalar, got shape {_checks.shape_of(scale)}.")
    _checks.check_scalar_range("scale", scale, 0.0, None)

    selected = []
    wide = False
    for path, leaf in _selected_leaves(params, mask):
        try:
            dtype = _checks.dtype_of(leaf)
        except TypeError:
            raise TypeError(
                f"`params` leaf {jax.tree_util.keystr(path)} is not an array: "
                f"{type(leaf).__name__}."
            ) from None
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"`params` leaf {jax.tree_util.keystr(path)} has complex dtype {dtype}; "
                "l2_regularization takes real floating leaves only."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            continue
        wide = wide or dtype == jnp.float64
        selected.append(leaf)

    acc = jnp.float64 if wide else jnp.float32
    total = jnp.zeros((), acc)
    for leaf in selected:
        total = total + jnp.sum(jnp.square(jnp.asarray(leaf).astype(acc)))
    return 0.5 * jnp.asarray(scale).astype(acc) * total
