r"""Preference objectives: DPO and its variants, SimPO, ORPO, CPO, and KTO.

:func:`preference_loss` and :func:`kto_loss` are the math, written once, as
functions of per-token log-probabilities (from any source) and per-sequence
reference log-probabilities; :func:`linear_preference_loss` and
:func:`linear_kto_loss` compose them with ONE fused
:func:`~fusedloss.linear_log_probs` pass on the policy head: chosen and rejected
rows travel in one batch (chosen first, as TRL and Tunix concatenate them), so the
head's ``dw`` is held once.

With ``s`` a row's summed log-probability over its included tokens, ``n`` their
number, ``a = s / n`` the length-averaged log-probability, ``h_c = s_c - ref_c``
and ``h_r = s_r - ref_r`` the chosen and rejected log-ratios to the reference,
``h = h_c - h_r`` and ``z = beta * h``, the per-pair losses are (``eps`` is
``label_smoothing``, ``ls`` is ``log sigmoid``):

============  ==============================================================
sigmoid       ``-(1 - eps) ls(z) - eps ls(-z)`` (DPO; conservative smoothing)
rpo           sigmoid, plus ``nll_coef`` (default 1) times the chosen NLL
hinge         ``relu(1 - z)``
ipo           ``(h - 1 / (2 beta))**2`` on length-averaged log-probs (as TRL)
robust        ``(-(1 - eps) ls(z) + eps ls(-z)) / (1 - 2 eps)``
exo_pair      ``sigmoid(z) (ls(z) - log(1 - eps)) + sigmoid(-z) (ls(-z) - log eps)``,
              ``eps = 1e-3`` when ``label_smoothing`` is 0 (as TRL)
nca_pair      ``-ls(beta h_c) - ls(-beta h_c) / 2 - ls(-beta h_r) / 2``
bco_pair      ``-ls(beta h_c - d) - ls(-(beta h_r - d))``, ``d`` the detached mean
              of the batch's rewards (as Liger)
sppo_hard     ``(h_c - 1 / (2 beta))**2 + (h_r + 1 / (2 beta))**2``
apo_zero      ``1 - sigmoid(beta h_c) + sigmoid(beta h_r)``
apo_down      ``sigmoid(beta h_c) + 1 - sigmoid(beta h)``
simpo         sigmoid of ``beta (a_c - a_r) - gamma`` (no reference)
cpo           sigmoid of ``beta (s_c - s_r)`` (no reference), plus ``nll_coef``
              (default 1) times the chosen NLL
orpo          ``-beta ls(log odds(a_c) - log odds(a_r))``, ``odds(a) = e^a / (1 - e^a)``
              (no reference), plus ``nll_coef`` (default 1) times the chosen NLL
============  ==============================================================

The loss is the mean over pairs whose chosen and rejected rows both hold included
tokens (others count nowhere), plus ``nll_coef`` times the token-mean negative
log-likelihood of those pairs' chosen tokens. Liger's ``discopop`` type is left out:
it is a learned (searched) objective with its own temperature, not one of the
papers' closed forms.

References:
  Rafailov et al., "Direct Preference Optimization" (DPO), 2023; Azar et al., "A
  General Theoretical Paradigm" (IPO), 2023; Pang et al., "Iterative Reasoning
  Preference Optimization" (RPO), 2024; Meng et al., "SimPO", 2024; Hong et al.,
  "ORPO", 2024; Xu et al., "Contrastive Preference Optimization" (CPO), 2024;
  Ethayarajh et al., "KTO", 2024; Chowdhury et al., "Provably Robust DPO", 2024;
  Ji et al., "Towards Efficient Exact Optimization" (EXO), 2024; Chen et al.,
  "Noise Contrastive Alignment" (NCA), 2024; Jung et al., "Binary Classifier
  Optimization" (BCO), 2024; Wu et al., "Self-Play Preference Optimization"
  (SPPO), 2024; D'Oosterlinck et al., "Anchored Preference Optimization" (APO), 2024.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fusedloss import _checks
from fusedloss.post_training import _common
from fusedloss.post_training._common import Array, ArrayLike, Head

REFERENCE_TYPES = (
    "sigmoid",
    "rpo",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
)
REFERENCE_FREE_TYPES = ("simpo", "cpo", "orpo")
LOSS_TYPES = REFERENCE_TYPES + REFERENCE_FREE_TYPES
_NLL_BY_DEFAULT = ("rpo", "cpo", "orpo")
_SMOOTHED = ("sigmoid", "rpo", "robust", "exo_pair", "simpo", "cpo")


class PreferenceAux(NamedTuple):
    """Metrics of a preference loss (no gradient flows through them).

    Attributes:
      chosen_rewards: ``[P]`` implicit rewards of the chosen rows (``beta`` times the
        log-ratio to the reference; without a reference ``beta`` times the policy's
        summed, or for SimPO/ORPO/IPO averaged, log-probability).
      rejected_rewards: ``[P]`` the same for the rejected rows.
      reward_margin: mean of ``chosen - rejected`` over counted pairs.
      reward_accuracy: fraction of counted pairs with ``chosen > rejected``.
      preference_loss: the preference term alone (mean over counted pairs).
      nll: the chosen rows' token-mean negative log-likelihood.
      num_pairs: number of counted pairs.
    """

    chosen_rewards: Array
    rejected_rewards: Array
    reward_margin: Array
    reward_accuracy: Array
    preference_loss: Array
    nll: Array
    num_pairs: Array


class KTOAux(NamedTuple):
    """Metrics of :func:`kto_loss` (no gradient flows through them).

    Attributes:
      rewards: ``[B]`` ``beta`` times each row's log-ratio to the reference.
      kl_baseline: the detached KL baseline ``z0`` used.
      desirable_reward: mean reward of the counted desirable rows (0 if none).
      undesirable_reward: mean reward of the counted undesirable rows (0 if none).
      num_rows: number of counted rows.
    """

    rewards: Array
    kl_baseline: Array
    desirable_reward: Array
    undesirable_reward: Array
    num_rows: Array


def _row_sums(lp: Array, mask: Array) -> tuple[Array, Array]:
    """Summed log-probability and token count of each row (excluded tokens unread)."""
    return jnp.sum(jnp.where(mask, lp, 0.0), axis=-1), jnp.sum(mask, axis=-1, dtype=jnp.float32)


def _check_pairs(name: str, batch: int) -> None:
    if batch < 2 or batch % 2:
        raise ValueError(
            f"`{name}` must hold chosen and rejected rows in one batch (chosen first), "
            f"so an even batch >= 2, got batch {batch}."
        )


def _check_ref(ref: Any, batch: int, name: str = "ref_log_probs") -> Array:
    _checks.check_floating(name, ref)
    _checks.check_shape(name, ref, (batch,), "one summed log-probability per row")
    return jnp.asarray(ref).astype(jnp.float32)


def _log1m_exp(a: Array) -> Array:
    """``log(1 - exp(a))`` for ``a < 0``, accurate near 0 and far from it."""
    return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def preference_loss(
    log_probs: ArrayLike,
    *,
    where: ArrayLike | None = None,
    ref_log_probs: ArrayLike | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    nll_coef: float | None = None,
    return_aux: bool = False,
) -> Array | tuple[Array, PreferenceAux]:
    r"""Pairwise preference loss of per-token log-probabilities (any source).

    Argument names in the frameworks users come from (Tunix ``DpoTrainingConfig`` /
    ``OrpoTrainingConfig``, TRL ``DPOConfig`` / ``CPOConfig`` / ``ORPOConfig``, Liger
    ``LigerFusedLinear*Loss``) are given in brackets.

    Args:
      log_probs: ``[2P, T]`` per-token log-probabilities of ``P`` chosen rows then
        ``P`` rejected rows [TRL concatenates chosen and rejected the same way].
      where: ``[2P, T]`` bool, True for completion tokens [``completion_mask``,
        Liger ``loss_mask``].
      ref_log_probs: ``[2P]`` the reference's summed log-probabilities of the same
        rows, required by the reference types [TRL ``ref_chosen_logps`` and
        ``ref_rejected_logps``; Liger ``ref_chosen_logps``/``ref_rejected_logps``].
      loss_type: see the module's table [TRL/Liger ``loss_type``; TRL CPO
        ``loss_type="simpo"``].
      beta: ``> 0`` temperature of the implicit reward; for ORPO the paper's
        ``lambda`` [``beta``; TRL ``ORPOConfig.beta``; Tunix ``lambda_orpo``, whose
        ORPO is a sigmoid of the summed log-prob difference, not the odds ratio].
      label_smoothing: ``eps`` in ``[0, 0.5)``, the assumed rate of flipped labels
        [``label_smoothing``].
      gamma: SimPO's target margin [TRL ``simpo_gamma`` is ``gamma / beta``; Liger
        ``gamma``].
      nll_coef: coefficient of the chosen rows' token-mean NLL; default 1 for
        ``rpo``, ``cpo`` and ``orpo``, else 0 [TRL ``rpo_alpha``, ``cpo_alpha``;
        Liger ``alpha``].
      return_aux: also return :class:`PreferenceAux`.

    Returns:
      The float32 scalar loss (and the aux metrics).

    Examples:
      DPO with chosen and rejected rows in one batch, chosen first:

      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> lp = jnp.log(jnp.array([[0.5, 0.4], [0.6, 0.9],     # chosen
      ...                         [0.2, 0.3], [0.5, 0.5]]))   # rejected
      >>> ref = jnp.log(jnp.array([0.2, 0.5, 0.1, 0.3]))     # reference sums
      >>> loss, aux = fusedloss.preference_loss(
      ...     lp, ref_log_probs=ref, beta=0.5, return_aux=True)
      >>> print(f"{float(loss):.4f}")  # mean of -log sigmoid(beta * h) over the 2 pairs
      0.6020
      >>> float(aux.reward_accuracy), [round(float(r), 4) for r in aux.chosen_rewards]
      (1.0, [0.0, 0.0385])
    """
    lp = _common.token_log_probs("log_probs", log_probs)
    batch = lp.shape[0]
    _check_pairs("log_probs", batch)
    mask = _common.token_mask(where, lp.shape)
    _common.choice("loss_type", loss_type, LOSS_TYPES)
    beta = _common.positive("beta", beta)
    eps = _common.nonnegative("label_smoothing", label_smoothing)
    if eps >= 0.5:
        raise ValueError(f"`label_smoothing` must be in [0, 0.5), got {label_smoothing!r}.")
    gamma = _common.static_float("gamma", gamma)
    if nll_coef is None:
        nll_coef = 1.0 if loss_type in _NLL_BY_DEFAULT else 0.0
    nll_coef = _common.nonnegative("nll_coef", nll_coef)
    if not isinstance(return_aux, bool):
        raise TypeError(f"`return_aux` must be a bool, got {return_aux!r}.")
    if loss_type in REFERENCE_FREE_TYPES:
        if ref_log_probs is not None:
            raise ValueError(
                f"loss_type={loss_type!r} uses no reference; got `ref_log_probs` (leave it None)."
            )
        ref = None
    elif ref_log_probs is None:
        raise ValueError(
            f"`ref_log_probs` ([{batch}] per-row sums) is required by loss_type={loss_type!r}."
        )
    else:
        ref = _check_ref(ref_log_probs, batch)
    return _preference(lp, mask, ref, loss_type, beta, eps, gamma, nll_coef, return_aux)


def _preference(lp, mask, ref, loss_type, beta, eps, gamma, nll_coef, return_aux):
    sg = jax.lax.stop_gradient
    ls = jax.nn.log_sigmoid
    pairs = lp.shape[0] // 2
    s, n = _row_sums(lp, mask)
    avg = _common.safe_div(s, n)
    valid = (n[:pairs] > 0) & (n[pairs:] > 0)
    s_c, s_r, a_c, a_r = s[:pairs], s[pairs:], avg[:pairs], avg[pairs:]

    def smoothed(z):
        return -(1.0 - eps) * ls(z) - eps * ls(-z)

    if ref is not None:
        ref = jnp.where(n > 0, sg(ref), 0.0)
        if loss_type == "ipo":  # TRL's IPO compares length-averaged log-probs
            h_c = a_c - _common.safe_div(ref[:pairs], n[:pairs])
            h_r = a_r - _common.safe_div(ref[pairs:], n[pairs:])
        else:
            h_c, h_r = s_c - ref[:pairs], s_r - ref[pairs:]
        chosen_r, rejected_r = beta * h_c, beta * h_r
        h = h_c - h_r
        z = beta * h
        if loss_type in ("sigmoid", "rpo"):
            per_pair = smoothed(z)
        elif loss_type == "hinge":
            per_pair = jax.nn.relu(1.0 - z)
        elif loss_type == "ipo":
            per_pair = (h - 1.0 / (2.0 * beta)) ** 2
        elif loss_type == "robust":
            per_pair = (-(1.0 - eps) * ls(z) + eps * ls(-z)) / (1.0 - 2.0 * eps)
        elif loss_type == "exo_pair":
            e = eps if eps > 0 else 1e-3
            per_pair = jax.nn.sigmoid(z) * (ls(z) - jnp.log1p(-e)) + jax.nn.sigmoid(-z) * (
                ls(-z) - jnp.log(e)
            )
        elif loss_type == "nca_pair":
            per_pair = -ls(chosen_r) - 0.5 * ls(-chosen_r) - 0.5 * ls(-rejected_r)
        elif loss_type == "bco_pair":
            both = jnp.concatenate([chosen_r, rejected_r])
            count = 2.0 * jnp.sum(valid, dtype=jnp.float32)
            delta = sg(_common.safe_div(jnp.sum(jnp.where(jnp.tile(valid, 2), both, 0.0)), count))
            per_pair = -ls(chosen_r - delta) - ls(-(rejected_r - delta))
        elif loss_type == "sppo_hard":
            per_pair = (h_c - 1.0 / (2.0 * beta)) ** 2 + (h_r + 1.0 / (2.0 * beta)) ** 2
        elif loss_type == "apo_zero":
            per_pair = 1.0 - jax.nn.sigmoid(chosen_r) + jax.nn.sigmoid(rejected_r)
        else:  # apo_down
            per_pair = jax.nn.sigmoid(chosen_r) + 1.0 - jax.nn.sigmoid(z)
    elif loss_type == "simpo":
        chosen_r, rejected_r = beta * a_c, beta * a_r
        per_pair = smoothed(beta * (a_c - a_r) - gamma)
    elif loss_type == "cpo":
        chosen_r, rejected_r = beta * s_c, beta * s_r
        per_pair = smoothed(beta * (s_c - s_r))
    else:  # orpo: log odds of the length-averaged log-probs (< 0 wherever counted)
        a_c, a_r = jnp.where(valid, a_c, -1.0), jnp.where(valid, a_r, -1.0)
        log_odds = (a_c - a_r) - (_log1m_exp(a_c) - _log1m_exp(a_r))
        chosen_r, rejected_r = beta * a_c, beta * a_r
        per_pair = -beta * ls(log_odds)

    num = jnp.sum(valid, dtype=jnp.float32)
    pref = _common.safe_div(jnp.sum(jnp.where(valid, per_pair, 0.0)), num)
    chosen_mask = mask[:pairs] & valid[:, None]
    nll = _common.safe_div(
        -jnp.sum(jnp.where(chosen_mask, lp[:pairs], 0.0)), jnp.sum(chosen_mask, dtype=jnp.float32)
    )
    loss = pref + nll_coef * nll if nll_coef else pref
    if not return_aux:
        return loss
    chosen_r = jnp.where(valid, sg(chosen_r), 0.0)
    rejected_r = jnp.where(valid, sg(rejected_r), 0.0)
    margin = chosen_r - rejected_r
    aux = PreferenceAux(
        chosen_rewards=chosen_r,
        rejected_rewards=rejected_r,
        reward_margin=_common.safe_div(jnp.sum(margin), num),
        reward_accuracy=_common.safe_div(jnp.sum(valid & (margin > 0), dtype=jnp.float32), num),
        preference_loss=sg(pref),
        nll=sg(nll),
        num_pairs=jnp.sum(valid, dtype=jnp.int32),
    )
    return loss, aux


def kto_loss(
    log_probs: ArrayLike,
    desirable: ArrayLike,
    *,
    where: ArrayLike | None = None,
    ref_log_probs: ArrayLike,
    kl_baseline: ArrayLike | None = None,
    kl_rows: ArrayLike | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    return_aux: bool = False,
) -> Array | tuple[Array, KTOAux]:
    r"""KTO: unpaired desirable/undesirable completions against a KL baseline.

    With ``r = s - ref`` a row's summed log-ratio to the reference and ``z0`` the
    detached KL baseline, a desirable row costs
    ``desirable_weight * (1 - sigmoid(beta (r - z0)))`` and an undesirable one
    ``undesirable_weight * (1 - sigmoid(beta (z0 - r)))``; the loss is their mean
    over counted rows (rows with included tokens, not in ``kl_rows``).

    Args:
      log_probs: ``[B, T]`` per-token log-probabilities of the completions.
      desirable: ``[B]`` bool, True for desirable rows [TRL ``label``].
      where: ``[B, T]`` bool completion mask.
      ref_log_probs: ``[B]`` the reference's summed log-probabilities of the rows
        [TRL ``reference_logps``].
      kl_baseline: a given scalar ``z0`` estimate (its positive part is used)
        [Liger ``kl``]; or
      kl_rows: ``[B]`` bool rows holding mismatched completions (a prompt with
        another prompt's completion) that only estimate
        ``z0 = max(0, mean over kl_rows of r)`` (as the KTO paper and TRL), in the
        same pass; with neither, ``z0 = 0``.
      beta: ``> 0`` [``beta``].
      desirable_weight: ``>= 0`` weight of the desirable rows [TRL/Liger, same name].
      undesirable_weight: ``>= 0`` weight of the undesirable rows [TRL/Liger, same
        name].
      return_aux: also return :class:`KTOAux`.

    Returns:
      The float32 scalar loss (and the aux metrics).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> lp = jnp.log(jnp.array([[0.5, 0.5], [0.1, 0.2], [0.3, 0.3]]))
      >>> ref = jnp.log(jnp.array([0.2, 0.05, 0.09]))
      >>> desirable = jnp.array([True, False, True])
      >>> kl_rows = jnp.array([False, False, True])   # the last row is a KL sample
      >>> kto = jax.jit(lambda lp: fusedloss.kto_loss(
      ...     lp, desirable, ref_log_probs=ref, kl_rows=kl_rows))
      >>> print(f"{float(kto(lp)):.4f}")
      0.4858
    """
    lp = _common.token_log_probs("log_probs", log_probs)
    batch = lp.shape[0]
    mask = _common.token_mask(where, lp.shape)
    _checks.check_bool("desirable", desirable)
    _checks.check_shape("desirable", desirable, (batch,), "one label per row")
    ref = _check_ref(ref_log_probs, batch)
    if kl_baseline is not None and kl_rows is not None:
        raise ValueError("Give either `kl_baseline` or `kl_rows`, not both.")
    if kl_baseline is not None:
        _checks.check_floating("kl_baseline", kl_baseline)
        _checks.check_shape("kl_baseline", kl_baseline, (), "a scalar")
    if kl_rows is not None:
        _checks.check_bool("kl_rows", kl_rows)
        _checks.check_shape("kl_rows", kl_rows, (batch,), "one flag per row")
    beta = _common.positive("beta", beta)
    w_d = _common.nonnegative("desirable_weight", desirable_weight)
    w_u = _common.nonnegative("undesirable_weight", undesirable_weight)
    if not isinstance(return_aux, bool):
        raise TypeError(f"`return_aux` must be a bool, got {return_aux!r}.")

    sg = jax.lax.stop_gradient
    s, n = _row_sums(lp, mask)
    r = s - jnp.where(n > 0, sg(ref), 0.0)
    has = n > 0
    if kl_rows is not None:
        kl_in = jnp.asarray(kl_rows) & has
        counted = has & ~jnp.asarray(kl_rows)
        mean_r = _common.safe_div(
            jnp.sum(jnp.where(kl_in, r, 0.0)), jnp.sum(kl_in, dtype=jnp.float32)
        )
        z0 = jnp.maximum(sg(mean_r), 0.0)
    else:
        counted = has
        given = 0.0 if kl_baseline is None else jnp.asarray(kl_baseline).astype(jnp.float32)
        z0 = jnp.maximum(sg(given), 0.0)
    des = jnp.asarray(desirable)
    per_row = jnp.where(
        des,
        w_d * (1.0 - jax.nn.sigmoid(beta * (r - z0))),
        w_u * (1.0 - jax.nn.sigmoid(beta * (z0 - r))),
    )
    rows = jnp.sum(counted, dtype=jnp.float32)
    loss = _common.safe_div(jnp.sum(jnp.where(counted, per_row, 0.0)), rows)
    if not return_aux:
        return loss
    rewards = jnp.where(has, sg(beta * r), 0.0)

    def mean_of(sel):
        return _common.safe_div(
            jnp.sum(jnp.where(sel, rewards, 0.0)), jnp.sum(sel, dtype=jnp.float32)
        )

    aux = KTOAux(
        rewards=rewards,
        kl_baseline=jnp.asarray(z0, jnp.float32),
        desirable_reward=mean_of(counted & des),
        undesirable_reward=mean_of(counted & ~des),
        num_rows=jnp.sum(counted, dtype=jnp.int32),
    )
    return loss, aux


def _fused_rows(
    x, w, tokens, bias, where, ref_x, ref_w, ref_bias, options, temperature, softcap, kw
):
    """The one pass on ``w`` and, if given, the frozen reference's per-row sums."""
    mask = _common.token_mask(where, jnp.shape(tokens))
    use_ref = _common.check_reference_head(
        ref_x, ref_w, options.get("ref_log_probs"), "ref_log_probs"
    )
    lp = _common.fused_log_probs(
        x, w, tokens, bias=bias, where=mask, temperature=temperature,
        logit_softcap=softcap, return_entropy=False, **kw,
    )  # fmt: skip
    if use_ref:
        ref = _common.frozen_log_probs(
            ref_x, ref_w, ref_bias, tokens, mask,
            temperature=temperature, logit_softcap=softcap, **kw,
        )  # fmt: skip
        options["ref_log_probs"] = jnp.sum(ref, axis=-1)
    return lp, mask


def linear_preference_loss(
    x: ArrayLike,
    w: Head,
    tokens: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ref_x: ArrayLike | None = None,
    ref_w: Head | None = None,
    ref_bias: ArrayLike | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
    implementation: str | tuple[str, ...] | None = None,
    config: Any = None,
    **options: Any,
) -> Array | tuple[Array, PreferenceAux]:
    r""":func:`preference_loss` on the policy head's hidden states, one fused pass.

    Chosen and rejected rows are one batch (chosen first): ONE
    :func:`~fusedloss.linear_log_probs` call on ``w`` scores both (and the NLL term
    of RPO/CPO/ORPO), so one ``dw`` is held and the logits are never formed. The
    reference's per-row sums are given (``ref_log_probs=``) or computed from a
    frozen reference head (``ref_x``, ``ref_w``, ``ref_bias``; no gradient).

    Args:
      x: ``[2P, T, D]`` hidden states of the completion tokens (``x[b, t]`` scores
        ``tokens[b, t]``) [Liger ``_input``: chosen then rejected].
      w: ``[D, V]`` head kernel or :class:`~fusedloss.Transposed` ``[V, D]``.
      tokens: ``[2P, T]`` int completion tokens [Liger ``target``].
      bias: optional ``[V]`` bias.
      where: ``[2P, T]`` bool completion mask (Liger's ``ignore_index`` labels are
        ``where=False``).
      ref_x: optional frozen reference head's hidden states ``[2P, T, Dr]`` [Liger
        ``ref_input``]; no gradient flows to the reference head.
      ref_w: its ``[Dr, V]`` kernel (or :class:`~fusedloss.Transposed`) [Liger
        ``ref_weight``].
      ref_bias: its optional ``[V]`` bias [Liger ``ref_bias``].
      temperature: the logits are divided by it (after the softcap).
      logit_softcap: optional softcap of the logits.
      mesh: run on ``mesh`` through :func:`~fusedloss.sharded_linear_log_probs`.
      data_axis: the mesh axis the batch is split over.
      model_axis: the mesh axis the vocabulary is split over.
      implementation: the fused head's backend (as in
        :func:`~fusedloss.linear_log_probs`).
      config: the backend's tuning dataclass.
      **options: every keyword of :func:`preference_loss`.

    Returns:
      As :func:`preference_loss`.

    Examples:
      DPO against a frozen reference head, with two pairs in one batch:

      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> kx, kw, kt, kr = jax.random.split(jax.random.key(0), 4)
      >>> x = jax.random.normal(kx, (4, 5, 16))      # 2 chosen rows, then 2 rejected
      >>> w = jax.random.normal(kw, (16, 300)) / 4
      >>> w_ref = w + 0.01 * jax.random.normal(kr, w.shape)
      >>> tokens = jax.random.randint(kt, (4, 5), 0, 300)
      >>> dpo = jax.jit(lambda x, w: fusedloss.linear_preference_loss(
      ...     x, w, tokens, ref_x=x, ref_w=w_ref, beta=0.1, return_aux=True))
      >>> loss, aux = dpo(x, w)
      >>> lp = fusedloss.linear_log_probs(x, w, tokens)
      >>> ref = fusedloss.linear_log_probs(x, w_ref, tokens).sum(-1)
      >>> want = fusedloss.preference_loss(lp, ref_log_probs=ref, beta=0.1)
      >>> bool(jnp.allclose(loss, want, atol=1e-6)), aux.chosen_rewards.shape
      (True, (2,))
    """
    _check_pairs("tokens", jnp.shape(tokens)[0] if jnp.ndim(tokens) else 0)
    kw = dict(
        mesh=mesh, data_axis=data_axis, model_axis=model_axis,
        implementation=implementation, config=config,
    )  # fmt: skip
    lp, mask = _fused_rows(
        x, w, tokens, bias, where, ref_x, ref_w, ref_bias, options, temperature, logit_softcap, kw
    )
    return preference_loss(lp, where=mask, **options)


def linear_kto_loss(
    x: ArrayLike,
    w: Head,
    tokens: ArrayLike,
    desirable: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ref_x: ArrayLike | None = None,
    ref_w: Head | None = None,
    ref_bias: ArrayLike | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
    implementation: str | tuple[str, ...] | None = None,
    config: Any = None,
    **options: Any,
) -> Array | tuple[Array, KTOAux]:
    r""":func:`kto_loss` on the policy head's hidden states, one fused pass.

    All rows (desirable, undesirable and the KL baseline's ``kl_rows``) are scored by
    ONE :func:`~fusedloss.linear_log_probs` call on ``w``.

    Args:
      x: ``[B, T, D]`` hidden states of the completion tokens.
      w: ``[D, V]`` head kernel or :class:`~fusedloss.Transposed` ``[V, D]``.
      tokens: ``[B, T]`` int completion tokens.
      desirable: ``[B]`` bool labels.
      bias: as in :func:`linear_preference_loss`.
      where: as in :func:`linear_preference_loss`.
      ref_x: as in :func:`linear_preference_loss`.
      ref_w: as in :func:`linear_preference_loss`.
      ref_bias: as in :func:`linear_preference_loss`.
      temperature: as in :func:`linear_preference_loss`.
      logit_softcap: as in :func:`linear_preference_loss`.
      mesh: as in :func:`linear_preference_loss`.
      data_axis: as in :func:`linear_preference_loss`.
      model_axis: as in :func:`linear_preference_loss`.
      implementation: as in :func:`linear_preference_loss`.
      config: as in :func:`linear_preference_loss`.
      **options: every other keyword of :func:`kto_loss` (``ref_log_probs``,
        ``kl_rows``, ``kl_baseline``, ``beta``, the weights, ``return_aux``).

    Returns:
      As :func:`kto_loss`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> kx, kw, kt = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(kx, (4, 5, 16))
      >>> w = jax.random.normal(kw, (16, 300)) / 4
      >>> tokens = jax.random.randint(kt, (4, 5), 0, 300)
      >>> desirable = jnp.array([True, False, True, False])
      >>> ref = jnp.full((4,), -28.0)
      >>> @jax.jit
      ... def both(x, w):
      ...     loss = fusedloss.linear_kto_loss(x, w, tokens, desirable, ref_log_probs=ref)
      ...     lp = fusedloss.linear_log_probs(x, w, tokens)
      ...     return loss, fusedloss.kto_loss(lp, desirable, ref_log_probs=ref)
      >>> loss, want = both(x, w)
      >>> bool(jnp.allclose(loss, want))
      True
    """
    kw = dict(
        mesh=mesh, data_axis=data_axis, model_axis=model_axis,
        implementation=implementation, config=config,
    )  # fmt: skip
    lp, mask = _fused_rows(
        x, w, tokens, bias, where, ref_x, ref_w, ref_bias, options, temperature, logit_softcap, kw
    )
    return kto_loss(lp, desirable, where=mask, **options)
