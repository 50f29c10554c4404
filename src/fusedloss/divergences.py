"""Divergences between distributions, with the signatures of ``optax.losses``.

Predictions come as log-probabilities (``log_predictions``), reduced over ``axis``
(default: the last one). ``where`` has exactly the shape of ``log_predictions``
(True = include); excluded elements are not read, so they contribute 0 to the value
and the gradient even when they hold NaN, and a row with no included element gives
0. Inputs in bf16/f16 are computed in float32 and the result is cast back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusedloss.regression import Axis, _paired_inputs

__all__ = [
    "generalized_kl_divergence",
    "jensen_shannon_divergence",
    "kl_divergence",
    "kl_divergence_with_log_targets",
]


def _log_or_zero(x: jax.Array) -> jax.Array:
    """``log(x)`` with ``log(0) := 0`` (optax's convention), with a finite gradient at 0."""
    zero = x == 0
    return jnp.where(zero, 0.0, jnp.log(jnp.where(zero, 1.0, x)))


def _masked_sum(
    terms: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, out_dtype: object
) -> jax.Array:
    if mask is not None:
        terms = jnp.where(mask, terms, 0.0)
    return jnp.sum(terms, axis=axes).astype(out_dtype)


def _prepare(
    log_predictions: jax.typing.ArrayLike,
    targets_name: str,
    targets: jax.typing.ArrayLike,
    axis: Axis,
    where: jax.typing.ArrayLike | None,
    target_fill: float,
) -> tuple[jax.Array, jax.Array, tuple[int, ...], jax.Array | None, object]:
    lp, t, axes, mask, out_dtype = _paired_inputs(
        "log_predictions", log_predictions, targets_name, targets, axis, where
    )
    if mask is not None:
        # Excluded elements are replaced by p = q (zero divergence) before any math,
        # so NaN/Inf there can reach neither the value nor the gradient.
        lp = jnp.where(mask, lp, 0.0)
        t = jnp.where(mask, t, target_fill)
    return lp, t, axes, mask, out_dtype


def kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Kullback-Leibler divergence ``KL(targets || predictions)``.

    ``sum(targets * (log(targets) - log_predictions))`` over ``axis``, with
    ``0 * log(0) = 0`` for zero targets (as in optax; a zero target against a
    ``-inf`` log-prediction still gives NaN, as in optax).

    Args:
      log_predictions: floating log-probabilities of the predicted distribution,
        ``[..., dim]``.
      targets: floating probabilities of the target distribution, with exactly the
        shape of ``log_predictions``.
      axis: axis or tuple of axes to reduce over; None reduces over all of them.
      where: optional boolean array with the shape of ``log_predictions``;
        True = include.

    Returns:
      The divergences, with the shape of ``log_predictions`` without the ``axis``
      dimensions (``[...]`` for the default), in the inputs' floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import divergences
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))
      >>> print(divergences.kl_divergence(log_p, jnp.array([1.0, 0.0])))
      0.693...
    """
    lp, t, axes, mask, out_dtype = _prepare(
        log_predictions, "targets", targets, axis, where, target_fill=1.0
    )
    return _masked_sum(t * (_log_or_zero(t) - lp), axes, mask, out_dtype)


def kl_divergence_with_log_targets(
    log_predictions: jax.typing.ArrayLike,
    log_targets: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Kullback-Leibler divergence with the targets given as log-probabilities.

    ``sum(exp(log_targets) * (log_targets - log_predictions))`` over ``axis``.

    Args:
      log_predictions: floating log-probabilities of the predicted distribution,
        ``[..., dim]``.
      log_targets: floating log-probabilities of the target distribution, with
        exactly the shape of ``log_predictions``.
      axis: axis or tuple of axes to reduce over; None reduces over all of them.
      where: optional boolean array with the shape of ``log_predictions``;
        True = include.

    Returns:
      The divergences, with the shape of ``log_predictions`` without the ``axis``
      dimensions (``[...]`` for the default), in the inputs' floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import divergences
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))
      >>> print(divergences.kl_divergence_with_log_targets(log_p, log_q))
      0.1308...
    """
    lp, lt, axes, mask, out_dtype = _prepare(
        log_predictions, "log_targets", log_targets, axis, where, target_fill=0.0
    )
    return _masked_sum(jnp.exp(lt) * (lt - lp), axes, mask, out_dtype)


