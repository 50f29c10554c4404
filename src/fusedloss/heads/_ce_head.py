"""The cross-entropy head on the engine: statistics -> loss, and its aux outputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fusedloss import _ce_math
from fusedloss.heads import xla
from fusedloss.heads._engine import (
    HeadOutput,
    Hyper,
    Problem,
    cross_entropy_from_stats,
    side_outputs,
)
from fusedloss.heads._registry import Choice, dispatch, run_stats
from fusedloss.heads._tokens import Tokens, psum_over


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyAux:
    """Per-token side outputs of :func:`~fusedloss.linear_cross_entropy` (not
    differentiable).

    Attributes:
      lse: float32 log-sum-exp of each token's (softcapped) logits, with the shape
        of the (shifted) labels (0 for excluded tokens); ``label logprob = -loss``
        for plain CE, and ``lse`` is what z-loss penalizes.
      correct: bool, the argmax of the logits equals the label (False for excluded
        tokens); ``correct.sum() / num_tokens`` is the accuracy.
      label_logit: float32 (softcapped) logit of each token's label (0 for excluded
        tokens): ``lse - label_logit`` is the token's negative log-likelihood, also
        with label smoothing and z-loss.
      predicted: int32 argmax id of each token's logits (the first of ties), -1 for
        excluded tokens.
      token_weights: float32 weight of each token in the reduction (its ``weights``
        entry, or 1), 0 for excluded tokens; ``weight_sum`` is their sum.
      num_tokens: int32 scalar, the number of included tokens (``where`` and
        ``ignore_index`` applied); with ``reduction="sum"`` it lets gradient
        accumulation normalize by the global token count.
      weight_sum: float32 scalar, the sum of the included tokens' weights (the
        denominator of ``reduction="mean"``; equals ``num_tokens`` without weights).
      implementation: the implementation that ran (static); for a program whose
        platform is decided at compile time, ``platform_dependent(...)`` names the
        choice per platform.
    """

    lse: jax.Array
    correct: jax.Array
    num_tokens: jax.Array
    weight_sum: jax.Array
    label_logit: jax.Array
    predicted: jax.Array
    token_weights: jax.Array
    implementation: str = dataclasses.field(default="", metadata={"static": True})


def _empty(tokens: Tokens, per_token: bool) -> HeadOutput:
    f32 = tokens.coef.dtype
    zeros = jnp.zeros((0,), f32)
    ids = jnp.zeros((0,), jnp.int32)
    return HeadOutput(zeros if per_token else jnp.zeros((), f32), zeros, zeros, ids)


def local_cross_entropy(
    tokens: Tokens,
    w,
    w_vd: bool,
    bias,
    hp: Hyper,
    *,
    per_token: bool,
    implementation,
    config,
) -> tuple[HeadOutput, str]:
    """The cross-entropy of one device's tokens over the whole vocabulary ``w``."""
    n, d = tokens.x.shape
    v = w.shape[0] if w_vd else w.shape[1]
    problem = Problem(max(n, 1), d, v, tokens.x.dtype, w_vd, per_token, hp)

    def run(choice: Choice) -> HeadOutput:
        if n == 0:  # nothing to stream: 0 / empty, and zero gradients
            return _empty(tokens, per_token)
        args = (tokens.x, w, bias, tokens.labels, tokens.valid)
        if choice.name == "xla" and choice.plan.strategy == "grad_in_forward":
            return xla.gif_cross_entropy(*args, tokens.coef, hp, choice.plan)
        with jax.named_scope(f"fusedloss_{choice.name}"):
            stats = choice.backend.stats(*args, jnp.int32(0), hp, choice.plan)
        return cross_entropy_from_stats(
            stats, tokens.labels, tokens.valid, tokens.coef, hp, v, per_token
        )

    return dispatch(implementation, config, problem, run, tokens.x, w)


