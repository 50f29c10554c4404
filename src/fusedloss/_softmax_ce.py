"""Softmax cross-entropy with integer labels: one fused pass with a custom VJP.

The forward evaluates, per row, the log-sum-exp and the label logit (plus the logit
sum for label smoothing) in float32, never forming log-probabilities. The VJP keeps
as residuals only the input logits themselves and one float32 log-sum-exp per row;
the backward recomputes ``softmax = exp(logits - lse)`` on the fly, so no new
logits-sized buffer lives between forward and backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fusedloss import _ce_math, _checks


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy between logits and integer labels, fused.

    With the default keyword arguments this equals
    :func:`optax.losses.softmax_cross_entropy_with_integer_labels` (values and
    gradients). Per example, with (softcapped) logits :math:`s`, label :math:`y`,
    smoothing :math:`a` over :math:`V` classes and z-loss weight :math:`b`:

    .. math::
      \ell = \mathrm{lse}(s) - (1-a)\, s_y - \tfrac{a}{V}\sum_j s_j + b\,\mathrm{lse}(s)^2

    Args:
      logits: unnormalized log-probabilities, ``[..., num_classes]`` (the class
        axes given by ``axis``); float32, bfloat16 or float16 (computed in float32).
      labels: integer class ids, with the shape of ``logits`` minus the class axes.
        With a tuple ``axis`` a label is a flat index into the class axes.
      axis: class axis or axes.
      where: optional boolean mask, either per example (the shape of ``labels``) or
        per element (the shape of ``logits``: excluded classes take no part in the
        normalizer). Excluded examples give 0 and zero gradient.
      label_smoothing: mixes the one-hot target with the uniform distribution over
        the (included) classes, in ``[0, 1)``.
      z_loss: adds ``z_loss * lse**2`` per example (PaLM's z-loss), ``>= 0``.
      logit_softcap: if set, logits become ``c * tanh(logits / c)`` first (Gemma-2).
      ignore_index: examples whose label equals it give 0 and zero gradient (e.g.
        ``-100`` as in PyTorch / Hugging Face).

    Returns:
      Per-example losses with the shape of ``labels`` and the dtype of ``logits``.
      An included example whose label lies outside ``[0, num_classes)`` gives NaN
      under ``jit``; an eager call raises a ``ValueError`` instead.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusedloss
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([0, 1])
      >>> fusedloss.softmax_cross_entropy_with_integer_labels(logits, labels).tolist()
      [0.2761..., 2.9517...]
      >>> print(fusedloss.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, label_smoothing=0.1))
      [0.3994... 0.    ]
    """
    _checks.check_floating("logits", logits)
    _checks.check_integer("labels", labels)
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1:
        raise ValueError(f"`logits` must have at least one (class) axis, got shape {logits.shape}.")
    class_axes = _checks.check_axis("axis", axis, logits.ndim)
    batch_axes = tuple(a for a in range(logits.ndim) if a not in class_axes)
    batch_shape = tuple(logits.shape[a] for a in batch_axes)
    num_classes = int(np.prod([logits.shape[a] for a in class_axes]))
    _checks.check_shape(
        "labels", labels, batch_shape, f"`logits` {logits.shape} without class axes {class_axes}"
    )
    _checks.check_scalar_range("label_smoothing", label_smoothing, 0.0, 1.0)
    _checks.check_scalar_range("z_loss", z_loss, 0.0)
    if logit_softcap is not None:
        _checks.check_scalar_range("logit_softcap", logit_softcap, 0.0, low_inclusive=False)
    if ignore_index is not None and not isinstance(ignore_index, int | np.integer):
        raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")

    perm = batch_axes + class_axes
    flat = logits.transpose(perm).reshape((*batch_shape, num_classes))
    row_mask = None
    elem_mask = None
    if where is not None:
        _checks.check_mask("where", where, [batch_shape, logits.shape])
        where = jnp.asarray(where)
        if where.shape == logits.shape and where.shape != batch_shape:
            elem_mask = where.transpose(perm).reshape(flat.shape)
            row_mask = jnp.any(elem_mask, axis=-1)
        else:
            row_mask = where
    valid = jnp.ones(batch_shape, bool) if row_mask is None else row_mask
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    _checks.check_labels_in_range(
        "labels", labels, num_classes, ignore_index=ignore_index, mask=valid
    )

    acc = _ce_math.acc_dtype(logits.dtype)
    loss = _fused_ce(
        flat,
        labels,
        valid,
        elem_mask,
        jnp.asarray(label_smoothing, acc),
        jnp.asarray(z_loss, acc),
        None if logit_softcap is None else jnp.asarray(logit_softcap, acc),
        smoothing=bool(_maybe_nonzero(label_smoothing)),
    )
    return loss.astype(logits.dtype)


