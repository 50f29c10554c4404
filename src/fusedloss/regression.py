"""Regression losses with the signatures of ``optax.losses``.

Every function returns per-example values, like optax. Inputs in bf16/f16 are
computed in float32 and the result is cast back to the input's floating dtype.
Unlike optax, ``predictions`` and ``targets`` must have exactly the same shape (no
broadcasting), and ``where`` must have exactly the shape of ``predictions``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusedloss import _checks

__all__ = [
    "absolute_error",
    "cosine_distance",
    "cosine_similarity",
    "huber_loss",
    "l2_loss",
    "log_cosh",
    "squared_error",
]

Axis = int | tuple[int, ...] | None


def _acc_dtype(dtype: Any) -> Any:
    # float32 accumulation for every floating dtype narrower than float64. Spelled out
    # instead of `promote_types(dtype, float32)`, which raises for bf16 under
    # jax_numpy_dtype_promotion="strict".
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _errors(
    predictions: jax.typing.ArrayLike, targets: jax.typing.ArrayLike | None
) -> tuple[jax.Array, Any]:
    """``predictions - targets`` in the accumulation dtype, and the output dtype."""
    _checks.check_floating("predictions", predictions)
    p = jnp.asarray(predictions)
    if targets is None:
        return p.astype(_acc_dtype(p.dtype)), p.dtype
    t_dtype = _checks.dtype_of(targets)
    if not any(jnp.issubdtype(t_dtype, kind) for kind in (jnp.floating, jnp.integer, jnp.bool_)):
        raise TypeError(
            f"`targets` must have a real (floating, integer or bool) dtype, got {t_dtype}."
        )
    _checks.check_same_shape("predictions", p, "targets", targets)
    t = jnp.asarray(targets)
    # Integer targets take the floating dtype of `predictions`, as `p - t` would.
    out_dtype = jnp.result_type(p, t) if jnp.issubdtype(t.dtype, jnp.floating) else p.dtype
    acc = _acc_dtype(out_dtype)
    return p.astype(acc) - t.astype(acc), out_dtype


def _scalar_hyperparameter(
    name: str, value: jax.typing.ArrayLike, dtype: Any, *, low: float, low_inclusive: bool
) -> jax.Array:
    """A scalar hyperparameter (range-checked when concrete) cast to ``dtype``."""
    if np.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {_checks.shape_of(value)}.")
    _checks.check_scalar_range(name, value, low, None, low_inclusive=low_inclusive)
    return jnp.asarray(value).astype(dtype)


def squared_error(
    predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Elementwise squared error ``(predictions - targets) ** 2``.

    The mean squared error is ``squared_error(a, b).mean()``.

    Args:
      predictions: floating array of any shape ``[...]``.
      targets: array with exactly the shape of ``predictions`` (floating or integer);
        None means zeros.

    Returns:
      Squared differences with the shape ``[...]`` of ``predictions`` and its
      floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import regression
      >>> print(regression.squared_error(jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0])))
      [1. 4.]
    """
    e, out_dtype = _errors(predictions, targets)
    return jnp.square(e).astype(out_dtype)


def l2_loss(
    predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Elementwise L2 loss ``0.5 * (predictions - targets) ** 2``.

    Args:
      predictions: floating array of any shape ``[...]``.
      targets: array with exactly the shape of ``predictions`` (floating or integer);
        None means zeros.

    Returns:
      Half the squared differences, with the shape ``[...]`` of ``predictions`` and
      its floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import regression
      >>> print(regression.l2_loss(jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0])))
      [0.5 2. ]
    """
    e, out_dtype = _errors(predictions, targets)
    return (0.5 * jnp.square(e)).astype(out_dtype)


def absolute_error(
    predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Elementwise absolute error ``|predictions - targets|``.

    The mean absolute error (MAE, L1 loss) is ``absolute_error(a, b).mean()``. optax
    has no such function; this one follows the conventions of
    :func:`squared_error`. The gradient at a zero error is 0.

    Args:
      predictions: floating array of any shape ``[...]``.
      targets: array with exactly the shape of ``predictions`` (floating or integer);
        None means zeros.

    Returns:
      Absolute differences with the shape ``[...]`` of ``predictions`` and its
      floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import regression
      >>> print(regression.absolute_error(jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0])))
      [1. 2.]
    """
    e, out_dtype = _errors(predictions, targets)
    return jnp.abs(e).astype(out_dtype)


