"""Distillation heads: the student's fused head against a teacher.

``linear_distillation_loss`` distills from a live teacher head: both heads' logits
are formed block by block (``fusedloss.heads._distill``), never whole.
``linear_topk_distillation_loss`` distills from offline teacher log-probabilities of
each token's top-K ids (e.g. from a serving engine): the forward KL between teacher
and student coarsened to K + 1 bins (the K ids and "every other token"). It needs two
statistics of the student's row, its log-sum-exp and its logits at the K ids, so
neither the student's nor any teacher's ``[tokens, V]`` logits are ever formed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusedloss import _ce_math, _checks
from fusedloss.heads import _distill
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


def truncated_topk_kl(logits, teacher_log_probs):
    """Forward KL with both distributions renormalized over the K ids, from the
    student's head logits at them (no log-sum-exp over the vocabulary needed)."""
    lt = jax.nn.log_softmax(teacher_log_probs, axis=-1)
    ls = jax.nn.log_softmax(logits, axis=-1)
    pt = jnp.exp(lt)
    return jnp.sum(jnp.where(pt > 0, pt * (lt - ls), 0.0), axis=-1)


TOPK_MODES = ("k_plus_one", "truncated")


def topk_loss_from_stats(
    stats: TokenStats, tokens: Tokens, ids, teacher_log_probs, vocab_size, mode="k_plus_one"
):
    """The coef-weighted per-token top-K loss ``[N]`` from the student's statistics at
    the ``[N, K]`` ``ids`` (shared with the sharded call)."""
    # An excluded token's log-probabilities (NaN or inf included) are replaced before
    # the KL: its cotangent is 0, but 0 times a non-finite weight would still be NaN.
    teacher_log_probs = jnp.where(tokens.valid[:, None], teacher_log_probs, 0.0)
    if mode == "truncated":
        kl = truncated_topk_kl(stats.label_logit, teacher_log_probs)
    else:
        kl = topk_kl(stats.label_logit - stats.lse[:, None], teacher_log_probs)
    bad = jnp.any(~_ce_math.label_in_range(ids, vocab_size), axis=-1)
    return jnp.where(tokens.valid, jnp.where(bad, jnp.nan, kl) * tokens.coef, 0.0)


