"""Distillation heads: the student's fused head against a teacher.

``linear_topk_distillation_loss`` distills from offline teacher log-probabilities of
each token's top-K ids (e.g. from a serving engine): the forward KL between teacher
and student coarsened to K + 1 bins (the K ids and "every other token"). It needs two
statistics of the student's row, its log-sum-exp and its logits at the K ids, so
neither the student's nor any teacher's ``[tokens, V]`` logits are ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from fusedloss import _ce_math, _checks
from fusedloss.heads._engine import Hyper, TokenStats
from fusedloss.heads._registry import run_stats
from fusedloss.heads._tokens import (
    Tokens,
    check_head_args,
    check_options,
    check_shift,
    prepare_tokens,
    static_float,
)
from fusedloss.heads.transposed import Transposed


def check_teacher(teacher_ids, teacher_log_probs, token_shape):
    _checks.check_integer("teacher_ids", teacher_ids)
    _checks.check_floating("teacher_log_probs", teacher_log_probs)
    ids, logp = jnp.asarray(teacher_ids), jnp.asarray(teacher_log_probs)
    if ids.ndim != len(token_shape) + 1 or ids.shape[:-1] != token_shape or ids.shape[-1] < 1:
        raise ValueError(
            f"`teacher_ids` must have shape x.shape[:-1] + (K,) = {token_shape} + (K,) with "
            f"K >= 1, got {ids.shape}."
        )
    _checks.check_shape("teacher_log_probs", logp, ids.shape, "the shape of `teacher_ids`")
    return ids, logp


def check_ids_eagerly(ids, valid, vocab_size: int) -> None:
    """Concrete ids of included tokens: in ``[0, V)`` and distinct per token."""
    if not (_checks.is_concrete(ids) and _checks.is_concrete(valid)):
        return
    ids, keep = np.asarray(ids), np.asarray(valid, bool)
    _checks.check_labels_in_range("teacher_ids", ids, vocab_size, mask=keep[:, None])
    ordered = np.sort(ids, axis=-1)
    dup = keep & np.any(ordered[:, 1:] == ordered[:, :-1], axis=-1)
    if dup.any():
        row = int(np.argmax(dup))
        raise ValueError(
            f"`teacher_ids` must be distinct per token; token {row} (flattened) has "
            f"{ids[row].tolist()}."
        )


def topk_kl(log_ps, teacher_log_probs):
    """Forward KL over K + 1 bins from the student's log-probs of the K ids."""
    pt = jnp.exp(teacher_log_probs)
    rt = jnp.maximum(1.0 - jnp.sum(pt, axis=-1), 0.0)  # clipped against rounding
    # The student's mass outside the K ids, kept away from 0 only where r_t is 0.
    rs = 1.0 - jnp.sum(jnp.exp(log_ps), axis=-1)
    log_rs = jnp.log(jnp.where(rt > 0, rs, 1.0))
    inside = jnp.sum(jnp.where(pt > 0, pt * (teacher_log_probs - log_ps), 0.0), axis=-1)
    rest = jnp.where(rt > 0, rt * (jnp.log(jnp.where(rt > 0, rt, 1.0)) - log_rs), 0.0)
    return inside + rest


def topk_loss_from_stats(stats: TokenStats, tokens: Tokens, ids, teacher_log_probs, vocab_size):
    """The coef-weighted per-token top-K loss ``[N]`` from the student's statistics at
    the ``[N, K]`` ``ids`` (shared with the sharded call)."""
    kl = topk_kl(stats.label_logit - stats.lse[:, None], teacher_log_probs)
    bad = jnp.any(~_ce_math.label_in_range(ids, vocab_size), axis=-1)
    return jnp.where(tokens.valid, jnp.where(bad, jnp.nan, kl) * tokens.coef, 0.0)


