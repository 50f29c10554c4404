"""The cross-entropy head on the engine: statistics -> loss, and its aux outputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fusedloss.heads import xla
from fusedloss.heads._engine import HeadOutput, Hyper, Problem, cross_entropy_from_stats
from fusedloss.heads._registry import Choice, dispatch
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