def check_topk(x, w, teacher_ids, teacher_log_probs, temperature, bias, logit_softcap, where,
               weights, reduction, shift, mode="k_plus_one"):  # fmt: skip
    """Checked arguments of a top-K distillation call (shared with the sharded call):
    (student HeadArgs, teacher ids and log-probabilities ``[..., K]`` unshifted, the
    statistics' hyperparameters). Concrete ids of included tokens are checked here."""
    if mode not in TOPK_MODES:
        raise ValueError(f"`mode` must be one of {TOPK_MODES}, got {mode!r}.")
    ids, tlp = check_teacher(teacher_ids, teacher_log_probs, jnp.asarray(x).shape[:-1])
    args = check_head_args(x, w, ids[..., 0], bias, where, weights, "[V], V = w.shape[1]")
    base = check_options(reduction, 0.0, 0.0, logit_softcap, None, shift)
    temp = static_float("temperature", temperature, 0.0, None, low_inclusive=False)
    check_shift(args.x, shift)
    k = ids.shape[-1]
    ids_s = ids[..., shift:, :] if shift else ids
    valid = jnp.ones(ids_s.shape[:-1], bool) if args.where is None else args.where[..., shift:]
    check_ids_eagerly(ids_s.reshape(-1, k), valid.reshape(-1), args.vocab_size)
    return args, ids, tlp, Hyper(softcap=base.softcap, temperature=temp, picked=k)


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
    mode: Literal["k_plus_one", "truncated"] = "k_plus_one",
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
) -> jax.Array:
    r"""Distillation from a teacher's top-K log-probabilities, fused with ``x @ w``.

    Per token, with the student's ``q = softmax(softcap(x @ w + bias) / temperature)``
    and the teacher's probabilities ``p_k = exp(teacher_log_probs_k)`` of its K ids::

        KL = sum_k p_k (log p_k - log q_k) + r_p (log r_p - log r_q)

    where ``r = 1 - sum_k (.)_k`` is the mass outside the K ids (``r_p`` clipped at 0
    against rounding, ``0 log 0 = 0``). With ``mode="truncated"`` both distributions
    are renormalized over the K ids instead (``sum_k p~_k (log p~_k - log q~_k)``, the
    mass outside them dropped). No teacher head is needed at training time, and no
    gradient flows to the teacher's log-probabilities.

    Args:
      x: student hidden states ``[..., D]``.
      w: student kernel ``[D, V]`` or :class:`~fusedloss.Transposed` embedding.
      teacher_ids: ``[..., K]`` int, distinct per token: the teacher's top-K ids.
      teacher_log_probs: ``[..., K]`` float: the teacher's log-probabilities of them.
      temperature: ``> 0``; the student's logits are divided by it (after the softcap).
      bias: the student head's optional ``[V]`` bias.
      logit_softcap: the student head's optional softcap.
      where: as in :func:`~fusedloss.linear_cross_entropy`.
      weights: as in :func:`~fusedloss.linear_cross_entropy`.
      reduction: as in :func:`~fusedloss.linear_cross_entropy`.
      shift: as in :func:`~fusedloss.linear_cross_entropy` (``shift`` aligns
        ``x[..., :-shift, :]`` with ``teacher_ids[..., shift:, :]``).
      mode: ``"k_plus_one"`` (the K ids and the rest as K + 1 bins) or
        ``"truncated"`` (both distributions renormalized over the K ids).
      implementation: the statistics core (``xla`` or ``reference``; the Pallas
        kernels compute single-label statistics only).
      config: an :class:`~fusedloss.XlaConfig` for ``"xla"``.

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
    args, ids, tlp, hp = check_topk(
        x, w, teacher_ids, teacher_log_probs, temperature, bias, logit_softcap, where, weights,
        reduction, shift, mode,
    )  # fmt: skip
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
    ids = ids.reshape(-1, hp.picked).astype(jnp.int32)
    tlp = jax.lax.stop_gradient(tlp.reshape(-1, hp.picked).astype(tokens.coef.dtype))
    stats, _ = run_stats(
        tokens._replace(labels=ids), args.w, args.w_vd, args.bias, hp,
        implementation=implementation, config=config,
    )  # fmt: skip
    loss = topk_loss_from_stats(stats, tokens, ids, tlp, args.vocab_size, mode)
    if reduction == "none":
        return loss.reshape(tokens.shape).astype(args.x.dtype)
    return jnp.sum(loss)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearDistillationAux:
    """Side outputs of :func:`~fusedloss.linear_distillation_loss` (not differentiable).

    Attributes:
      divergence: the divergence term, reduced like the loss (per token for
        ``reduction="none"``), before the ``1 - hard_label_weight`` factor.
      hard_loss: the student's cross-entropy against ``labels`` at temperature 1,
        reduced likewise, before the ``hard_label_weight`` factor (also with a weight
        of 0; 0 without ``labels``, NaN for an included label outside ``[0, V)``).
      num_tokens: int32 scalar, the number of included tokens.
      weight_sum: float32 scalar, the sum of the included tokens' weights.
      implementation: the implementation and strategy that ran (static).
    """

    divergence: jax.Array
    hard_loss: jax.Array
    num_tokens: jax.Array
    weight_sum: jax.Array
    implementation: str = dataclasses.field(default="", metadata={"static": True})


_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class Terms(NamedTuple):
    """The per-token coefficients of the two terms of a distillation loss."""

    div_coef: jax.Array  # [N] the divergence's reduction coefficients (0 if excluded)
    ce_coef: jax.Array  # [N] the hard-label term's
    ce_valid: jax.Array  # [N] bool: the hard-label term counts the token
    div_scale: float = 1.0  # temperature**2 with `temperature_squared`

    @classmethod
    def shared(cls, tokens: Tokens, div_scale: float = 1.0) -> Terms:
        return cls(tokens.coef, tokens.coef, tokens.valid, div_scale)

    def core_coefs(self, a: float) -> tuple[jax.Array, jax.Array]:
        """The weights of (divergence, cross-entropy) per token in the core's total."""
        return self.div_scale * (1 - a) * self.div_coef, a * self.ce_coef


