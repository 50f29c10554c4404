"""Float64 NumPy oracles written from the papers' formulas.

Nothing here imports fusedloss: each oracle is an independent, loop-by-loop reading of
its paper (or of the framework's documented definition where the papers leave a
convention open), so a shared helper cannot hide a shared bug. Gradients come from
central finite differences of these float64 functions (:func:`finite_difference`).

Post-training oracles (``pt_*``): the policy head's log-probabilities, the
policy-gradient family (GRPO, DAPO, Dr.GRPO, BNPO, GSPO, PPO dual-clip, CISPO,
SAPO, Schulman's k1/k2/k3) and the preference family (DPO and its variants,
SimPO, ORPO, CPO, KTO).
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------------------------
# Shared numerics (float64)


def finite_difference(f, arrays, index, eps=1e-6):
    """Central finite differences of the scalar ``f(*arrays)`` w.r.t. ``arrays[index]``."""
    arrays = [np.array(a, np.float64, copy=True) for a in arrays]
    target = arrays[index]
    grad = np.zeros_like(target)
    flat, gflat = target.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = f(*arrays)
        flat[i] = keep - eps
        down = f(*arrays)
        flat[i] = keep
        gflat[i] = (up - down) / (2 * eps)
    return grad


def _log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _sigmoid(z):
    return math.exp(_log_sigmoid(z))


# ---------------------------------------------------------------------------------
# Post-training: the policy head


def pt_head_log_probs(x, w, bias, tokens, temperature=1.0, softcap=None):
    """Per-token ``log softmax(softcap(x @ w + b) / T)[token]`` and entropy, ``[B, T]``."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    z = np.einsum("btd,dv->btv", x, w)
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    z = z / temperature
    m = z.max(-1, keepdims=True)
    logz = m[..., 0] + np.log(np.exp(z - m).sum(-1))
    logp_all = z - logz[..., None]
    lp = np.take_along_axis(logp_all, np.asarray(tokens)[..., None], -1)[..., 0]
    ent = -(np.exp(logp_all) * logp_all).sum(-1)
    return lp, ent


# ---------------------------------------------------------------------------------
# Post-training: policy gradient


def pt_kl(lp, ref, estimator, clamp=None):
    """Schulman's estimators of KL(policy || reference) from one sample."""
    ratio = math.exp(ref - lp)  # pi_ref / pi
    if estimator == "k1":
        v = -math.log(ratio)
    elif estimator == "k2":
        v = 0.5 * math.log(ratio) ** 2
    else:
        v = ratio - 1.0 - math.log(ratio)
    if clamp is not None:
        v = min(max(v, -clamp), clamp)
    return v