def huber_loss(
    predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike | None = None,
    *,
    delta: jax.typing.ArrayLike = 1.0,
) -> jax.Array:
    """Huber loss: quadratic for errors up to ``delta``, linear beyond.

    With ``e = predictions - targets``, the loss is ``0.5 * e**2`` where
    ``|e| <= delta`` and ``0.5 * delta**2 + delta * (|e| - delta)`` elsewhere, so its
    gradient is ``e`` clipped to ``[-delta, delta]``.

    Args:
      predictions: floating array of any shape ``[...]``.
      targets: array with exactly the shape of ``predictions`` (floating or integer);
        None means zeros.
      delta: positive scalar where the loss turns from quadratic to linear.

    Returns:
      Elementwise Huber losses with the shape ``[...]`` of ``predictions`` and its
      floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import regression
      >>> print(regression.huber_loss(jnp.array([0.5, 3.0]), delta=1.0))
      [0.125 2.5  ]
    """
    e, out_dtype = _errors(predictions, targets)
    d = _scalar_hyperparameter("delta", delta, e.dtype, low=0.0, low_inclusive=False)
    abs_e = jnp.abs(e)
    quadratic = jnp.minimum(abs_e, d)
    # `abs_e - quadratic` rather than `max(abs_e - d, 0)`: at |e| == d only one of the
    # two pieces carries the gradient (as in optax).
    linear = abs_e - quadratic
    return (0.5 * jnp.square(quadratic) + d * linear).astype(out_dtype)