def _maybe_nonzero(value) -> bool:
    """Static guess whether a hyperparameter may be nonzero (tracers: assume yes)."""
    return not _checks.is_concrete(value) or float(value) != 0.0


def _row_stats(flat, labels, elem_mask, cap, smoothing):
    """float32 (lse, label logit, logit sum or None, class count) per row."""
    dt = _ce_math.acc_dtype(flat.dtype)
    s = _ce_math.softcap(flat.astype(dt), None if cap is None else cap.astype(dt))
    num_classes = flat.shape[-1]
    # Out-of-range labels are clipped only to keep the gather in bounds; the loss of
    # such an example is made NaN afterwards.
    safe_labels = jnp.clip(labels, 0, num_classes - 1)
    label_logit = jnp.take_along_axis(s, safe_labels[..., None], axis=-1)[..., 0]
    s_in = s if elem_mask is None else jnp.where(elem_mask, s, -jnp.inf)
    m = jnp.max(s_in, axis=-1)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    lse = m_safe + jnp.log(jnp.sum(jnp.exp(s_in - m_safe[..., None]), axis=-1))
    sum_logits = None
    count = num_classes
    if smoothing:
        if elem_mask is None:
            sum_logits = jnp.sum(s, axis=-1)
        else:
            sum_logits = jnp.sum(jnp.where(elem_mask, s, 0.0), axis=-1)
            count = jnp.maximum(jnp.sum(elem_mask, axis=-1, dtype=dt), 1.0)
    return lse, label_logit, sum_logits, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused_ce(flat, labels, valid, elem_mask, alpha, zl, cap, smoothing):
    return _fused_ce_fwd(flat, labels, valid, elem_mask, alpha, zl, cap, smoothing)[0]


def _fused_ce_fwd(flat, labels, valid, elem_mask, alpha, zl, cap, smoothing):
    lse, label_logit, sum_logits, count = _row_stats(flat, labels, elem_mask, cap, smoothing)
    loss = _ce_math.token_loss(
        lse, label_logit, sum_logits, num_classes=count, label_smoothing=alpha, z_loss=zl
    )
    loss = _ce_math.nan_if_bad_label(jnp.where(valid, loss, 0.0), labels, flat.shape[-1], valid)
    # Residuals: the input logits plus one float32 value per row.
    return loss, (flat, labels, valid, elem_mask, alpha, zl, cap, lse)


def _fused_ce_bwd(smoothing, res, g):
    flat, labels, valid, elem_mask, alpha, zl, cap, lse = res
    dt = _ce_math.acc_dtype(flat.dtype)
    s = _ce_math.softcap(flat.astype(dt), None if cap is None else cap.astype(dt))
    count = flat.shape[-1]
    if elem_mask is not None:
        if smoothing:
            count = jnp.maximum(jnp.sum(elem_mask, axis=-1, keepdims=True, dtype=dt), 1.0)
    lse_safe = jnp.where(valid, lse, 0.0)[..., None]
    classes = jnp.arange(flat.shape[-1], dtype=labels.dtype).reshape((1,) * labels.ndim + (-1,))
    is_label = labels[..., None] == classes
    scale = jnp.where(valid, g.astype(dt), 0.0)[..., None]
    dlogits = _ce_math.logit_grad(
        s,
        lse_safe,
        is_label,
        scale,
        num_classes=count,
        label_smoothing=alpha if smoothing else 0.0,
        z_loss=zl,
        cap=None if cap is None else cap.astype(dt),
        include=elem_mask,
    )
    zeros = jax.tree.map(jnp.zeros_like, (alpha, zl, cap))
    return (dlogits.astype(flat.dtype), None, None, None, *zeros)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)
