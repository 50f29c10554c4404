"""Classification losses with the signatures of ``optax.losses``.

Every function returns per-example (unreduced) values, like optax, and for every
argument optax accepts it returns optax's values and gradients. The differences are
on inputs optax would silently mishandle:

- Shapes must match exactly: ``logits`` and one-hot/soft ``labels`` have the same
  shape, integer ``labels`` have the shape of the scores without the class axis, and
  ``where`` has exactly one of the documented shapes. No broadcasting.
- Integer labels outside ``[0, num_classes)`` raise a ``ValueError`` in an eager call
  and make that example's loss NaN under ``jit`` (optax wraps or clips them).
- bf16/f16 inputs are computed in float32 and the result has the input's floating
  dtype. Integer scores (accepted where optax accepts them) give float32.
- A fully masked row gives 0 and zero gradient, never NaN.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusedloss import _ce_math, _checks
from fusedloss._reduce import reduce_loss
from fusedloss._softmax_ce import softmax_cross_entropy_with_integer_labels

__all__ = [
    "hinge_loss",
    "multiclass_hinge_loss",
    "multiclass_perceptron_loss",
    "multiclass_sparsemax_loss",
    "nll_loss",
    "perceptron_loss",
    "perplexity",
    "poly_loss_cross_entropy",
    "safe_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "sparsemax_loss",
]

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Axis = int | tuple[int, ...] | None


# ----------------------------------------------------------------------------------
# Private helpers: dtypes, shapes, masks.
# ----------------------------------------------------------------------------------


def _acc_dtype(dtype: Any) -> Any:
    # float32 accumulation for every floating dtype narrower than float64. Spelled out
    # because `promote_types(bfloat16, float32)` raises under strict dtype promotion.
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _check_real(name: str, x: Any) -> None:
    dtype = _checks.dtype_of(x)
    if not any(jnp.issubdtype(dtype, k) for k in (jnp.floating, jnp.integer, jnp.bool_)):
        raise TypeError(
            f"`{name}` must have a real (floating, integer or bool) dtype, got {dtype}."
        )


def _floating_input(name: str, x: ArrayLike) -> tuple[Array, Any]:
    """A floating input in its accumulation dtype, and the dtype to return."""
    _checks.check_floating(name, x)
    x = jnp.asarray(x)
    return x.astype(_acc_dtype(x.dtype)), x.dtype


def _score_input(name: str, x: ArrayLike) -> tuple[Array, Any]:
    """Like `_floating_input`, but integer scores (which optax accepts) become float32."""
    dtype = _checks.dtype_of(x)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(x).astype(jnp.float32), jnp.dtype(jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating or integer dtype, got {dtype}.")
    return _floating_input(name, x)


def _same_shape_input(
    name: str, x: ArrayLike, ref_name: str, ref: Array, *, floating: bool = False
) -> Array:
    """A second argument with exactly the shape of ``ref``, cast to ``ref``'s dtype."""
    if floating:
        _checks.check_floating(name, x)
    else:
        _check_real(name, x)
    _checks.check_same_shape(ref_name, ref, name, x)
    return jnp.asarray(x).astype(ref.dtype)


def _hyperparameter(
    name: str, value: ArrayLike, dtype: Any, shapes: list[tuple[int, ...]]
) -> Array:
    """A scalar (or exactly-shaped) hyperparameter cast to ``dtype``; no broadcasting."""
    _check_real(name, value)
    got = _checks.shape_of(value)
    if got != () and got not in shapes:
        options = " or ".join(str(s) for s in dict.fromkeys(shapes))
        raise ValueError(f"`{name}` must be a scalar or have shape {options}, got {got}.")
    return jnp.asarray(value).astype(dtype)


def _class_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    return _checks.check_axis("axis", axis, ndim)