def reweighted_cross_entropy(
    tokens: Tokens,
    w,
    w_vd: bool,
    bias,
    hp: Hyper,
    class_weights: jax.Array | None,
    token_scaling: bool,
    *,
    per_token: bool,
    mean: bool,
    implementation,
    config,
) -> tuple[HeadOutput, str]:
    """Cross-entropy with class weights (PyTorch's semantics) and/or each token's loss
    scaled by its own detached label probability (DFT), on the engine's statistics.

    With class weights ``c`` and smoothing ``a``, a token's loss is
    ``c_y (1 - a) (lse - s_y) + (a / V) sum_j c_j (lse - s_j) + z lse**2``; the
    ``"mean"`` divides the class-weighted part by ``sum_i t_i c_{y_i}`` and the z-loss
    by ``sum_i t_i`` (``t`` the token weights), as PyTorch and Liger Kernel do. The
    class-weighted logit sum ``sum_j c_j s_j = x . (w c) + bias . c`` is linear in
    the unsoftcapped logits, so it costs one matrix-vector product, not a pass.
    """
    v = w.shape[0] if w_vd else w.shape[1]
    a = hp.label_smoothing
    # The plain logit sum is only needed without class weights.
    stats_hp = hp._replace(label_smoothing=a if class_weights is None else 0.0)
    stats, name = run_stats(
        tokens, w, w_vd, bias, stats_hp, implementation=implementation, config=config
    )
    valid, t = tokens.valid, tokens.weights
    lse, lab = stats.lse, stats.label_logit
    if class_weights is None:
        c_y = jnp.ones_like(lse)
        ce = _ce_math.token_loss(
            lse,
            lab,
            stats.sum_logits if hp.need_sum else None,
            num_classes=v,
            label_smoothing=a,
            z_loss=0.0,
        )
    else:
        cw = jax.lax.stop_gradient(class_weights.astype(lse.dtype))
        c_y = jnp.where(valid, cw[jnp.clip(tokens.labels, 0, v - 1)], 0.0)
        ce = c_y * (1.0 - a) * (lse - lab)
        if a:
            xz = jnp.where(valid[:, None], tokens.x, jnp.zeros((), tokens.x.dtype))
            weighted_sum = _matvec(xz, _matvec(w, cw, 0 if w_vd else 1), 1)
            if bias is not None:
                weighted_sum = weighted_sum + bias.astype(lse.dtype) @ cw
            ce = ce + (a / v) * (jnp.sum(cw) * lse - weighted_sum)
    z = hp.z_loss * lse * lse
    if token_scaling:
        p_y = jax.lax.stop_gradient(jnp.exp(jnp.where(valid, lab - lse, 0.0)))
        ce, z = ce * p_y, z * p_y
    coef_z = tokens.coef
    coef_ce = coef_z
    if mean and class_weights is not None:
        denom = jnp.sum(t * c_y)
        coef_ce = jnp.where(denom == 0, 0.0, t / jnp.where(denom == 0, 1.0, denom))
    loss = jnp.where(valid, coef_ce * ce + coef_z * z, 0.0)
    loss = _ce_math.nan_if_bad_label(loss, tokens.labels, v, valid)
    side = side_outputs(valid, lse, lab, stats.argmax)
    return HeadOutput(loss if per_token else jnp.sum(loss), *side), name


def _matvec(m: jax.Array, vec: jax.Array, axis: int) -> jax.Array:
    """``m`` contracted with the float32 ``vec`` along ``axis``, accumulated in float32
    without a float32 copy of ``m``: a low-precision ``m`` meets ``vec`` split into two
    parts of its dtype (``hi + lo``), which keeps ``vec`` to about 16 bits."""
    dims = (((axis,), (0,)), ((), ()))
    f32 = vec.dtype
    if m.dtype == f32:
        return jax.lax.dot_general(m, vec, dims, precision=jax.lax.Precision.HIGHEST)
    hi = vec.astype(m.dtype)
    lo = (vec - hi.astype(f32)).astype(m.dtype)
    return sum(jax.lax.dot_general(m, p, dims, preferred_element_type=f32) for p in (hi, lo))


def finish(
    out: HeadOutput,
    tokens: Tokens,
    implementation: str,
    *,
    per_token: bool,
    dtype,
    return_aux: bool,
    data_axes: tuple[str, ...] = (),
):
    """The loss in the caller's token shape (and the aux outputs)."""
    if per_token:
        loss = out.loss.reshape(tokens.shape).astype(dtype)
    else:
        loss = psum_over(out.loss, data_axes)
    if not return_aux:
        return loss
    shaped = lambda a: a.reshape(tokens.shape)
    aux = LinearCrossEntropyAux(
        lse=shaped(out.lse),
        correct=shaped((out.predicted == tokens.labels) & tokens.valid),
        num_tokens=tokens.num_tokens,
        weight_sum=tokens.weight_sum,
        label_logit=shaped(out.label_logit),
        predicted=shaped(out.predicted),
        token_weights=shaped(tokens.weights),
        implementation=implementation,
    )
    return loss, aux