def _check_teacher_head(teacher_x, teacher_w, teacher_bias, x, vocab_size: int) -> _distill.Head:
    vd = isinstance(teacher_w, Transposed)
    stored = teacher_w.array if vd else teacher_w
    _checks.check_floating("teacher_x", teacher_x)
    _checks.check_floating("teacher_w", stored)
    tx, tw = jnp.asarray(teacher_x), jnp.asarray(stored)
    if tx.ndim != x.ndim or tx.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"`teacher_x` must have shape x.shape[:-1] + (Dt,) = {x.shape[:-1]} + (Dt,), "
            f"got {tx.shape}."
        )
    what = "Transposed(array) with array of shape [V, Dt]" if vd else "[Dt, V]"
    shape = tw.shape[::-1] if vd else tw.shape
    if tw.ndim != 2 or shape[0] != tx.shape[-1] or shape[1] != vocab_size:
        raise ValueError(
            f"`teacher_w` must have shape {what} with Dt = teacher_x.shape[-1] = "
            f"{tx.shape[-1]} and the student's V = {vocab_size}, got {tw.shape}."
        )
    if tw.dtype != tx.dtype:
        raise TypeError(
            f"`teacher_x` and `teacher_w` must have the same dtype, got {tx.dtype} and {tw.dtype}."
        )
    tb = None
    if teacher_bias is not None:
        _checks.check_floating("teacher_bias", teacher_bias)
        tb = jnp.asarray(teacher_bias)
        _checks.check_shape("teacher_bias", tb, (vocab_size,), "[V], the student's V")
    return _distill.Head(tx, tw, tb)


def _distill_options(divergence, beta, temperature, teacher_logit_softcap, labels, a, ignore_index):
    if divergence not in _DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {_DIVERGENCES}, got {divergence!r}.")
    beta = static_float("beta", beta, 0.0, 1.0, low_inclusive=False)
    temp = static_float("temperature", temperature, 0.0, None, low_inclusive=False)
    t_cap = teacher_logit_softcap
    if t_cap is not None:
        t_cap = static_float("teacher_logit_softcap", t_cap, 0.0, None, low_inclusive=False)
    a = static_float("hard_label_weight", a, 0.0, 1.0, high_inclusive=True)
    if labels is None and (a > 0 or ignore_index is not None):
        raise ValueError(
            "`hard_label_weight` > 0 and `ignore_index` need `labels`; got labels=None with "
            f"hard_label_weight={a!r}, ignore_index={ignore_index!r}."
        )
    return beta, temp, t_cap, a


def distillation_result(
    div, ce, total, tokens: Tokens, a: float, v: int, hard: bool, per_token: bool, terms=None
):
    """(loss in the caller's token shape or reduced, divergence term, hard term).

    ``hard``: ``ce`` holds the cross-entropy (an included label outside ``[0, v)``
    makes it NaN); it enters the loss only with a weight ``a > 0``. ``terms``: the
    :class:`Terms` of the two terms, by default both ``tokens``' own.
    """
    terms = Terms.shared(tokens) if terms is None else terms
    valid, cd, cc = tokens.valid, terms.div_coef, terms.ce_coef
    bad = (~_ce_math.label_in_range(tokens.labels, v)) & terms.ce_valid if hard else None
    mixed = hard and a > 0
    tok = terms.div_scale * (1 - a) * div * cd + (a * ce * cc if mixed else 0.0)
    tok = jnp.where(valid, jnp.where(bad, jnp.nan, tok) if mixed else tok, 0.0)
    div = jnp.where(valid, div, 0.0) * cd
    ce = jnp.where(terms.ce_valid, jnp.where(bad, jnp.nan, ce) if hard else ce, 0.0) * cc
    if per_token:
        return tuple(t.reshape(tokens.shape) for t in (tok, div, ce))
    if total is not None:  # formed with its gradients; NaN for a bad included label
        loss = jnp.where(jnp.any(bad), jnp.nan, total) if mixed else total
    else:
        loss = jnp.sum(tok)
    return loss, jnp.sum(div), jnp.sum(ce)


