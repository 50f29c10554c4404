r"""Policy-gradient objectives (GRPO, DAPO, Dr.GRPO, BNPO, GSPO, PPO, CISPO, SAPO).

:func:`policy_gradient_loss` is the math, written once, as a function of per-token
log-probabilities ``[B, T]`` (``B`` completions of ``T`` tokens) from any source;
:func:`linear_policy_gradient_loss` composes it with ONE fused
:func:`~fusedloss.linear_log_probs` pass on the policy head (log-probs and entropy
together), so the ``[tokens, vocab]`` logits never exist and the head's ``dw`` is
held once.

With the importance ratio ``r = exp(log_prob - old_log_prob)`` (``r = 1`` with the
log-prob's gradient when no old log-probs are given) and the advantage ``A``, the
per-token policy term is

- PPO clip (``grpo``, ``dapo``, ``bnpo``, ``dr_grpo``, ``ppo``):
  ``max(-A r, -A clip(r, 1 - epsilon_low, 1 + epsilon_high))``, and with dual-clip
  (``clip_ratio_c = c``) ``min(that, -c A)`` where ``A < 0``;
- CISPO: ``-stop_gradient(min(r, epsilon_high)) * A * log_prob``;
- SAPO: ``-(4 / tau) * sigmoid(tau * (r - 1)) * A``, ``tau`` by the sign of ``A``;

times the sampler's truncated importance weights, plus ``beta`` times a per-token KL
estimate to the reference policy, minus ``entropy_coef`` times the entropy, then
aggregated by ``loss_agg_mode``. The loss types differ only in their default
aggregation (see ``fusedloss.post_training.DEFAULT_AGGREGATION``).

References:
  Shao et al., "DeepSeekMath" (GRPO), 2024; Yu et al., "DAPO", 2025; Liu et al.,
  "Understanding R1-Zero-Like Training" (Dr.GRPO), 2025; Zheng et al., "Group
  Sequence Policy Optimization" (GSPO), 2025; Schulman et al., "Proximal Policy
  Optimization", 2017; Ye et al., "Mastering Complex Control in MOBA Games" (dual
  clip), 2020; MiniMax, "MiniMax-M1" (CISPO), 2025; Gao et al., "Soft Adaptive
  Policy Optimization" (SAPO), 2025; Schulman, "Approximating KL Divergence"
  (k1, k2, k3), 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fusedloss import _checks
from fusedloss._reduce import reduce_loss
from fusedloss.post_training import _common
from fusedloss.post_training._common import Array, ArrayLike, Head

LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo", "ppo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum-norm",
)
# Tunix's ``loss_agg_mode`` spellings of the same modes.
AGGREGATION_ALIASES = {
    "sequence-mean-token-mean": "seq-mean-token-mean",
    "sequence-mean-token-scale": "seq-mean-token-sum-norm",
    "sequence-mean-token-sum-norm": "token-sum-norm",
}
DEFAULT_AGGREGATION = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "cispo": "token-mean",
    "ppo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
"""The aggregation each ``loss_type`` uses when ``loss_agg_mode`` is None (as in TRL
and Liger)."""
KL_ESTIMATORS = ("k1", "k2", "k3")
# Tunix's ``kl_loss_mode`` spellings.
KL_ALIASES = {"kl": "k1", "mse_kl": "k2", "low_var_kl": "k3"}


class PolicyGradientAux(NamedTuple):
    """Metrics of a policy-gradient loss (no gradient flows through them).

    Attributes:
      pg_loss: the aggregated policy term alone.
      kl: mean per-token KL estimate to the reference (0 without a reference).
      entropy: mean per-token entropy (0 without entropies).
      clip_fraction_low: fraction of tokens with ``A < 0`` and ``r < 1 - epsilon_low``.
      clip_fraction_high: fraction of tokens with ``A > 0`` and ``r > 1 + epsilon_high``
        (for CISPO: ``r > epsilon_high``).
      dual_clip_fraction: fraction of tokens where the dual clip ``-c A`` is active.
      approx_kl: mean of ``old_log_prob - log_prob`` (Tunix's ``ppo_kl``).
      ratio_mean, ratio_min, ratio_max: the importance ratio over included tokens.
      num_tokens: number of included tokens.

    The means are over included tokens, and 0 when there are none.
    """

    pg_loss: Array
    kl: Array
    entropy: Array
    clip_fraction_low: Array
    clip_fraction_high: Array
    dual_clip_fraction: Array
    approx_kl: Array
    ratio_mean: Array
    ratio_min: Array
    ratio_max: Array
    num_tokens: Array


def aggregate_loss(
    values: ArrayLike,
    where: ArrayLike | None = None,
    mode: str = "token-mean",
    *,
    loss_scale_factor: float | None = None,
) -> Array:
    r"""Aggregates per-token losses ``[B, T]`` to a scalar, as RL trainers do.

    With ``s_b`` the sum over row ``b``'s included tokens, ``n_b`` their number and
    ``R`` the number of rows with ``n_b > 0``:

    - ``"token-mean"``: ``sum_b s_b / sum_b n_b`` (DAPO, BNPO);
    - ``"seq-mean-token-mean"``: ``sum_b (s_b / n_b) / R`` (GRPO);
    - ``"seq-mean-token-sum"``: ``sum_b s_b / R``;
    - ``"seq-mean-token-sum-norm"``: ``sum_b s_b / R / loss_scale_factor`` (Dr.GRPO;
      the factor defaults to ``T``, the maximal completion length);
    - ``"token-sum-norm"``: ``sum_b s_b / loss_scale_factor`` (a constant, e.g. the
      global token count under gradient accumulation; required).

    Tunix's names ``"sequence-mean-token-mean"``, ``"sequence-mean-token-scale"``
    and ``"sequence-mean-token-sum-norm"`` are accepted for the 2nd, 4th and 5th.
    Rows without included tokens count in no mean (TRL and Liger divide the
    sequence means by all ``B`` rows; the two agree when no row is empty).

    Args:
      values: per-token losses ``[B, T]``.
      where: optional bool mask ``[B, T]``; excluded tokens are not read.
      mode: the aggregation.
      loss_scale_factor: ``> 0``, the constant of the ``*-norm`` modes.

    Returns:
      A float32 scalar; 0 when no token is included.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusedloss
      >>> v = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
      >>> m = jnp.array([[True, True, True], [True, False, False]])
      >>> print(fusedloss.aggregate_loss(v, m, "token-mean"))
      2.5
      >>> print(fusedloss.aggregate_loss(v, m, "seq-mean-token-mean"))
      3.0
      >>> print(fusedloss.aggregate_loss(v, m, "seq-mean-token-sum-norm"))
      1.6666666
    """
    values = _common.token_log_probs("values", values)
    mask = _common.token_mask(where, values.shape)
    mode = _check_aggregation(mode, loss_scale_factor)
    return _aggregate(values, mask, mode, loss_scale_factor)


def _check_aggregation(mode: Any, loss_scale_factor: Any) -> str:
    mode = AGGREGATION_ALIASES.get(mode, mode) if isinstance(mode, str) else mode
    _common.choice("loss_agg_mode", mode, AGGREGATIONS + tuple(AGGREGATION_ALIASES))
    if loss_scale_factor is not None:
        _common.positive("loss_scale_factor", loss_scale_factor)
    elif mode == "token-sum-norm":
        raise ValueError(
            "`loss_scale_factor` is required for loss_agg_mode='token-sum-norm' (the "
            "constant the token sum is divided by), got None."
        )
    return mode


def _aggregate(values: Array, mask: Array, mode: str, factor: float | None) -> Array:
    if mode == "token-mean":
        return reduce_loss(values, "mean", where=mask)
    row_sum = jnp.sum(jnp.where(mask, values, 0.0), axis=-1)
    row_n = jnp.sum(mask, axis=-1, dtype=jnp.float32)
    rows = jnp.sum(row_n > 0, dtype=jnp.float32)
    if mode == "token-sum-norm":
        return jnp.sum(row_sum) / factor
    if mode == "seq-mean-token-mean":
        return _common.safe_div(jnp.sum(_common.safe_div(row_sum, row_n)), rows)
    total = _common.safe_div(jnp.sum(row_sum), rows)
    if mode == "seq-mean-token-sum":
        return total
    return total / (values.shape[-1] if factor is None else factor)


def kl_penalty(
    log_probs: ArrayLike,
    ref_log_probs: ArrayLike,
    estimator: str = "k3",
    *,
    clamp: float | None = None,
) -> Array:
    r"""Per-token estimates of ``KL(policy || reference)`` from sampled tokens.

    With ``d = log_probs - ref_log_probs``: ``"k1"`` is ``d`` (Tunix ``"kl"``),
    ``"k2"`` is ``d**2 / 2`` (Tunix ``"mse_kl"``) and ``"k3"`` is
    ``exp(-d) + d - 1`` (Tunix ``"low_var_kl"``, TRL's and Liger's only estimator).
    ``clamp`` clips the estimate to ``[-clamp, clamp]``.

    Args:
      log_probs: the policy's log-probabilities of the sampled tokens (any shape).
      ref_log_probs: the reference's, same shape.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (or Tunix's names).
      clamp: optional ``> 0`` bound.

    Returns:
      float32 estimates with the shape of ``log_probs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusedloss
      >>> lp, ref = jnp.log(jnp.array([0.5, 0.25])), jnp.log(jnp.array([0.25, 0.5]))
      >>> fusedloss.kl_penalty(lp, ref, "k2")
      Array([0.2402265, 0.2402265], dtype=float32)
    """
    _checks.check_floating("log_probs", log_probs)
    _checks.check_floating("ref_log_probs", ref_log_probs)
    _checks.check_same_shape("log_probs", log_probs, "ref_log_probs", ref_log_probs)
    est = _check_kl(estimator, clamp)
    lp = jnp.asarray(log_probs).astype(jnp.float32)
    return _kl(lp, jnp.asarray(ref_log_probs).astype(jnp.float32), est, clamp)


def _check_kl(estimator: Any, clamp: Any) -> str:
    if estimator == "full":
        raise ValueError(
            "`kl_estimator='full'` (the exact KL over the vocabulary to a reference head) "
            "cannot share the one fused pass on the policy head: the engine's log-probs "
            "pass gives log-probabilities and entropies, and its distillation pass gives "
            "the full KL only reduced together with a cross-entropy term, never the "
            "per-token log-probabilities with their own gradients. Use 'k1', 'k2' or 'k3' "
            "with reference log-probs (given, or from the frozen reference head)."
        )
    est = KL_ALIASES.get(estimator, estimator) if isinstance(estimator, str) else estimator
    _common.choice("kl_estimator", est, KL_ESTIMATORS + tuple(KL_ALIASES))
    if clamp is not None:
        _common.positive("kl_clamp", clamp)
    return est


def _kl(lp: Array, ref: Array, estimator: str, clamp: float | None) -> Array:
    d = lp - ref
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    else:
        kl = jnp.exp(-d) + d - 1.0
    return kl if clamp is None else jnp.clip(kl, -clamp, clamp)


def policy_gradient_loss(
    log_probs: ArrayLike,
    advantages: ArrayLike,
    *,
    where: ArrayLike | None = None,
    old_log_probs: ArrayLike | None = None,
    ref_log_probs: ArrayLike | None = None,
    entropy: ArrayLike | None = None,
    sampler_is_weights: ArrayLike | None = None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    loss_agg_mode: str | None = None,
    loss_scale_factor: float | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    clip_ratio_c: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float | None = None,
    entropy_coef: float = 0.0,
    sft_where: ArrayLike | None = None,
    sft_coef: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    return_aux: bool = False,
) -> Array | tuple[Array, PolicyGradientAux]:
    r"""Clipped policy-gradient loss of per-token log-probabilities (any source).

    Argument names in the frameworks users come from (Tunix ``GRPOConfig`` / TRL
    ``GRPOConfig`` / Liger ``LigerFusedLinearGRPOLoss``) are given in brackets.

    Args:
      log_probs: ``[B, T]`` log-probabilities of the sampled tokens under the policy
        being trained (differentiable) [Tunix/TRL ``per_token_logps``].
      advantages: ``[B]`` per-sequence (GRPO) or ``[B, T]`` per-token (PPO)
        advantages [``advantages``].
      where: ``[B, T]`` bool, True for completion tokens that count
        [Tunix/TRL ``completion_mask``, Liger ``attention_mask``].
      old_log_probs: ``[B, T]`` log-probs under the sampling policy; None is
        on-policy: ratio ``exp(lp - stop_gradient(lp)) = 1`` with the log-prob's
        gradient [``old_per_token_logps``].
      ref_log_probs: ``[B, T]`` reference log-probs, needed when ``beta > 0``
        [``ref_per_token_logps``].
      entropy: ``[B, T]`` entropies at the sampling temperature, needed when
        ``entropy_coef != 0``.
      sampler_is_weights: ``[B, T]`` truncated importance weights of the sampler
        against the trainer (detached), multiplying the policy term
        [Tunix ``sampler_is_weights``; TRL ``vllm_importance_sampling_correction``].
      loss_type: ``"grpo"``, ``"dapo"``, ``"bnpo"``, ``"dr_grpo"``, ``"ppo"`` (the
        PPO clip with the default aggregations of ``fusedloss.post_training.DEFAULT_AGGREGATION``),
        ``"cispo"`` or ``"sapo"`` [TRL/Liger ``loss_type``; Tunix ``loss_algo``].
      importance_sampling_level: ``"token"``; ``"sequence"`` (GSPO: one ratio per
        sequence, ``exp`` of the mean log-ratio); ``"sequence_token"`` (GSPO-token:
        ``exp(lp - sg(lp) + sg(mean log-ratio))``) [TRL/Liger
        ``importance_sampling_level``; Tunix ``loss_algo="gspo-token"``].
      loss_agg_mode: see :func:`aggregate_loss`; None takes the loss type's default
        [Tunix ``loss_agg_mode``].
      loss_scale_factor: the constant of the ``*-norm`` aggregations (Dr.GRPO's
        maximal completion length; default ``T``) [Tunix ``loss_scale_factor``,
        TRL/Liger ``max_completion_length``].
      epsilon_low: ``> 0``, lower clip ``1 - epsilon_low`` [Tunix ``epsilon``, TRL
        ``epsilon``, Liger ``epsilon_low``].
      epsilon_high: ``> 0``, upper clip ``1 + epsilon_high`` (DAPO's clip-higher);
        default ``epsilon_low``. For CISPO the bound of the ratio itself
        [``epsilon_high``].
      clip_ratio_c: dual-clip constant ``c > 1``; None disables it [Tunix
        ``epsilon_c``, verl ``clip_ratio_c``].
      beta: ``>= 0``, coefficient of the KL penalty [``beta``].
      kl_estimator: ``"k1"``, ``"k2"``, ``"k3"`` (see :func:`kl_penalty`) [Tunix
        ``kl_loss_mode``; TRL and Liger use k3].
      kl_clamp: optional bound of the per-token KL [Tunix ``clamp_value``].
      entropy_coef: coefficient of the entropy bonus (subtracted) [verl
        ``entropy_coeff``].
      sft_where: optional ``[B, T]`` bool mask of tokens whose negative log-likelihood
        (token mean) is added with ``sft_coef``.
      sft_coef: coefficient of that SFT term.
      sapo_temperature_pos: ``> 0``, SAPO's gate temperature for positive
        advantages [TRL/Liger, same name].
      sapo_temperature_neg: ``> 0``, SAPO's gate temperature for non-positive
        advantages [TRL/Liger, same name].
      return_aux: also return :class:`PolicyGradientAux`.

    Returns:
      The float32 scalar loss (and the aux metrics). Rows and tokens without
      included tokens give 0 and no gradient.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> lp = jnp.log(jnp.array([[0.5, 0.25, 0.1], [0.2, 0.4, 0.9]]))
      >>> adv = jnp.array([1.0, -1.0])
      >>> mask = jnp.array([[True, True, False], [True, True, True]])
      >>> loss_fn = jax.jit(lambda lp: fusedloss.policy_gradient_loss(lp, adv, where=mask))
      >>> print(f"{float(loss_fn(lp)):.4f}")  # on-policy: ratio 1, -(mean A) over rows
      0.0000
      >>> g = jax.jit(jax.grad(loss_fn))(lp)
      >>> print(g)  # -A / (2 n_b): the REINFORCE gradient, per row's token mean
      [[-0.25       -0.25        0.        ]
       [ 0.16666667  0.16666667  0.16666667]]
    """
    lp = _common.token_log_probs("log_probs", log_probs)
    shape = lp.shape
    mask = _common.token_mask(where, shape)
    opts = _check_options(
        loss_type,
        importance_sampling_level,
        loss_agg_mode,
        loss_scale_factor,
        epsilon_low,
        epsilon_high,
        clip_ratio_c,
        beta,
        kl_estimator,
        kl_clamp,
        entropy_coef,
        sft_coef,
        sapo_temperature_pos,
        sapo_temperature_neg,
        return_aux,
    )
    adv = _check_advantages(advantages, shape)
    what = "the shape of `log_probs`"
    old = (
        None
        if old_log_probs is None
        else _common.token_array("old_log_probs", old_log_probs, shape, what)
    )
    ref = (
        None
        if ref_log_probs is None
        else _common.token_array("ref_log_probs", ref_log_probs, shape, what)
    )
    ent = None if entropy is None else _common.token_array("entropy", entropy, shape, what)
    isw = (
        None
        if sampler_is_weights is None
        else _common.token_array("sampler_is_weights", sampler_is_weights, shape, what)
    )
    sft = None if sft_where is None else _common.token_mask(sft_where, shape, "sft_where")
    if opts["beta"] > 0 and ref is None:
        raise ValueError("`ref_log_probs` is required when `beta` > 0 (the KL penalty).")
    if opts["entropy_coef"] != 0 and ent is None:
        raise ValueError("`entropy` is required when `entropy_coef` != 0 (the entropy bonus).")
    if opts["sft_coef"] != 0 and sft is None:
        raise ValueError("`sft_where` is required when `sft_coef` != 0 (the SFT term).")
    return _policy_gradient(lp, adv, mask, old, ref, ent, isw, sft, opts)


def _check_advantages(advantages: Any, shape: tuple[int, int]) -> Array:
    _checks.check_floating("advantages", advantages)
    got = jnp.shape(advantages)
    if got not in (shape[:1], shape):
        raise ValueError(
            f"`advantages` must have shape {shape[:1]} (per sequence) or {shape} (per "
            f"token), got {got}."
        )
    adv = jnp.asarray(advantages).astype(jnp.float32)
    return jnp.broadcast_to(adv[:, None], shape) if adv.ndim == 1 else adv


def _check_options(
    loss_type,
    level,
    agg,
    factor,
    eps_low,
    eps_high,
    clip_c,
    beta,
    kl_estimator,
    kl_clamp,
    entropy_coef,
    sft_coef,
    tau_pos,
    tau_neg,
    return_aux,
) -> dict[str, Any]:
    _common.choice("loss_type", loss_type, LOSS_TYPES)
    _common.choice("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    agg = _check_aggregation(DEFAULT_AGGREGATION[loss_type] if agg is None else agg, factor)
    eps_low = _common.positive("epsilon_low", eps_low)
    eps_high = eps_low if eps_high is None else _common.positive("epsilon_high", eps_high)
    if clip_c is not None:
        clip_c = _common.positive("clip_ratio_c", clip_c, low=1.0)
    if not isinstance(return_aux, bool):
        raise TypeError(f"`return_aux` must be a bool, got {return_aux!r}.")
    return dict(
        loss_type=loss_type,
        level=level,
        agg=agg,
        factor=factor,
        eps_low=eps_low,
        eps_high=eps_high,
        clip_c=clip_c,
        beta=_common.nonnegative("beta", beta),
        kl=_check_kl(kl_estimator, kl_clamp),
        kl_clamp=kl_clamp,
        entropy_coef=_common.static_float("entropy_coef", entropy_coef),
        sft_coef=_common.static_float("sft_coef", sft_coef),
        tau_pos=_common.positive("sapo_temperature_pos", tau_pos),
        tau_neg=_common.positive("sapo_temperature_neg", tau_neg),
        return_aux=return_aux,
    )


def _policy_gradient(lp, adv, mask, old, ref, ent, isw, sft, o):
    sg = jax.lax.stop_gradient
    fmask = mask.astype(jnp.float32)
    # Excluded tokens are never read: their inputs may hold anything (NaN, inf).
    lp_in = jnp.where(mask, lp, 0.0)
    old = sg(lp_in) if old is None else jnp.where(mask, sg(old), 0.0)
    adv = jnp.where(mask, sg(adv), 0.0)
    log_ratio = lp_in - old
    if o["level"] == "token":
        log_w = log_ratio
    else:
        n = jnp.sum(fmask, axis=-1, keepdims=True)
        seq = _common.safe_div(jnp.sum(log_ratio, axis=-1, keepdims=True), n)
        if o["level"] == "sequence":
            log_w = jnp.broadcast_to(seq, lp.shape)
        else:
            log_w = lp_in - sg(lp_in) + sg(jnp.broadcast_to(seq, lp.shape))
    ratio = jnp.exp(jnp.where(mask, log_w, 0.0))

    zeros = jnp.zeros(lp.shape, bool)
    low, high, dual = zeros, zeros, zeros
    if o["loss_type"] == "cispo":
        pg = -sg(jnp.minimum(ratio, o["eps_high"])) * adv * lp_in
        high = ratio > o["eps_high"]
    elif o["loss_type"] == "sapo":
        tau = jnp.where(adv > 0, o["tau_pos"], o["tau_neg"])
        pg = -(4.0 / tau) * jax.nn.sigmoid(tau * (ratio - 1.0)) * adv
    else:
        lo, hi = 1.0 - o["eps_low"], 1.0 + o["eps_high"]
        pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, lo, hi))
        low = (ratio < lo) & (adv < 0)
        high = (ratio > hi) & (adv > 0)
        if o["clip_c"] is not None:
            bound = -o["clip_c"] * adv
            dual = (adv < 0) & (pg > bound)
            pg = jnp.where(adv < 0, jnp.minimum(pg, bound), pg)
    if isw is not None:
        pg = pg * sg(jnp.where(mask, isw, 0.0))

    per_token = pg
    kl = None
    if ref is not None:
        kl = _kl(lp_in, jnp.where(mask, sg(ref), 0.0), o["kl"], o["kl_clamp"])
        if o["beta"] > 0:
            per_token = per_token + o["beta"] * kl
    ent_in = None if ent is None else jnp.where(mask, ent, 0.0)
    if o["entropy_coef"] != 0:
        per_token = per_token - o["entropy_coef"] * ent_in
    loss = _aggregate(per_token, mask, o["agg"], o["factor"])
    if o["sft_coef"] != 0:
        loss = loss + o["sft_coef"] * reduce_loss(-lp, "mean", where=sft)
    if not o["return_aux"]:
        return loss

    def mean(v):
        return sg(reduce_loss(v.astype(jnp.float32), "mean", where=mask))

    any_token = jnp.any(mask)
    aux = PolicyGradientAux(
        pg_loss=sg(_aggregate(pg, mask, o["agg"], o["factor"])),
        kl=jnp.float32(0.0) if kl is None else mean(kl),
        entropy=jnp.float32(0.0) if ent_in is None else mean(ent_in),
        clip_fraction_low=mean(low),
        clip_fraction_high=mean(high),
        dual_clip_fraction=mean(dual),
        approx_kl=mean(old - lp_in),
        ratio_mean=mean(ratio),
        ratio_min=sg(jnp.where(any_token, jnp.min(jnp.where(mask, ratio, jnp.inf)), 0.0)),
        ratio_max=sg(jnp.where(any_token, jnp.max(jnp.where(mask, ratio, -jnp.inf)), 0.0)),
        num_tokens=jnp.sum(mask, dtype=jnp.int32),
    )
    return loss, aux


def linear_policy_gradient_loss(
    x: ArrayLike,
    w: Head,
    tokens: ArrayLike,
    advantages: ArrayLike,
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
) -> Array | tuple[Array, PolicyGradientAux]:
    r""":func:`policy_gradient_loss` on the policy head's hidden states, one fused pass.

    The policy's log-probabilities and entropies of ``tokens`` under
    ``softmax(softcap(x @ w + bias) / temperature)`` come from ONE
    :func:`~fusedloss.linear_log_probs` call on ``w`` (the tokens of the SFT term
    included), so the ``[B * T, V]`` logits are never formed and one ``dw`` is held.
    Reference log-probs are given (``ref_log_probs=``) or computed from a frozen
    reference head (``ref_x``, ``ref_w``, ``ref_bias``: no gradient reaches it, at
    the same temperature and softcap).

    Args:
      x: ``[B, T, D]`` hidden states of the completion tokens: ``x[b, t]`` scores
        ``tokens[b, t]`` (shift them before the call) [Liger ``_input``].
      w: ``[D, V]`` head kernel, or :class:`~fusedloss.Transposed` of a tied
        ``[V, D]`` embedding [Liger ``weight`` is ``[V, D]``].
      tokens: ``[B, T]`` int sampled tokens [Liger ``selected_token_ids``, Tunix/TRL
        ``completion_ids``].
      advantages: ``[B]`` or ``[B, T]``.
      bias: optional ``[V]`` head bias.
      where: ``[B, T]`` bool completion mask.
      ref_x: optional frozen reference head's hidden states ``[B, T, Dr]`` [Liger
        ``ref_input``]; no gradient flows to the reference head.
      ref_w: its ``[Dr, V]`` kernel (or :class:`~fusedloss.Transposed`) [Liger
        ``ref_weight``].
      ref_bias: its optional ``[V]`` bias [Liger ``ref_bias``].
      temperature: the sampling temperature; log-probs and entropies are those of
        ``logits / temperature`` [TRL/Liger ``temperature``].
      logit_softcap: optional softcap of the logits.
      mesh: run on ``mesh`` through :func:`~fusedloss.sharded_linear_log_probs`.
      data_axis: the mesh axis the batch is split over.
      model_axis: the mesh axis the vocabulary is split over.
      implementation: the fused head's backend (as in
        :func:`~fusedloss.linear_log_probs`).
      config: the backend's tuning dataclass.
      **options: every keyword of :func:`policy_gradient_loss` (``old_log_probs``,
        ``ref_log_probs``, ``loss_type``, ``beta``, ``entropy_coef``, ``sft_where``,
        ``return_aux``, ...).

    Returns:
      As :func:`policy_gradient_loss`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> kx, kw, kt, ka = jax.random.split(jax.random.key(0), 4)
      >>> x = jax.random.normal(kx, (4, 6, 16))  # 4 completions of 6 tokens
      >>> w = jax.random.normal(kw, (16, 500)) / 4
      >>> tokens = jax.random.randint(kt, (4, 6), 0, 500)
      >>> adv = jax.random.normal(ka, (4,))
      >>> @jax.jit
      ... def both(x, w):
      ...     loss, aux = fusedloss.linear_policy_gradient_loss(
      ...         x, w, tokens, adv, temperature=0.9, loss_type="dapo",
      ...         epsilon_high=0.28, entropy_coef=1e-3, return_aux=True)
      ...     lp, ent = fusedloss.linear_log_probs(x, w, tokens, temperature=0.9,
      ...                                          return_entropy=True)
      ...     want = fusedloss.policy_gradient_loss(lp, adv, entropy=ent,
      ...         loss_type="dapo", epsilon_high=0.28, entropy_coef=1e-3)
      ...     return loss, want, aux
      >>> loss, want, aux = both(x, w)
      >>> bool(jnp.allclose(loss, want)), float(aux.ratio_mean)
      (True, 1.0)
    """
    lp_shape = jnp.shape(tokens)
    mask = _common.token_mask(where, lp_shape)
    sft = options.get("sft_where")
    call_mask = mask if sft is None else mask | _common.token_mask(sft, lp_shape, "sft_where")
    want_entropy = options.get("entropy_coef", 0.0) != 0 or options.get("return_aux", False)
    if "entropy" in options:
        raise TypeError("`entropy` is computed by the fused pass; do not pass it.")
    use_ref = _common.check_reference_head(
        ref_x, ref_w, options.get("ref_log_probs"), "ref_log_probs"
    )
    kw = dict(
        mesh=mesh, data_axis=data_axis, model_axis=model_axis,
        implementation=implementation, config=config,
    )  # fmt: skip
    out = _common.fused_log_probs(
        x, w, tokens, bias=bias, where=call_mask, temperature=temperature,
        logit_softcap=logit_softcap, return_entropy=bool(want_entropy), **kw,
    )  # fmt: skip
    lp, ent = out if want_entropy else (out, None)
    if use_ref:
        options["ref_log_probs"] = _common.frozen_log_probs(
            ref_x, ref_w, ref_bias, tokens, mask,
            temperature=temperature, logit_softcap=logit_softcap, **kw,
        )  # fmt: skip
    return policy_gradient_loss(lp, advantages, where=mask, entropy=ent, **options)
