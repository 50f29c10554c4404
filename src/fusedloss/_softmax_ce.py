"""Softmax cross-entropy with integer labels: one fused pass with a custom JVP.

The forward evaluates, per row, the log-sum-exp and the label logit (plus the logit
sum for label smoothing) in float32, never forming log-probabilities. The JVP rule
is linear in the tangents, with the logit gradient and per-row partial derivatives as
coefficients: forward mode (``jax.jvp``, ``jacfwd``, ``hessian``) works, reverse mode is
JAX's transpose of the rule, and the hyperparameters (``label_smoothing``, ``z_loss``,
``logit_softcap``) are differentiated too. The rule is rematerialized with a policy
that saves only the per-row statistics, so reverse mode keeps the logits and O(rows)
between forward and backward (no logits-sized gradient or softmax); the backward
recomputes the softmax from the logits and the saved log-sum-exp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

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
        With a tuple ``axis`` a label is a flat (C-order) index into the class axes
        taken in the order given, as in optax.
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
    class_axes = _checks.check_axis_in_order("axis", axis, logits.ndim)
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


# The name of the per-row statistics that reverse mode saves (see _fused_ce_jvp).
_ROW_STAT = "fusedloss_softmax_ce_row_stat"


def _row_stats(flat, labels, valid, elem_mask, alpha, zl, cap, smoothing, *, tangent=True):
    """Per-row loss and every primal quantity its tangent needs.

    Returns the loss alone when ``tangent`` is False, else
    ``(loss, grad, d_alpha, d_zl, d_cap)``: ``grad`` is d loss / d logits
    (logits-sized, accumulation dtype) and the other three are per-row partial
    derivatives with respect to the scalar hyperparameters. Excluded rows have loss,
    ``grad`` and partials exactly 0, whatever their logits hold.
    """
    dt = _ce_math.acc_dtype(flat.dtype)
    z = flat.astype(dt)
    s = _ce_math.softcap(z, cap)
    num_classes = flat.shape[-1]
    classes = jax.lax.broadcasted_iota(labels.dtype, s.shape, s.ndim - 1)
    is_label = labels[..., None] == classes
    # Out-of-range labels are clipped only to keep the gather in bounds; the loss of
    # such an example is made NaN afterwards.
    safe_labels = jnp.clip(labels, 0, num_classes - 1)
    label_logit = jnp.take_along_axis(s, safe_labels[..., None], axis=-1)[..., 0]
    rows = valid[..., None]
    if elem_mask is None:
        include = jnp.broadcast_to(rows, s.shape)
    else:
        include = elem_mask & rows
    # Excluded rows are computed on zeros, fully included, and zeroed at the end: no
    # -inf log-sum-exp (log 0) whose derivative would put 0 * inf into a Hessian.
    live = include | ~rows
    s_live = jnp.where(rows, s, 0.0)
    s_in = jnp.where(live, s_live, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s_in, axis=-1, keepdims=True))
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    lse = m[..., 0] + jnp.log(jnp.sum(jnp.exp(s_in - m), axis=-1))
    lse = checkpoint_name(lse, _ROW_STAT)
    label_logit = checkpoint_name(label_logit, _ROW_STAT)
    sum_logits = None
    count = num_classes
    if smoothing:
        sum_logits = checkpoint_name(jnp.sum(jnp.where(live, s_live, 0.0), axis=-1), _ROW_STAT)
        if elem_mask is not None:
            count = jnp.maximum(jnp.sum(include, axis=-1, dtype=dt), 1.0)
    loss = _ce_math.token_loss(
        lse, label_logit, sum_logits, num_classes=count, label_smoothing=alpha, z_loss=zl
    )
    if not tangent:
        loss = jnp.where(valid, loss, 0.0)
        return _ce_math.nan_if_bad_label(loss, labels, num_classes, valid)
    # The exponent is -inf (not s - lse) off the included classes, so an excluded
    # logit far above the included ones cannot overflow exp.
    p = jnp.exp(jnp.where(live, s_live - lse[..., None], -jnp.inf))
    # d loss / d s, the pre-softcap gradient (see _ce_math).
    g_lse, g_label, g_sum = _ce_math.token_loss_cotangents(
        lse, 1.0, num_classes=count, label_smoothing=alpha, z_loss=zl
    )
    coef = g_lse[..., None] * p + jnp.where(is_label, g_label, 0.0)
    if smoothing:
        coef = coef + jnp.where(live, jnp.broadcast_to(g_sum, lse.shape)[..., None], 0.0)
    grad = jnp.where(rows, coef * _ce_math.softcap_grad(s, cap), 0.0)
    zero = jnp.zeros_like(lse)
    d_alpha = label_logit - sum_logits / count if smoothing else zero
    d_zl = lse * lse
    d_cap = zero
    if cap is not None:
        # d/dc of c tanh(z / c) = r - (z / c) (1 - r^2), r = tanh(z / c) = s / c.
        r = s / cap
        d_cap = jnp.sum(jnp.where(rows, coef * (r - (z / cap) * (1.0 - r * r)), 0.0), axis=-1)
    per_row = [jnp.where(valid, x, 0.0) for x in (loss, d_alpha, d_zl, d_cap)]
    loss = _ce_math.nan_if_bad_label(per_row[0], labels, num_classes, valid)
    return loss, grad, *per_row[1:]


@functools.partial(jax.custom_jvp, nondiff_argnums=(7,))
def _fused_ce(flat, labels, valid, elem_mask, alpha, zl, cap, smoothing):
    return _row_stats(flat, labels, valid, elem_mask, alpha, zl, cap, smoothing, tangent=False)


@_fused_ce.defjvp
def _fused_ce_jvp(smoothing, primals, tangents):
    flat, labels, valid, elem_mask, alpha, zl, cap = primals
    flat_dot, _, _, _, alpha_dot, zl_dot, cap_dot = tangents
    return _loss_and_tangent(
        flat,
        labels,
        valid,
        elem_mask,
        alpha,
        zl,
        cap,
        flat_dot,
        alpha_dot,
        zl_dot,
        cap_dot,
        smoothing,
    )


# Reverse mode is JAX's transpose of this rule. Rematerialized with a policy that saves
# only the named per-row statistics, its residuals are the rule's inputs (the logits,
# labels and masks) and O(rows) floats: the logits-sized `grad` (float32, twice a bf16
# input) is not kept but recomputed in the backward from the logits and the saved
# log-sum-exp, as the backward of a cross-entropy does anyway. Forward mode and
# higher orders are unaffected (checkpoint is the identity on values).
@functools.partial(
    jax.checkpoint,
    policy=jax.checkpoint_policies.save_only_these_names(_ROW_STAT),
    static_argnums=(11,),
)
def _loss_and_tangent(
    flat,
    labels,
    valid,
    elem_mask,
    alpha,
    zl,
    cap,
    flat_dot,
    alpha_dot,
    zl_dot,
    cap_dot,
    smoothing,
):
    # The tangent is linear in the tangents of the logits and of the hyperparameters,
    # with logits-sized coefficient `grad` and per-row coefficients.
    loss, grad, d_alpha, d_zl, d_cap = _row_stats(
        flat, labels, valid, elem_mask, alpha, zl, cap, smoothing
    )
    loss_dot = jnp.sum(grad * flat_dot.astype(grad.dtype), axis=-1)
    loss_dot = loss_dot + d_alpha * alpha_dot + d_zl * zl_dot
    if cap is not None:
        loss_dot = loss_dot + d_cap * cap_dot
    return loss, loss_dot