def _without_axes(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _element_mask(
    where: ArrayLike | None, shape: tuple[int, ...], axes: tuple[int, ...]
) -> Array | None:
    """A per-element mask from ``where`` given per element or per example.

    Per example means the shape of the logits without the class ``axes``.
    """
    if where is None:
        return None
    _checks.check_mask("where", where, [shape, _without_axes(shape, axes)])
    where = jnp.asarray(where)
    if where.shape != shape:
        where = jnp.broadcast_to(jnp.expand_dims(where, axes), shape)
    return where


def _log_softmax(x: Array, axes: tuple[int, ...]) -> Array:
    # Shift by the (constant) max for stability, as jax.nn.log_softmax does; `initial`
    # lets an empty class axis through (its sums are 0, as in optax).
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axes, keepdims=True, initial=-jnp.inf))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axes, keepdims=True))


def _masked_log_softmax(
    x: Array, y: Array, axes: tuple[int, ...], mask: Array | None
) -> tuple[Array, Array, Array | None]:
    """Log-softmax over the included classes, with excluded entries never read.

    Returns ``(log_probs, labels, row_included)``: ``log_probs`` and ``labels`` are 0
    at excluded entries (so ``labels * log_probs`` and its gradient are exactly 0
    there, even for NaN/inf inputs), and ``row_included`` is None without a mask.
    """
    if mask is None:
        return _log_softmax(x, axes), y, None
    row_any = jnp.any(mask, axis=axes, keepdims=True)
    # A row with nothing included would have lse = -inf and a NaN backward pass
    # (0 * inf). Such rows are computed on zeros as if fully included, then zeroed.
    live = mask | ~row_any
    x = jnp.where(live, jnp.where(row_any, x, 0.0), -jnp.inf)
    log_probs = jnp.where(live, _log_softmax(x, axes), 0.0)
    y = jnp.where(live, y, 0.0)
    return log_probs, y, jnp.squeeze(row_any, axes)


def _zero_excluded_rows(loss: Array, row_included: Array | None) -> Array:
    return loss if row_included is None else jnp.where(row_included, loss, 0.0)


def _int_labels(labels: ArrayLike) -> Array:
    # Narrow integer types are widened so that comparisons with the class count
    # cannot overflow; wider ones keep their dtype so nothing is wrapped into range.
    labels = jnp.asarray(labels)
    return labels.astype(jnp.int32) if jnp.iinfo(labels.dtype).bits < 32 else labels


def _multiclass_inputs(
    scores: ArrayLike, labels: ArrayLike
) -> tuple[Array, Array, Array, Array, Any]:
    """Checks ``[..., C]`` scores against ``[...]`` integer labels.

    Returns ``(scores, is_label [..., C], label_score [...], valid [...], out_dtype)``
    where ``valid`` is False for labels outside ``[0, C)`` (callers make those NaN).
    """
    s, out_dtype = _score_input("scores", scores)
    _checks.check_ndim_at_least("scores", s, 1)
    _checks.check_integer("labels", labels)
    _checks.check_shape(
        "labels", labels, s.shape[:-1], "the shape of `scores` without its last (class) axis"
    )
    num_classes = s.shape[-1]
    _checks.check_labels_in_range("labels", labels, num_classes)
    lab = _int_labels(labels)
    valid = _ce_math.label_in_range(lab, num_classes)
    idx = jnp.where(valid, lab, 0).astype(jnp.int32)
    is_label = jax.lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1) == idx[..., None]
    label_score = jnp.take_along_axis(s, idx[..., None], axis=-1)[..., 0]
    return s, is_label, label_score, valid, out_dtype


def _nan_where_invalid(loss: Array, valid: Array) -> Array:
    # An out-of-range label cannot be rejected under jit; make it loud instead.
    return jnp.where(valid, loss, jnp.nan)


def _sparsemax(z: Array) -> Array:
    """Euclidean projection of each row of ``z [..., C]`` onto the probability simplex.

    Sort-based (Held et al. 1974): the support is the ``k`` largest entries with
    ``1 + k u_k > sum_{j<=k} u_j``; the threshold is ``(sum_{j<=k} u_j - 1) / k``.
    """
    u = jnp.flip(jnp.sort(z, axis=-1), axis=-1)
    cumsum_u = jnp.cumsum(u, axis=-1)
    k = jax.lax.broadcasted_iota(z.dtype, z.shape, z.ndim - 1) + 1.0
    # Same test as optax (1/k + u - cumsum/k > 0) so the supports agree at near-ties.
    support_size = jnp.sum(1.0 / k + (u - cumsum_u / k) > 0, axis=-1, keepdims=True)
    support_size = jnp.maximum(support_size, 1)  # all-NaN rows: NaN flows via cumsum_u
    tau_sum = jnp.take_along_axis(cumsum_u, support_size - 1, axis=-1)
    kf = support_size.astype(z.dtype)
    return jnp.maximum(1.0 / kf + (z - tau_sum / kf), 0.0)


