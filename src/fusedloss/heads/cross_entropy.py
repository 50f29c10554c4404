"""Public ``linear_cross_entropy``: checks, then one call into the engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax

from fusedloss import _checks
from fusedloss.heads import sharded
from fusedloss.heads._ce_head import (
    LinearCrossEntropyAux,
    finish,
    local_cross_entropy,
    reweighted_cross_entropy,
)
from fusedloss.heads._engine import Hyper
from fusedloss.heads._tokens import check_head_args, check_options, check_shift, prepare_tokens
from fusedloss.heads.transposed import Transposed

Implementation = Literal["xla", "reference", "pallas_gpu", "pallas_tpu"]


def linear_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike | Transposed,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: Literal["none", "sum", "mean"] = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    shift: int = 0,
    class_weights: jax.typing.ArrayLike | None = None,
    token_scaling: bool = False,
    return_aux: bool = False,
    implementation: Implementation | Sequence[Implementation] | None = None,
    config: Any = None,
) -> jax.Array | tuple[jax.Array, LinearCrossEntropyAux]:
    r"""Softmax cross-entropy of ``x @ w (+ bias)`` without materializing the logits.

    Equal to ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels)``
    reduced as asked, but the chunked implementations never hold the
    ``[tokens, vocab]`` logits, forward or backward. Matmuls take the inputs' dtype
    and accumulate in float32; all softmax math is float32.

    Args:
      x: hidden states ``[..., D]``, float32 / bfloat16 / float16.
      w: classifier kernel ``[D, V]`` with ``x``'s dtype (flax ``Dense`` layout), or
        :class:`~fusedloss.Transposed` ``(embedding)`` for a ``[V, D]`` tied
        embedding (read as stored: no copy of ``w``).
      labels: integer target ids with shape ``x.shape[:-1]``.
      bias: optional ``[V]`` float bias.
      where: optional bool mask with the shape of ``labels``; True = include.
      weights: optional float per-token weights with the shape of ``labels``
        (treated as constants: no gradient flows to them).
      ignore_index: tokens whose label equals it are excluded (e.g. ``-100``).
      reduction: ``"none"`` (per-token losses times weights, 0 where excluded, in
        ``x``'s dtype), ``"sum"`` or ``"mean"`` (weighted mean over included
        tokens, 0 if none is included), both float32 scalars.
      label_smoothing: in ``[0, 1)``; the target mixes in ``label_smoothing / V``
        on every class.
      z_loss: adds ``z_loss * lse**2`` per included token.
      logit_softcap: if set, logits become ``c * tanh(logits / c)``.
      shift: ``x[..., :-shift, :]`` predicts ``labels[..., shift:]`` (next-token
        prediction with ``shift=1``); ``where``/``weights`` align with ``labels``.
      class_weights: optional float ``[V]`` per-class weights (constants), with
        PyTorch's ``CrossEntropyLoss(weight=...)`` semantics: a token's loss is
        ``c_y (1 - a) (lse - s_y) + (a / V) sum_j c_j (lse - s_j)`` (``a`` the label
        smoothing) and ``"mean"`` divides by ``sum_i t_i c_{y_i}`` (``t`` the token
        weights); the z-loss term is not class-weighted and its mean is over the
        tokens (as in Liger Kernel's ``ce_weight``). With label smoothing the
        class-weighted logit sum is linear in ``x @ w``: ``logit_softcap`` cannot
        be combined with both.
      token_scaling: scale each token's loss (z-loss included) by its own label
        probability ``softmax(logits)[y]``, treated as a constant (DFT; Liger
        Kernel's ``use_token_scaling``); the ``"mean"`` denominator is unchanged.
      return_aux: also return a :class:`LinearCrossEntropyAux`.
      implementation: ``None`` (best for the platform and chip the program is
        compiled for, falling back in order),
        ``"xla"`` (chunked, every backend), ``"reference"`` (materialized),
        ``"pallas_gpu"``, ``"pallas_tpu"``, or a sequence tried in order.
      config: the implementation's tuning dataclass, e.g. :class:`XlaConfig`; a
        config that no candidate implementation takes is an error.

    Inputs split over ``Explicit`` mesh axes (the first axis of ``x`` over data axes,
    the columns of ``w`` over model axes) run per shard, as
    :func:`~fusedloss.heads.sharded.sharded_linear_cross_entropy` on
    those axes (each device runs the statistics core chosen for its chip).

    Returns:
      The loss (``labels``' shape for ``"none"``, else a scalar), and the aux
      outputs if ``return_aux``. An included token whose label lies outside
      ``[0, V)`` makes the loss NaN under ``jit``; an eager call raises instead.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> kx, kw, kl = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(kx, (2, 8, 16))  # [batch, seq, D]
      >>> w = jax.random.normal(kw, (16, 1000)) / 4  # [D, V]
      >>> labels = jax.random.randint(kl, (2, 8), 0, 1000)
      >>> loss = fusedloss.linear_cross_entropy(x, w, labels, shift=1)
      >>> ref = fusedloss.softmax_cross_entropy_with_integer_labels(
      ...     x[:, :-1] @ w, labels[:, 1:]).mean()
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5))
      True
      >>> loss, grads = jax.value_and_grad(fusedloss.linear_cross_entropy, (0, 1))(x, w, labels)
      >>> grads[1].shape
      (16, 1000)
    """
    args = check_head_args(x, w, labels, bias, where, weights, "[V], V = w.shape[1]")
    hp = check_options(reduction, label_smoothing, z_loss, logit_softcap, ignore_index, shift)
    check_shift(args.x, shift)
    kw = dict(ignore_index=ignore_index, reduction=reduction, shift=shift)
    class_weights = check_reweighting(class_weights, token_scaling, hp, args.vocab_size)
    reweighted = class_weights is not None or token_scaling
    split = None if implementation == "reference" else sharded.explicit_split(args)
    if split is not None and reweighted:
        raise NotImplementedError(
            "`class_weights` and `token_scaling` run on one device's arrays; for inputs "
            "split over mesh axes, gather them or use a shard_map of this call."
        )
    if split is not None:  # inputs split over Explicit mesh axes: run per shard
        mesh, data, model = split
        head = sharded.cross_entropy_head(
            hp, reduction=reduction, ignore_index=ignore_index, return_aux=return_aux
        )
        return sharded.run_sharded(
            args, head, mesh, data, model, shift=shift, implementation=implementation, config=config
        )
    tokens = prepare_tokens(
        args.x, args.labels, args.where, args.weights, vocab_size=args.vocab_size, **kw
    )
    per_token = reduction == "none"
    head = (args.w, args.w_vd, args.bias, hp)
    run = dict(per_token=per_token, implementation=implementation, config=config)
    if reweighted:
        out, name = reweighted_cross_entropy(
            tokens, *head, class_weights, token_scaling, mean=reduction == "mean", **run
        )
    else:
        out, name = local_cross_entropy(tokens, *head, **run)
    return finish(out, tokens, name, per_token=per_token, dtype=args.x.dtype, return_aux=return_aux)


def check_reweighting(class_weights, token_scaling, hp: Hyper, vocab_size: int):
    """The class weights as a float32 ``[V]`` array (or None), checked."""
    if not isinstance(token_scaling, bool):
        raise TypeError(f"`token_scaling` must be a bool, got {token_scaling!r}.")
    if class_weights is None:
        return None
    _checks.check_floating("class_weights", class_weights)
    class_weights = jax.numpy.asarray(class_weights)
    _checks.check_shape("class_weights", class_weights, (vocab_size,), "[V], V = w.shape[1]")
    if hp.label_smoothing and hp.softcap is not None:
        raise ValueError(
            "`class_weights` with `label_smoothing` needs the class-weighted sum of the "
            "logits, which `logit_softcap` makes nonlinear in x @ w: got label_smoothing="
            f"{hp.label_smoothing} and logit_softcap={hp.softcap}; drop one of the three."
        )
    return class_weights.astype(jax.numpy.float32)