def linear_topk_distillation_loss(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike | Transposed,
    teacher_ids: jax.typing.ArrayLike,
    teacher_log_probs: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
    bias: jax.typing.ArrayLike | None = None,
    logit_softcap: float | None = None,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "mean",
    shift: int = 0,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
) -> jax.Array:
    r"""Distillation from a teacher's top-K log-probabilities, fused with ``x @ w``.

    Per token, with the student's ``q = softmax(softcap(x @ w + bias) / temperature)``
    and the teacher's probabilities ``p_k = exp(teacher_log_probs_k)`` of its K ids::

        KL = sum_k p_k (log p_k - log q_k) + r_p (log r_p - log r_q)

    where ``r = 1 - sum_k (.)_k`` is the mass outside the K ids (``r_p`` clipped at 0
    against rounding, ``0 log 0 = 0``). No teacher head is needed at training time, and
    no gradient flows to the teacher's log-probabilities.

    Args:
      x: student hidden states ``[..., D]``.
      w: student kernel ``[D, V]`` or :class:`~fusedloss.Transposed` embedding.
      teacher_ids: ``[..., K]`` int, distinct per token: the teacher's top-K ids.
      teacher_log_probs: ``[..., K]`` float: the teacher's log-probabilities of them.
      temperature: ``> 0``; the student's logits are divided by it (after the softcap).
      bias, logit_softcap: the student head's bias and softcap.
      where, weights, reduction, shift: as in :func:`~fusedloss.linear_cross_entropy`
        (``shift`` aligns ``x[..., :-shift, :]`` with ``teacher_ids[..., shift:, :]``).
      implementation, config: the statistics core (``xla`` or ``reference``; the
        Pallas kernels compute single-label statistics only).

    Returns:
      The loss: per token (``x``'s dtype) for ``"none"``, else a float32 scalar. An
      included id outside ``[0, V)`` gives NaN under ``jit``; an eager call raises,
      also for repeated ids.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> kx, kw, kt = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(kx, (2, 8, 16))
      >>> w = jax.random.normal(kw, (16, 1000)) / 4
      >>> teacher = jax.nn.log_softmax(jax.random.normal(kt, (2, 8, 1000)) * 3)
      >>> top_logp, top_ids = jax.lax.top_k(teacher, 64)  # what a server returns
      >>> loss = fusedloss.linear_topk_distillation_loss(x, w, top_ids, top_logp)
      >>> loss.shape, bool(loss > 0)
      ((), True)
    """
    x_arr = jnp.asarray(x)
    ids, tlp = check_teacher(teacher_ids, teacher_log_probs, x_arr.shape[:-1])
    args = check_head_args(x, w, ids[..., 0], bias, where, weights, "[V], V = w.shape[1]")
    base = check_options(reduction, 0.0, 0.0, logit_softcap, None, shift)
    temp = static_float("temperature", temperature, 0.0, None, low_inclusive=False)
    k = ids.shape[-1]
    hp = Hyper(softcap=base.softcap, temperature=temp, picked=k)
    check_shift(args.x, shift)
    tokens = prepare_tokens(
        args.x,
        args.labels,
        args.where,
        args.weights,
        shift=shift,
        ignore_index=None,
        reduction=reduction,
        vocab_size=args.vocab_size,
        check_labels=False,
    )
    if shift:
        ids, tlp = ids[..., shift:, :], tlp[..., shift:, :]
    ids = ids.reshape(-1, k).astype(jnp.int32)
    tlp = jax.lax.stop_gradient(tlp.reshape(-1, k).astype(tokens.coef.dtype))
    check_ids_eagerly(ids, tokens.valid, args.vocab_size)
    stats, _ = run_stats(
        tokens._replace(labels=ids), args.w, args.w_vd, args.bias, hp,
        implementation=implementation, config=config,
    )  # fmt: skip
    loss = topk_loss_from_stats(stats, tokens, ids, tlp, args.vocab_size)
    if reduction == "none":
        return loss.reshape(tokens.shape).astype(args.x.dtype)
    return jnp.sum(loss)