# ----------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------

# softmax_cross_entropy_with_integer_labels (fused, custom VJP) lives in _softmax_ce.py
# beside the shared CE math and is re-exported from this module.


def sigmoid_binary_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
    """Element-wise sigmoid cross-entropy, as ``optax.losses.sigmoid_binary_cross_entropy``.

    ``-labels * log(sigmoid(logits)) - (1 - labels) * log(1 - sigmoid(logits))``.

    Args:
      logits: floating array ``[...]`` of unnormalized log-odds of the positive class.
      labels: binary labels ``{0, 1}`` or target probabilities, with exactly the shape
        of ``logits`` (floating, integer or bool).

    Returns:
      Cross-entropy per element, shape ``[...]`` of ``logits`` and its dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> logits = jnp.array([2.0, -1.0, 0.0])
      >>> labels = jnp.array([1.0, 1.0, 0.5])
      >>> print(classification.sigmoid_binary_cross_entropy(logits, labels))
      [0.126... 1.313... 0.693...]
    """
    x, out_dtype = _floating_input("logits", logits)
    y = _same_shape_input("labels", labels, "logits", x)
    # log(1 - sigmoid(x)) = log_sigmoid(-x): both terms via log_sigmoid, which never
    # forms sigmoid(x) and so stays accurate for large |x| (no log(0) or 1 - 1).
    loss = -y * jax.nn.log_sigmoid(x) - (1.0 - y) * jax.nn.log_sigmoid(-x)
    return loss.astype(out_dtype)


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike | None = None,
    gamma: ArrayLike = 2.0,
) -> Array:
    r"""Sigmoid focal loss (Lin et al. 2017), as ``optax.losses.sigmoid_focal_loss``.

    ``alpha_t * (1 - p_t) ** gamma * BCE(logits, labels)`` with ``p = sigmoid(logits)``,
    ``p_t = labels * p + (1 - labels) * (1 - p)`` and
    ``alpha_t = alpha * labels + (1 - alpha) * (1 - labels)`` (1 when ``alpha`` is None).

    Args:
      logits: floating array ``[...]`` of unnormalized log-odds.
      labels: labels in ``{0, 1}`` or soft targets in ``[0, 1]``, with exactly the
        shape of ``logits``.
      alpha: optional weight of the positive class (scalar or the shape of
        ``logits``); None means no weighting.
      gamma: focusing exponent (scalar or the shape of ``logits``).

    Returns:
      Focal loss per element, shape ``[...]`` of ``logits`` and its dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> logits = jnp.array([2.0, -1.0])
      >>> labels = jnp.array([1.0, 1.0])
      >>> print(classification.sigmoid_focal_loss(logits, labels, alpha=0.25))
      [0.00045... 0.17546...]
    """
    x, out_dtype = _floating_input("logits", logits)
    y = _same_shape_input("labels", labels, "logits", x)
    gamma = _hyperparameter("gamma", gamma, x.dtype, [x.shape])
    if alpha is not None:
        alpha = _hyperparameter("alpha", alpha, x.dtype, [x.shape])
    log_p = jax.nn.log_sigmoid(x)
    log_q = jax.nn.log_sigmoid(-x)
    ce = -y * log_p - (1.0 - y) * log_q
    # (1 - p_t) ** gamma in log space: log(1 - p_t) = log((1 - y) p + y (1 - p)) as a
    # weighted two-term log-sum-exp of log p and log(1 - p). It neither underflows to
    # 0 ** gamma (infinite gradient for gamma < 1) nor cancels in 1 - p_t for large
    # |logits|. Terms with zero weight are dropped (-inf) so they pass no gradient.
    a_p = jnp.where(y != 1.0, log_p, -jnp.inf)
    a_q = jnp.where(y != 0.0, log_q, -jnp.inf)
    m = jnp.maximum(a_p, a_q)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    s = (1.0 - y) * jnp.exp(a_p - m) + y * jnp.exp(a_q - m)
    # Soft labels outside [0, 1] can make s negative: NaN, as its log would be.
    log_one_minus_pt = jnp.where(s < 0, jnp.nan, jnp.log(jnp.abs(s)) + m)
    loss = ce * jnp.exp(gamma * log_one_minus_pt)
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return loss.astype(out_dtype)