def generalized_kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Generalized Kullback-Leibler divergence, for unnormalized distributions.

    ``sum(targets * (log(targets) - log_predictions) + exp(log_predictions) - targets)``
    over ``axis``: the Bregman divergence of ``f(x) = x log x - x``, equal to
    :func:`kl_divergence` when both distributions sum to 1. Each summand is
    non-negative, and they are summed together (optax sums the two parts separately,
    which can cancel).

    Args:
      log_predictions: floating log of the (unnormalized) predicted measure,
        ``[..., dim]``.
      targets: floating non-negative target measure, with exactly the shape of
        ``log_predictions``.
      axis: axis or tuple of axes to reduce over; None reduces over all of them.
      where: optional boolean array with the shape of ``log_predictions``;
        True = include.

    Returns:
      The divergences, with the shape of ``log_predictions`` without the ``axis``
      dimensions (``[...]`` for the default), in the inputs' floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import divergences
      >>> log_p = jnp.log(jnp.array([1.0, 2.0]))
      >>> print(divergences.generalized_kl_divergence(log_p, jnp.array([1.0, 1.0])))
      0.306...
    """
    lp, t, axes, mask, out_dtype = _prepare(
        log_predictions, "targets", targets, axis, where, target_fill=1.0
    )
    terms = t * (_log_or_zero(t) - lp) + (jnp.exp(lp) - t)
    return _masked_sum(terms, axes, mask, out_dtype)


def jensen_shannon_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Jensen-Shannon divergence between predictions and targets (in nats).

    With ``p = exp(log_predictions)``, ``q = targets`` and ``m = (p + q) / 2``::

        JS(p, q) = 0.5 * KL(p || m) + 0.5 * KL(q || m)
                 = 0.5 * sum(p * log(p / m) + q * log(q / m))

    summed over ``axis`` and the elements selected by ``where``, with
    ``0 * log(0 / m) = 0``. It is symmetric, finite (at most ``log(2)`` for
    distributions that sum to 1) and needs neither distribution to be strictly
    positive. optax has no such function; the arguments follow
    :func:`kl_divergence`. Not normalized: pass distributions that sum to 1.

    Args:
      log_predictions: floating log-probabilities of the predicted distribution,
        ``[..., dim]``.
      targets: floating probabilities of the target distribution, with exactly the
        shape of ``log_predictions``.
      axis: axis or tuple of axes to reduce over; None reduces over all of them.
      where: optional boolean array with the shape of ``log_predictions``;
        True = include.

    Returns:
      The divergences, with the shape of ``log_predictions`` without the ``axis``
      dimensions (``[...]`` for the default), in the inputs' floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import divergences
      >>> log_p = jnp.log(jnp.array([1.0, 0.0]))
      >>> print(divergences.jensen_shannon_divergence(log_p, jnp.array([0.0, 1.0])))
      0.693...
    """
    lp, q, axes, mask, out_dtype = _prepare(
        log_predictions, "targets", targets, axis, where, target_fill=1.0
    )
    p = jnp.exp(lp)
    # Zero-probability entries are set to 0 with the double-`where` trick so that
    # neither log(0) nor 0 * -inf reaches the value or the gradient. `x == 0` (not
    # `x > 0`) keeps NaN inputs on the computed path, so they propagate.
    p_zero = p == 0
    q_zero = q == 0
    m = 0.5 * (p + q)
    m_zero = m == 0
    log_m = jnp.log(jnp.where(m_zero, 1.0, m))
    term_p = jnp.where(p_zero, 0.0, p * (jnp.where(p_zero, 0.0, lp) - log_m))
    term_q = jnp.where(q_zero, 0.0, q * (_log_or_zero(q) - log_m))
    return _masked_sum(0.5 * (term_p + term_q), axes, mask, out_dtype)