def linear_distillation_loss(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike | Transposed,
    teacher_x: jax.typing.ArrayLike,
    teacher_w: jax.typing.ArrayLike | Transposed,
    *,
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    bias: jax.typing.ArrayLike | None = None,
    teacher_bias: jax.typing.ArrayLike | None = None,
    logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None,
    labels: jax.typing.ArrayLike | None = None,
    hard_label_weight: float = 0.0,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "mean",
    shift: int = 0,
    hard_label_where: jax.typing.ArrayLike | None = None,
    temperature_squared: bool = False,
    return_aux: bool = False,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
) -> jax.Array | tuple[jax.Array, LinearDistillationAux]:
    r"""Distillation of a student head against a teacher head, both fused.

    Per token, with the student's ``q = softmax(softcap(x @ w + bias) / temperature)``
    and the teacher's ``p = softmax(softcap_t(teacher_x @ teacher_w + teacher_bias) /
    temperature)``, the divergence is ``"forward_kl"``: ``KL(p || q)``,
    ``"reverse_kl"``: ``KL(q || p)``, or ``"jsd"``: ``beta KL(p || m) + (1 - beta)
    KL(q || m)`` with ``m = beta p + (1 - beta) q``. With ``labels``, the loss is
    ``(1 - hard_label_weight) * divergence + hard_label_weight * CE`` (the student's
    cross-entropy at temperature 1); ``temperature_squared=True`` multiplies the
    divergence term by ``temperature**2`` (Hinton et al.'s ``alpha * T**2 * KL +
    (1 - alpha) * CE``, with ``alpha = 1 - hard_label_weight``). Neither head's
    ``[tokens, V]`` logits are materialized, and no gradient flows to the teacher.

    Args:
      x: student hidden states ``[..., D]``.
      w: student kernel ``[D, V]`` (``x``'s dtype) or :class:`~fusedloss.Transposed`.
      teacher_x: teacher hidden states ``[..., Dt]`` with ``x``'s leading shape.
      teacher_w: teacher kernel ``[Dt, V]`` (``teacher_x``'s dtype, the student's V)
        or :class:`~fusedloss.Transposed`.
      divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: the teacher's weight in the mixture of ``"jsd"``, in ``(0, 1)``.
      temperature: ``> 0``; both heads' logits are divided by it (after softcaps).
      bias: the student's optional ``[V]`` bias.
      teacher_bias: the teacher's optional ``[V]`` bias.
      logit_softcap: the student's optional softcap.
      teacher_logit_softcap: the teacher's optional softcap.
      labels: optional integer ids with ``x.shape[:-1]`` for the hard-label term and
        ``ignore_index``.
      hard_label_weight: in ``[0, 1]``, the hard-label term's weight (needs labels).
      ignore_index: as in :func:`~fusedloss.linear_cross_entropy`; exclusions apply
        to both terms.
      where: as in :func:`~fusedloss.linear_cross_entropy`, for both terms.
      weights: as in :func:`~fusedloss.linear_cross_entropy`, for both terms.
      reduction: as in :func:`~fusedloss.linear_cross_entropy`.
      shift: as in :func:`~fusedloss.linear_cross_entropy` (``shift`` aligns ``x``
        and ``teacher_x`` with ``labels[..., shift:]``).
      hard_label_where: optional bool mask with the shape of ``labels``: the
        hard-label term's own exclusions. Then the divergence counts the tokens of
        ``where`` and the hard-label term those of ``hard_label_where`` whose label is
        not ``ignore_index``, and ``"mean"`` averages each term over its own tokens
        (the aux's counts are the divergence's), as frameworks that mask the
        completion for the divergence and the labels for the cross-entropy do.
      temperature_squared: multiply the divergence term by ``temperature**2`` (the
        gradient scale of ``1 / T**2`` that softening the logits brings, undone).
      return_aux: also return a :class:`LinearDistillationAux`.
      implementation: ``"xla"`` (default) or ``"reference"`` (the materialized
        computation); the Pallas kernels compute single-head statistics only.
      config: an :class:`~fusedloss.XlaConfig` for ``"xla"``.

    Returns:
      The loss: per token (``x``'s dtype) for ``"none"``, else a float32 scalar; and
      the aux outputs if ``return_aux``. An included label outside ``[0, V)`` gives
      NaN under ``jit`` (with ``hard_label_weight > 0``); an eager call raises.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> ks = jax.random.split(jax.random.key(0), 4)
      >>> x, xt = jax.random.normal(ks[0], (2, 8, 16)), jax.random.normal(ks[1], (2, 8, 32))
      >>> w = jax.random.normal(ks[2], (16, 1000)) / 4
      >>> wt = jax.random.normal(ks[3], (32, 1000)) / 4
      >>> loss = fusedloss.linear_distillation_loss(x, w, xt, wt, temperature=2.0)
      >>> p = jax.nn.softmax(xt @ wt / 2.0)
      >>> kl = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(x @ w / 2.0)), -1).mean()
      >>> bool(jnp.allclose(loss, kl, rtol=1e-5))
      True
    """
    args, teacher, dh, a = check_distillation(
        x, w, teacher_x, teacher_w, labels, bias=bias, teacher_bias=teacher_bias,
        where=where, weights=weights, divergence=divergence, beta=beta,
        temperature=temperature, logit_softcap=logit_softcap,
        teacher_logit_softcap=teacher_logit_softcap, hard_label_weight=hard_label_weight,
        ignore_index=ignore_index, reduction=reduction, shift=shift,
    )  # fmt: skip
    hard_where = check_terms(hard_label_where, temperature_squared, args, labels)
    if return_aux and labels is not None:
        # The aux reports the hard-label term whatever its weight; without aux, a
        # weight of 0 skips it (no gather, no temperature-1 log-sum-exp).
        dh = dh._replace(hard=True)
    return _local_distillation(
        args, teacher, dh, a, reduction=reduction, shift=shift, ignore_index=ignore_index,
        return_aux=return_aux, implementation=implementation, config=config,
        hard_where=hard_where, div_scale=dh.temperature**2 if temperature_squared else 1.0,
    )  # fmt: skip