def hinge_loss(predictor_outputs: ArrayLike, targets: ArrayLike) -> Array:
    """Binary hinge loss ``max(0, 1 - predictor_outputs * targets)``.

    Args:
      predictor_outputs: scores ``[...]`` of the decision function (floating or
        integer).
      targets: targets in ``{-1, 1}`` with exactly the shape of ``predictor_outputs``.

    Returns:
      Hinge loss per element, shape ``[...]``, in the floating dtype of
      ``predictor_outputs`` (float32 for integer scores).

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> scores = jnp.array([2.0, 0.5, -0.5])
      >>> targets = jnp.array([1.0, 1.0, 1.0])
      >>> print(classification.hinge_loss(scores, targets))
      [0.  0.5 1.5]
    """
    s, out_dtype = _score_input("predictor_outputs", predictor_outputs)
    t = _same_shape_input("targets", targets, "predictor_outputs", s)
    return jnp.maximum(0.0, 1.0 - s * t).astype(out_dtype)


def perceptron_loss(predictor_outputs: ArrayLike, targets: ArrayLike) -> Array:
    """Binary perceptron loss ``max(0, -predictor_outputs * targets)``.

    Args:
      predictor_outputs: scores ``[...]`` produced by the model (floating or integer).
      targets: targets in ``{-1, 1}`` with exactly the shape of ``predictor_outputs``.

    Returns:
      Perceptron loss per element, shape ``[...]``, in the floating dtype of
      ``predictor_outputs`` (float32 for integer scores).

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> scores = jnp.array([2.0, -0.5])
      >>> targets = jnp.array([1.0, 1.0])
      >>> print(classification.perceptron_loss(scores, targets))
      [0.  0.5]
    """
    s, out_dtype = _score_input("predictor_outputs", predictor_outputs)
    t = _same_shape_input("targets", targets, "predictor_outputs", s)
    return jnp.maximum(0.0, -s * t).astype(out_dtype)


def sparsemax_loss(logits: ArrayLike, labels: ArrayLike) -> Array:
    """Binary sparsemax loss (Blondel et al. 2020), as ``optax.losses.sparsemax_loss``.

    ``sparse_plus(-logits)`` where ``labels`` is nonzero, ``sparse_plus(logits)``
    elsewhere; zero if and only if ``jax.nn.sparse_sigmoid(logits) == labels``.

    Args:
      logits: scores ``[...]`` produced by the model (floating or integer).
      labels: labels in ``{0, 1}`` (any nonzero value counts as 1), with exactly the
        shape of ``logits``.

    Returns:
      Loss per element, shape ``[...]``, in the floating dtype of ``logits``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> logits = jnp.array([2.0, 0.0, -3.0])
      >>> labels = jnp.array([1, 1, 1])
      >>> print(classification.sparsemax_loss(logits, labels))
      [0.   0.25 3.  ]
    """
    x, out_dtype = _score_input("logits", logits)
    _check_real("labels", labels)
    _checks.check_same_shape("logits", x, "labels", labels)
    z = jnp.where(jnp.asarray(labels) != 0, -x, x)
    # sparse_plus: 0 below -1, x above 1, the quadratic (x + 1)^2 / 4 in between.
    loss = jnp.where(z <= -1.0, 0.0, jnp.where(z >= 1.0, z, 0.25 * (z + 1.0) ** 2))
    return loss.astype(out_dtype)