def pt_aggregate(values, mask, mode, factor=None):
    """Loss aggregation over ``[B, T]`` with rows without tokens counted nowhere."""
    rows = []
    for b in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[b, t]]
        if idx:
            rows.append((sum(values[b, t] for t in idx), len(idx)))
    if not rows:
        return 0.0
    if mode == "token-mean":
        return sum(s for s, _ in rows) / sum(n for _, n in rows)
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(s for s, _ in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(s for s, _ in rows) / len(rows) / (values.shape[1] if factor is None else factor)
    if mode == "token-sum-norm":
        return sum(s for s, _ in rows) / factor
    raise ValueError(mode)


PT_DEFAULT_AGG = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "cispo": "token-mean",
    "ppo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


def pt_policy_gradient(
    lp,
    frozen_lp,
    adv,
    mask,
    *,
    old=None,
    ref=None,
    ent=None,
    isw=None,
    sft_mask=None,
    loss_type="grpo",
    level="token",
    agg=None,
    factor=None,
    eps_low=0.2,
    eps_high=None,
    clip_c=None,
    beta=0.0,
    kl="k3",
    kl_clamp=None,
    entropy_coef=0.0,
    sft_coef=0.0,
    tau_pos=1.0,
    tau_neg=1.05,
):
    """The clipped surrogate, per token, from the papers.

    ``frozen_lp`` holds the log-probs at which stop-gradients are evaluated (the
    on-policy "old" log-probs, GSPO-token's detached terms, CISPO's detached weight),
    so finite differences of this function give the gradient the objective defines.
    """
    B, T = lp.shape
    eps_high = eps_low if eps_high is None else eps_high
    agg = PT_DEFAULT_AGG[loss_type] if agg is None else agg
    old = frozen_lp if old is None else old
    a = np.broadcast_to(adv[:, None], (B, T)) if adv.ndim == 1 else adv
    per_token = np.zeros((B, T))
    pg_only = np.zeros((B, T))
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        seq = sum(lp[b, t] - old[b, t] for t in idx) / len(idx) if idx else 0.0
        seq_frozen = sum(frozen_lp[b, t] - old[b, t] for t in idx) / len(idx) if idx else 0.0
        for t in idx:
            if level == "token":
                r = math.exp(lp[b, t] - old[b, t])
            elif level == "sequence":
                r = math.exp(seq)
            else:
                r = math.exp(lp[b, t] - frozen_lp[b, t] + seq_frozen)
            A = a[b, t]
            if loss_type == "cispo":
                # The weight is detached: evaluated at the frozen point.
                if level == "token":
                    r_frozen = math.exp(frozen_lp[b, t] - old[b, t])
                else:
                    r_frozen = math.exp(seq_frozen)
                pg = -min(r_frozen, eps_high) * A * lp[b, t]
            elif loss_type == "sapo":
                tau = tau_pos if A > 0 else tau_neg
                pg = -(4.0 / tau) * _sigmoid(tau * (r - 1.0)) * A
            else:
                pg = max(-A * r, -A * min(max(r, 1 - eps_low), 1 + eps_high))
                if clip_c is not None and A < 0:
                    pg = min(pg, -clip_c * A)
            if isw is not None:
                pg *= isw[b, t]
            v = pg
            if beta > 0:
                v += beta * pt_kl(lp[b, t], ref[b, t], kl, kl_clamp)
            if entropy_coef:
                v -= entropy_coef * ent[b, t]
            per_token[b, t], pg_only[b, t] = v, pg
    loss = pt_aggregate(per_token, mask, agg, factor)
    if sft_coef:
        idx = [(b, t) for b in range(B) for t in range(T) if sft_mask[b, t]]
        loss += sft_coef * (-sum(lp[b, t] for b, t in idx) / len(idx) if idx else 0.0)
    return loss


# ---------------------------------------------------------------------------------
# Post-training: preference


def pt_preference(lp, frozen_lp, mask, ref, loss_type, beta=0.1, eps=0.0, gamma=0.5, nll_coef=None):
    """Mean over pairs (chosen rows first) with tokens on both sides, plus the NLL."""
    ls = _log_sigmoid
    P = lp.shape[0] // 2
    if nll_coef is None:
        nll_coef = 1.0 if loss_type in ("rpo", "cpo", "orpo") else 0.0
    sums = [sum(lp[i, t] for t in range(lp.shape[1]) if mask[i, t]) for i in range(2 * P)]
    frozen = [sum(frozen_lp[i, t] for t in range(lp.shape[1]) if mask[i, t]) for i in range(2 * P)]
    lens = [int(mask[i].sum()) for i in range(2 * P)]
    pairs = [p for p in range(P) if lens[p] and lens[P + p]]

    def smoothed(z):
        return -(1 - eps) * ls(z) - eps * ls(-z)

    if loss_type == "bco_pair":  # detached mean reward over the counted rows
        rewards = [beta * (frozen[i] - ref[i]) for p in pairs for i in (p, P + p)]
        delta = sum(rewards) / len(rewards) if rewards else 0.0
    losses = []
    for p in pairs:
        c, r = p, P + p
        if loss_type == "ipo":
            hc = sums[c] / lens[c] - ref[c] / lens[c]
            hr = sums[r] / lens[r] - ref[r] / lens[r]
        elif ref is not None:
            hc, hr = sums[c] - ref[c], sums[r] - ref[r]
        h = None if ref is None else hc - hr
        if loss_type in ("sigmoid", "rpo"):
            v = smoothed(beta * h)
        elif loss_type == "hinge":
            v = max(0.0, 1 - beta * h)
        elif loss_type == "ipo":
            v = (h - 1 / (2 * beta)) ** 2
        elif loss_type == "robust":
            v = (-(1 - eps) * ls(beta * h) + eps * ls(-beta * h)) / (1 - 2 * eps)
        elif loss_type == "exo_pair":
            e = eps or 1e-3
            z = beta * h
            v = _sigmoid(z) * (ls(z) - math.log(1 - e)) + _sigmoid(-z) * (ls(-z) - math.log(e))
        elif loss_type == "nca_pair":
            v = -ls(beta * hc) - 0.5 * ls(-beta * hc) - 0.5 * ls(-beta * hr)
        elif loss_type == "bco_pair":
            v = -ls(beta * hc - delta) - ls(-(beta * hr - delta))
        elif loss_type == "sppo_hard":
            v = (hc - 1 / (2 * beta)) ** 2 + (hr + 1 / (2 * beta)) ** 2
        elif loss_type == "apo_zero":
            v = (1 - _sigmoid(beta * hc)) + _sigmoid(beta * hr)
        elif loss_type == "apo_down":
            v = _sigmoid(beta * hc) + (1 - _sigmoid(beta * (hc - hr)))
        elif loss_type == "simpo":
            v = smoothed(beta * (sums[c] / lens[c] - sums[r] / lens[r]) - gamma)
        elif loss_type == "cpo":
            v = smoothed(beta * (sums[c] - sums[r]))
        elif loss_type == "orpo":
            ac, ar = sums[c] / lens[c], sums[r] / lens[r]
            log_odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
            v = -beta * ls(log_odds)
        else:
            raise ValueError(loss_type)
        losses.append(v)
    loss = sum(losses) / len(losses) if losses else 0.0
    if nll_coef:
        toks = [lp[p, t] for p in pairs for t in range(lp.shape[1]) if mask[p, t]]
        loss += nll_coef * (-sum(toks) / len(toks) if toks else 0.0)
    return loss


def pt_kto(
    lp,
    frozen_lp,
    mask,
    desirable,
    ref,
    *,
    kl_rows=None,
    kl_baseline=None,
    beta=0.1,
    w_d=1.0,
    w_u=1.0,
):
    """KTO (Ethayarajh et al.): value of each row against the detached KL baseline."""
    B = lp.shape[0]
    lens = [int(mask[i].sum()) for i in range(B)]
    r = [sum(lp[i, t] for t in range(lp.shape[1]) if mask[i, t]) - ref[i] for i in range(B)]
    r_frozen = [
        sum(frozen_lp[i, t] for t in range(lp.shape[1]) if mask[i, t]) - ref[i] for i in range(B)
    ]
    if kl_rows is not None:
        ks = [r_frozen[i] for i in range(B) if kl_rows[i] and lens[i]]
        z0 = max(0.0, sum(ks) / len(ks)) if ks else 0.0
        rows = [i for i in range(B) if lens[i] and not kl_rows[i]]
    else:
        z0 = max(0.0, kl_baseline or 0.0)
        rows = [i for i in range(B) if lens[i]]
    vals = []
    for i in rows:
        if desirable[i]:
            vals.append(w_d * (1 - _sigmoid(beta * (r[i] - z0))))
        else:
            vals.append(w_u * (1 - _sigmoid(beta * (z0 - r[i]))))
    return sum(vals) / len(vals) if vals else 0.0