def check_terms(hard_label_where, temperature_squared, args, labels):
    """The hard-label term's own mask (checked), or None."""
    if not isinstance(temperature_squared, bool):
        raise TypeError(f"`temperature_squared` must be a bool, got {temperature_squared!r}.")
    if hard_label_where is None:
        return None
    if labels is None:
        raise ValueError("`hard_label_where` needs `labels`; got labels=None.")
    _checks.check_bool("hard_label_where", hard_label_where)
    hard_label_where = jnp.asarray(hard_label_where)
    _checks.check_shape(
        "hard_label_where", hard_label_where, args.labels.shape, "the shape of `labels`"
    )
    return hard_label_where


def check_distillation(x, w, teacher_x, teacher_w, labels, *, bias, teacher_bias, where,
                       weights, divergence, beta, temperature, logit_softcap,
                       teacher_logit_softcap, hard_label_weight, ignore_index, reduction,
                       shift):  # fmt: skip
    """Checked arguments of a distillation call: (student HeadArgs, teacher Head with
    the caller's token shape, static hyperparameters, hard-label weight)."""
    x_arr = jnp.asarray(x)
    lab = jnp.zeros(x_arr.shape[:-1], jnp.int32) if labels is None else labels
    args = check_head_args(x_arr, w, lab, bias, where, weights, "[V], V = w.shape[1]")
    base = check_options(reduction, 0.0, 0.0, logit_softcap, ignore_index, shift)
    teacher = _check_teacher_head(teacher_x, teacher_w, teacher_bias, args.x, args.vocab_size)
    beta, temp, t_cap, a = _distill_options(
        divergence, beta, temperature, teacher_logit_softcap, labels, hard_label_weight,
        ignore_index,
    )  # fmt: skip
    check_shift(args.x, shift)
    t_vd = isinstance(teacher_w, Transposed)
    dh = _distill.Distill(divergence, beta, temp, base.softcap, t_cap, a > 0, args.w_vd, t_vd)
    return args, teacher, dh, a


def _local_distillation(args, teacher, dh, a, *, reduction, shift, ignore_index, return_aux,
                        implementation, config, hard_where=None, div_scale=1.0):  # fmt: skip
    """The distillation loss of one device's tokens over the whole vocabulary."""
    kw = dict(shift=shift, reduction=reduction, vocab_size=args.vocab_size)
    tokens = prepare_tokens(
        args.x, args.labels, args.where, args.weights,
        ignore_index=None if hard_where is not None else ignore_index,
        check_labels=a > 0 and hard_where is None, **kw,
    )  # fmt: skip
    terms = Terms.shared(tokens, div_scale)
    if hard_where is not None:  # each term over its own tokens; the union runs
        hard = prepare_tokens(
            args.x, args.labels, hard_where, args.weights, ignore_index=ignore_index,
            check_labels=a > 0, **kw,
        )  # fmt: skip
        terms = Terms(tokens.coef, hard.coef, hard.valid, div_scale)
        tokens = tokens._replace(valid=tokens.valid | hard.valid)
    tx = teacher.x[..., :-shift, :] if shift else teacher.x
    teacher = teacher._replace(x=tx.reshape(-1, tx.shape[-1]))
    per_token = reduction == "none"
    student = _distill.Head(tokens.x, args.w, args.bias)
    choice = _distill.plan_for(implementation, config, student, dh, needs_stats=per_token)
    div, ce, total = _distill.distillation_losses(
        student, teacher, tokens.labels, tokens.valid, terms.core_coefs(a), dh, choice
    )
    loss, div_term, hard_term = distillation_result(
        div, ce, total, tokens, a, args.vocab_size, dh.hard, per_token, terms
    )
    if per_token:
        loss = loss.astype(args.x.dtype)
    if not return_aux:
        return loss
    name = choice[0] if choice[1] is None else f"xla:{choice[1].strategy}"
    stop = jax.lax.stop_gradient
    aux = LinearDistillationAux(
        stop(div_term), stop(hard_term), tokens.num_tokens, tokens.weight_sum, name
    )
    return loss, aux