def multiclass_hinge_loss(scores: ArrayLike, labels: ArrayLike) -> Array:
    """Multiclass hinge loss ``max_j (scores_j + 1 - [j == label]) - scores_label``.

    Args:
      scores: scores ``[..., num_classes]`` (floating or integer).
      labels: integer labels ``[...]`` in ``[0, num_classes)``.

    Returns:
      Loss per example, shape ``[...]``, in the floating dtype of ``scores``. An
      out-of-range label raises ``ValueError`` in an eager call and gives NaN under
      ``jit``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> scores = jnp.array([[3.0, 1.0, 0.0], [0.0, 1.0, 0.5]])
      >>> print(classification.multiclass_hinge_loss(scores, jnp.array([0, 0])))
      [0. 2.]
    """
    s, is_label, label_score, valid, out_dtype = _multiclass_inputs(scores, labels)
    # The label's own term is s_y exactly (optax's (s_y + 1) - 1 can round), so a
    # satisfied margin gives exactly 0.
    margin = jnp.where(is_label, s, s + 1.0)
    loss = jnp.max(margin, axis=-1) - label_score
    return _nan_where_invalid(loss, valid).astype(out_dtype)


def multiclass_perceptron_loss(scores: ArrayLike, labels: ArrayLike) -> Array:
    """Multiclass perceptron loss ``max_j scores_j - scores_label``.

    Args:
      scores: scores ``[..., num_classes]`` (floating or integer).
      labels: integer labels ``[...]`` in ``[0, num_classes)``.

    Returns:
      Loss per example, shape ``[...]``, in the floating dtype of ``scores``. An
      out-of-range label raises ``ValueError`` in an eager call and gives NaN under
      ``jit``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> scores = jnp.array([[3.0, 1.0, 0.0], [0.0, 1.0, 0.5]])
      >>> print(classification.multiclass_perceptron_loss(scores, jnp.array([0, 0])))
      [0. 1.]
    """
    s, _, label_score, valid, out_dtype = _multiclass_inputs(scores, labels)
    loss = jnp.max(s, axis=-1) - label_score
    return _nan_where_invalid(loss, valid).astype(out_dtype)


def multiclass_sparsemax_loss(scores: ArrayLike, labels: ArrayLike) -> Array:
    """Multiclass sparsemax loss (Martins & Astudillo 2016).

    With ``p = sparsemax(scores)`` (the Euclidean projection onto the simplex), the
    loss is ``<p, scores - scores_label> + (1 - <p, p>) / 2``. Its gradient with
    respect to ``scores`` is ``p - one_hot(label)``.

    Unlike optax, which accepts only ``[batch, num_classes]``, any number of leading
    axes is accepted.

    Args:
      scores: scores ``[..., num_classes]`` (floating or integer).
      labels: integer labels ``[...]`` in ``[0, num_classes)``.

    Returns:
      Loss per example, shape ``[...]``, in the floating dtype of ``scores``. An
      out-of-range label raises ``ValueError`` in an eager call and gives NaN under
      ``jit``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> scores = jnp.array([[3.0, 1.0, 0.0], [0.0, 1.0, 0.5]])
      >>> print(classification.multiclass_sparsemax_loss(scores, jnp.array([0, 0])))
      [0.     1.0625]
    """
    s, is_label, _, valid, out_dtype = _multiclass_inputs(scores, labels)
    return _nan_where_invalid(_sparsemax_loss(s, is_label), valid).astype(out_dtype)


@jax.custom_jvp
def _sparsemax_loss(s: Array, is_label: Array) -> Array:
    return _sparsemax_loss_given_p(s, _sparsemax(s), is_label)


def _sparsemax_loss_given_p(s: Array, p: Array, is_label: Array) -> Array:
    # Shifted by the label score (shift-invariant, exact 0 at the label) and read
    # only on the support, so -inf scores outside it do not give 0 * inf.
    label_score = jnp.sum(jnp.where(is_label, s, 0.0), axis=-1, keepdims=True)
    shifted = jnp.where((p > 0) & ~is_label, s - label_score, 0.0)
    return jnp.sum(p * shifted, axis=-1) + 0.5 * (1.0 - jnp.sum(p * p, axis=-1))