def log_cosh(
    predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Elementwise ``log(cosh(predictions - targets))``.

    About ``e**2 / 2`` for small errors and ``|e| - log(2)`` for large ones: a twice
    differentiable alternative to the Huber loss.

    Args:
      predictions: floating array of any shape ``[...]``.
      targets: array with exactly the shape of ``predictions`` (floating or integer);
        None means zeros.

    Returns:
      Elementwise log-cosh losses with the shape ``[...]`` of ``predictions`` and its
      floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import regression
      >>> print(regression.log_cosh(jnp.array([0.0, 1.0, 1e-4])))
      [0.0000000e+00 4.33780...e-01 5.0000...e-09]
    """
    e, out_dtype = _errors(predictions, targets)
    abs_e = jnp.abs(e)
    # optax computes logaddexp(e, -e) - log(2), which cancels catastrophically for small
    # |e| (absolute error ~ulp(log 2)). Here: log1p(2 sinh(e/2)**2) = log(cosh(e)) is
    # accurate for small |e|; |e| + log1p(exp(-2|e|)) - log(2) for large |e|, where
    # sinh would overflow. The small branch sees a clamped input so that its unused
    # gradient stays finite.
    small = abs_e < 4.0
    e_small = jnp.where(small, e, 0.0)
    near = jnp.log1p(2.0 * jnp.square(jnp.sinh(0.5 * e_small)))
    far = abs_e + jnp.log1p(jnp.exp(-2.0 * abs_e)) - math.log(2.0)
    return jnp.where(small, near, far).astype(out_dtype)


def _paired_inputs(
    name_a: str,
    a: jax.typing.ArrayLike,
    name_b: str,
    b: jax.typing.ArrayLike,
    axis: Axis,
    where: jax.typing.ArrayLike | None,
) -> tuple[jax.Array, jax.Array, tuple[int, ...], jax.Array | None, Any]:
    """Validates two same-shape floating arrays reduced over ``axis`` with a ``where`` mask.

    Returns both arrays in the accumulation dtype, the normalized axes, the mask (or
    None) and the output dtype.
    """
    _checks.check_floating(name_a, a)
    _checks.check_floating(name_b, b)
    _checks.check_same_shape(name_a, a, name_b, b)
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    axes = tuple(range(a.ndim)) if axis is None else _checks.check_axis("axis", axis, a.ndim)
    mask = None
    if where is not None:
        _checks.check_mask("where", where, [a.shape])
        mask = jnp.asarray(where)
    out_dtype = jnp.result_type(a, b)
    acc = _acc_dtype(out_dtype)
    return a.astype(acc), b.astype(acc), axes, mask, out_dtype


def _cosine(
    predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    epsilon: jax.typing.ArrayLike,
    axis: Axis,
    where: jax.typing.ArrayLike | None,
) -> tuple[jax.Array, jax.Array | None, Any]:
    a, b, axes, mask, out_dtype = _paired_inputs(
        "predictions", predictions, "targets", targets, axis, where
    )
    eps = _scalar_hyperparameter("epsilon", epsilon, a.dtype, low=0.0, low_inclusive=True)
    if mask is not None:
        # Excluded elements are not read: NaN there cannot leak into value or gradient.
        a = jnp.where(mask, a, 0.0)
        b = jnp.where(mask, b, 0.0)
    dot = jnp.sum(a * b, axis=axes)
    # optax clips the *squared* norms at epsilon: sqrt(max(|a|^2, epsilon)).
    a_norm2 = jnp.maximum(jnp.sum(jnp.square(a), axis=axes), eps)
    b_norm2 = jnp.maximum(jnp.sum(jnp.square(b), axis=axes), eps)
    included = None
    if mask is not None:
        included = jnp.any(mask, axis=axes)
    elif math.prod(a.shape[i] for i in axes) == 0:
        included = jnp.zeros(dot.shape, bool)  # empty vectors: nothing to compare
    if included is not None:
        # Fully excluded rows: a finite stand-in norm keeps the gradient 0, not 0/0.
        a_norm2 = jnp.where(included, a_norm2, 1.0)
        b_norm2 = jnp.where(included, b_norm2, 1.0)
    # Divide twice instead of by the product of the norms, which overflows sooner.
    cos = dot / jnp.sqrt(a_norm2) / jnp.sqrt(b_norm2)
    return cos, included, out_dtype


def cosine_similarity(
    predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    epsilon: jax.typing.ArrayLike = 0.0,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Cosine similarity between predictions and targets along ``axis``.

    ``sum(a * b) / (sqrt(max(sum(a**2), epsilon)) * sqrt(max(sum(b**2), epsilon)))``,
    sums taken over ``axis`` and the elements selected by ``where``. As in optax,
    ``epsilon`` bounds the *squared* norms from below, and a zero vector gives NaN
    when ``epsilon`` is 0. A row with no included element (or an empty ``axis``)
    gives 0 and gradient 0.

    Args:
      predictions: floating array ``[..., dim]``.
      targets: floating array with exactly the shape of ``predictions``.
      epsilon: non-negative scalar lower bound on each squared norm.
      axis: axis or tuple of axes to reduce over; None reduces over all of them.
      where: optional boolean array with the shape of ``predictions``; True = include.

    Returns:
      Cosine similarities with the shape of ``predictions`` without the ``axis``
      dimensions (``[...]`` for the default), in the inputs' floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import regression
      >>> a = jnp.array([[1.0, 0.0], [3.0, 4.0]])
      >>> b = jnp.array([[0.0, 2.0], [6.0, 8.0]])
      >>> print(regression.cosine_similarity(a, b))
      [0. 1.]
    """
    cos, included, out_dtype = _cosine(predictions, targets, epsilon, axis, where)
    if included is not None:
        cos = jnp.where(included, cos, 0.0)
    return cos.astype(out_dtype)


def cosine_distance(
    predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    epsilon: jax.typing.ArrayLike = 0.0,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Cosine distance ``1 - cosine_similarity(predictions, targets)`` along ``axis``.

    A row with no included element (or an empty ``axis``) gives 1, as in optax (the
    similarity there is 0), with gradient 0 (optax's is NaN).

    Args:
      predictions: floating array ``[..., dim]``.
      targets: floating array with exactly the shape of ``predictions``.
      epsilon: non-negative scalar lower bound on each squared norm (see
        :func:`cosine_similarity`).
      axis: axis or tuple of axes to reduce over; None reduces over all of them.
      where: optional boolean array with the shape of ``predictions``; True = include.

    Returns:
      Cosine distances with the shape of ``predictions`` without the ``axis``
      dimensions (``[...]`` for the default), in the inputs' floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import regression
      >>> a = jnp.array([[1.0, 0.0], [3.0, 4.0]])
      >>> b = jnp.array([[0.0, 2.0], [6.0, 8.0]])
      >>> print(regression.cosine_distance(a, b))
      [1. 0.]
    """
    cos, included, out_dtype = _cosine(predictions, targets, epsilon, axis, where)
    if included is not None:
        cos = jnp.where(included, cos, 0.0)
    return (1.0 - cos).astype(out_dtype)