@_sparsemax_loss.defjvp
def _sparsemax_loss_jvp(
    primals: tuple[Array, Array], tangents: tuple[Array, Array]
) -> tuple[Array, Array]:
    # p is optimal for the max in the loss's Fenchel-conjugate form, so by the envelope
    # theorem d loss / d s = p - e_y. p itself stays differentiable here, so second
    # derivatives (the Jacobian of sparsemax) are right too.
    s, is_label = primals
    s_dot, _ = tangents
    p = _sparsemax(s)
    grad = p - is_label.astype(s.dtype)
    return _sparsemax_loss_given_p(s, p, is_label), jnp.sum(grad * s_dot, axis=-1)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> Array:
    """Softmax cross-entropy with one-hot or soft labels.

    ``-sum_j labels_j * log_softmax(logits)_j`` over the class ``axis``, as
    ``optax.losses.softmax_cross_entropy``.

    Args:
      logits: floating unnormalized log-probabilities ``[..., num_classes]``.
      labels: one-hot labels or probability distributions with exactly the shape of
        ``logits`` (floating, integer or bool).
      axis: class axis or axes (None: all axes, giving a scalar).
      where: optional boolean mask, True = include: per example (the shape of
        ``logits`` without ``axis``) or per element (the shape of ``logits``: excluded
        classes take no part in the normalizer or the sum). A row with nothing
        included gives 0 and zero gradient.

    Returns:
      Cross-entropy per example, shape ``[...]`` (``logits`` without ``axis``), in the
      dtype of ``logits``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(classification.softmax_cross_entropy(logits, labels))
      [0.276... 2.951...]
      >>> where = jnp.array([True, False])
      >>> print(classification.softmax_cross_entropy(logits, labels, where=where))
      [0.276... 0. ]
    """
    x, out_dtype = _floating_input("logits", logits)
    y = _same_shape_input("labels", labels, "logits", x)
    axes = _class_axes(axis, x.ndim)
    mask = _element_mask(where, x.shape, axes)
    log_probs, y, row_included = _masked_log_softmax(x, y, axes, mask)
    loss = -jnp.sum(y * log_probs, axis=axes)
    return _zero_excluded_rows(loss, row_included).astype(out_dtype)


@jax.custom_jvp
def _weighted_log_softmax(x: Array, w: Array) -> Array:
    """``w * log_softmax(x)`` over the last axis, with ``0 * log 0 = 0``."""
    return jnp.where(w != 0.0, w * _log_softmax(x, (x.ndim - 1,)), 0.0)


@_weighted_log_softmax.defjvp
def _weighted_log_softmax_jvp(
    primals: tuple[Array, Array], tangents: tuple[Array, Array]
) -> tuple[Array, Array]:
    # Written out (as in optax) so that x = -inf with w = 0 has a finite x-gradient:
    # plain autodiff would multiply through the -inf log-probability.
    x, w = primals
    x_dot, w_dot = tangents
    log_probs = _log_softmax(x, (x.ndim - 1,))
    out = jnp.where(w != 0.0, w * log_probs, 0.0)
    probs = jnp.exp(log_probs)
    out_dot = w * x_dot - w * jnp.sum(x_dot * probs, axis=-1, keepdims=True) + w_dot * log_probs
    return out, out_dot


def safe_softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
    """Softmax cross-entropy over the last axis, with ``0 * log 0 = 0``.

    Unlike :func:`softmax_cross_entropy`, a class with ``logits = -inf`` and
    ``labels = 0`` contributes 0 (not NaN) to the value and the gradient, as
    ``optax.losses.safe_softmax_cross_entropy``.

    Args:
      logits: floating unnormalized log-probabilities ``[..., num_classes]``.
      labels: probability distributions with exactly the shape of ``logits``.

    Returns:
      Cross-entropy per example, shape ``[...]``, in the dtype of ``logits``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> logits = jnp.array([[-jnp.inf, 0.0, 0.0]])
      >>> labels = jnp.array([[0.0, 1.0, 0.0]])
      >>> print(classification.safe_softmax_cross_entropy(logits, labels))
      [0.693...]
    """
    x, out_dtype = _floating_input("logits", logits)
    _checks.check_ndim_at_least("logits", x, 1)
    y = _same_shape_input("labels", labels, "logits", x)
    return (-jnp.sum(_weighted_log_softmax(x, y), axis=-1)).astype(out_dtype)


def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    epsilon: ArrayLike = 2.0,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> Array:
    """Poly-1 loss (Leng et al. 2022): ``CE + epsilon * (1 - p_t)``.

    ``p_t = sum_j labels_j * softmax(logits)_j`` over the class ``axis``, as
    ``optax.losses.poly_loss_cross_entropy``.

    Args:
      logits: floating unnormalized log-probabilities ``[..., num_classes]``.
      labels: floating probability distributions with exactly the shape of
        ``logits``.
      epsilon: coefficient of the first polynomial term (scalar or the output shape).
      axis: class axis or axes (None: all axes, giving a scalar).
      where: optional boolean mask, True = include, per element (the shape of
        ``logits``; what optax accepts) or per example (``logits`` without ``axis``).
        A row with nothing included gives 0 and zero gradient.

    Returns:
      Poly loss per example, shape ``[...]`` (``logits`` without ``axis``), in the
      dtype of ``logits``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(classification.poly_loss_cross_entropy(logits, labels, epsilon=1.0))
      [0.517... 3.899...]
    """
    x, out_dtype = _floating_input("logits", logits)
    y = _same_shape_input("labels", labels, "logits", x, floating=True)
    axes = _class_axes(axis, x.ndim)
    out_shape = _without_axes(x.shape, axes)
    epsilon = _hyperparameter("epsilon", epsilon, x.dtype, [out_shape])
    mask = _element_mask(where, x.shape, axes)
    log_probs, y, row_included = _masked_log_softmax(x, y, axes, mask)
    cross_entropy = -jnp.sum(y * log_probs, axis=axes)
    one_minus_pt = jnp.sum(y * (1.0 - jnp.exp(log_probs)), axis=axes)
    loss = cross_entropy + epsilon * one_minus_pt
    return _zero_excluded_rows(loss, row_included).astype(out_dtype)


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
) -> Array:
    """Negative log-likelihood of integer labels given log-probabilities.

    ``-log_probs[..., label]``: the loss of PyTorch's ``nll_loss`` with
    ``reduction="none"``. No normalization is applied; pass ``log_softmax`` outputs.
    optax has no counterpart.

    Args:
      log_probs: floating log-probabilities ``[..., num_classes]``.
      labels: integer labels with the shape of ``log_probs`` without ``axis``. With a
        tuple ``axis`` a label is a flat (C-order) index into the class axes, taken in
        the order given.
      axis: class axis or axes.
      where: optional boolean mask with the shape of ``labels``, True = include.
      ignore_index: labels equal to it are excluded (e.g. ``-100``).

    Returns:
      Loss per example, shape of ``labels``, in the dtype of ``log_probs``. Excluded
      examples give 0 and zero gradient. An included label outside
      ``[0, num_classes)`` raises ``ValueError`` in an eager call and gives NaN under
      ``jit``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> log_probs = jax.nn.log_softmax(jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]]))
      >>> labels = jnp.array([0, -100])
      >>> print(classification.nll_loss(log_probs, labels, ignore_index=-100))
      [0.276... 0. ]
    """
    _checks.check_floating("log_probs", log_probs)
    _checks.check_integer("labels", labels)
    lp = jnp.asarray(log_probs)
    _checks.check_ndim_at_least("log_probs", lp, 1)
    axes = _checks.check_axis("axis", axis, lp.ndim)
    batch_shape = _without_axes(lp.shape, axes)
    _checks.check_shape(
        "labels", labels, batch_shape, "the shape of `log_probs` without its class axis"
    )
    if where is not None:
        _checks.check_mask("where", where, [batch_shape])
    if ignore_index is not None and not isinstance(ignore_index, int | np.integer):
        raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")

    if isinstance(axis, tuple):
        # Move the class axes last, in the order given, and flatten them.
        given = _checks.check_axis_in_order("axis", axis, lp.ndim)
        batch_axes = tuple(i for i in range(lp.ndim) if i not in axes)
        lp = jnp.transpose(lp, batch_axes + given).reshape((*batch_shape, -1))
        class_axis = lp.ndim - 1
    else:
        class_axis = axes[0]
    num_classes = lp.shape[class_axis]
    _checks.check_labels_in_range(
        "labels", labels, num_classes, ignore_index=ignore_index, mask=where
    )

    lab = _int_labels(labels)
    include = jnp.ones(lab.shape, bool) if where is None else jnp.asarray(where)
    if ignore_index is not None:
        include = include & (lab != int(ignore_index))
    valid = _ce_math.label_in_range(lab, num_classes)
    idx = jnp.where(valid, lab, 0).astype(jnp.int32)
    # Gather in the input dtype, then widen: only one value per example is read.
    picked = jnp.take_along_axis(lp, jnp.expand_dims(idx, class_axis), axis=class_axis)
    loss = -jnp.squeeze(picked, class_axis).astype(_acc_dtype(lp.dtype))
    loss = _ce_math.nan_if_bad_label(loss, lab, num_classes, include)
    return jnp.where(include, loss, 0.0).astype(lp.dtype)


def smooth_labels(
    labels: ArrayLike,
    alpha: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> Array:
    """Label smoothing ``(1 - alpha) * labels + alpha / num_classes``.

    As ``optax.losses.smooth_labels``: with ``where``, ``num_classes`` counts the
    included classes of each row (excluded entries are smoothed with that count too,
    as in optax). Unlike optax (which divides by zero), a row with nothing included
    gives 0 and zero gradient.

    Args:
      labels: floating one-hot labels ``[..., num_classes]``.
      alpha: smoothing factor: a scalar, or an array of the shape of ``labels`` or of
        ``labels`` with ``axis`` of size 1.
      axis: class axis or axes (None: all axes).
      where: optional boolean mask with the shape of ``labels``, True = include.

    Returns:
      Smoothed labels with the shape and dtype of ``labels``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> labels = jnp.array([[0.0, 1.0, 0.0, 0.0]])
      >>> print(classification.smooth_labels(labels, 0.2))
      [[0.05 0.85 0.05 0.05]]
    """
    y, out_dtype = _floating_input("labels", labels)
    axes = _class_axes(axis, y.ndim)
    kept = tuple(1 if i in axes else d for i, d in enumerate(y.shape))
    alpha = _hyperparameter("alpha", alpha, y.dtype, [y.shape, kept])
    if where is None:
        num_classes = 1
        for a in axes:
            num_classes *= y.shape[a]
        return ((1.0 - alpha) * y + alpha / num_classes).astype(out_dtype)
    _checks.check_mask("where", where, [y.shape])
    num_classes = jnp.sum(jnp.asarray(where), axis=axes, keepdims=True, dtype=y.dtype)
    any_included = num_classes > 0
    safe = jnp.where(any_included, num_classes, 1.0)
    out = (1.0 - alpha) * y + alpha / safe
    return jnp.where(any_included, out, 0.0).astype(out_dtype)


def perplexity(
    losses: ArrayLike,
    where: ArrayLike | None = None,
    *,
    weights: ArrayLike | None = None,
) -> Array:
    """Perplexity ``exp(mean loss)`` from per-token negative log-likelihoods.

    The mean is the weighted mean over included tokens,
    ``sum(weights * losses) / sum(weights)`` (see :func:`fusedloss.reduce_loss`),
    accumulated in float32 and exponentiated before casting back. With nothing
    included (or zero total weight) the mean is 0 and the perplexity 1, with zero
    gradient.

    Args:
      losses: floating per-token losses (natural log), any shape ``[...]``, e.g. from
        :func:`nll_loss` or ``softmax_cross_entropy_with_integer_labels``.
      where: optional boolean mask with the shape of ``losses``, True = include.
      weights: optional floating per-token weights with the shape of ``losses``.

    Returns:
      A scalar in the dtype of ``losses``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusedloss import classification
      >>> losses = jnp.array([1.0, 3.0, 100.0])
      >>> print(classification.perplexity(losses, jnp.array([True, True, False])))
      7.389...
    """
    x, out_dtype = _floating_input("losses", losses)
    mean = reduce_loss(x, "mean", where=where, weights=weights)
    return jnp.exp(mean).astype(out_dtype)
