"""Float64 NumPy oracles of the fused heads and the objectives built on them.

Nothing here imports ``fusedloss``: values come from the definitions (the papers'
formulas for the objectives), gradients from closed forms written by hand (the
distillation heads) or from central finite differences of these float64 functions
(:func:`finite_difference`, the objectives), so an oracle cannot share a bug with
the library.

- Distillation (``distill_*``): the teacher-head divergences with the hard-label term
  and the top-K KL; inputs are flattened tokens ``[N, D]`` (a test slices away what
  ``shift`` drops before calling). :func:`assert_within_error_budget` holds
  low-precision gradients to the error of the naive low-precision computation.
- Post-training (``pt_*``): the policy head's log-probabilities, the policy-gradient
  family (GRPO, DAPO, Dr.GRPO, BNPO, GSPO, PPO dual-clip, CISPO, SAPO, Schulman's
  k1/k2/k3) and the preference family (DPO and its variants, SimPO, ORPO, CPO, KTO).
"""

from __future__ import annotations

import math

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def _head_logits(x, w, bias, cap):
    """(softcapped logits ``[N, V]``, d(softcapped)/d(raw)) of ``x @ w + bias``."""
    raw = x @ w
    if bias is not None:
        raw = raw + bias[None, :]
    if cap is None:
        return raw, np.ones_like(raw)
    t = np.tanh(raw / cap)
    return cap * t, 1.0 - t * t


def _log_softmax(s):
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return s - m - np.log(np.sum(np.exp(s - m), axis=-1, keepdims=True))


def _plogq(p, a):
    """``p * a`` with ``0 * anything = 0``."""
    return np.where(p > 0, p * np.where(p > 0, a, 0.0), 0.0)


def _reduce(per, valid, weights, reduction, cotangent):
    """(loss, per-token coefficient, per-token cotangent of the unweighted loss)."""
    wts = np.where(valid, 1.0 if weights is None else weights, 0.0)
    if reduction == "none":
        coef = wts
        ct = coef * (np.zeros_like(per) if cotangent is None else np.asarray(cotangent))
        return np.where(valid, per, 0.0) * coef, coef, ct
    coef = wts / (wts.sum() if reduction == "mean" and wts.sum() > 0 else 1.0)
    ct = coef * (1.0 if cotangent is None else float(cotangent))
    return np.sum(np.where(valid, per, 0.0) * coef), coef, ct


def distill_teacher_head_oracle(
    x, w, teacher_x, teacher_w, *, divergence="forward_kl", beta=0.5, temperature=1.0,
    bias=None, teacher_bias=None, softcap=None, teacher_softcap=None, labels=None,
    hard_label_weight=0.0, ignore_index=None, valid=None, weights=None, reduction="mean",
    cotangent=None,
):  # fmt: skip
    """The teacher-head distillation loss, its terms and the student's gradients.

    Per token: the divergence between the teacher's ``p = softmax(u / T)`` and the
    student's ``q = softmax(z / T)`` (``z``, ``u`` softcapped logits), and the
    student's cross-entropy at temperature 1 against ``labels`` (computed whenever
    labels are given); the loss is ``(1 - a) div + a ce`` (``div`` alone without
    labels). ``x`` ``[N, D]``, ``w`` ``[D, V]`` (plain layout: a test transposes a
    ``Transposed`` head before calling); ``valid``: the ``where`` mask (tokens
    whose label is ``ignore_index`` are excluded too). ``cotangent``: of the output (per token for
    ``reduction="none"``; 1 by default).

    Returns a dict: ``loss``, ``divergence`` and ``hard_loss`` (the terms reduced like
    the loss, before their weights), ``num_tokens``, ``weight_sum``, ``dx``, ``dw``,
    ``dbias`` (None without a bias).
    """
    x, w, xt, wt = _f64(x), _f64(w), _f64(teacher_x), _f64(teacher_w)
    bias, teacher_bias, weights = _f64(bias), _f64(teacher_bias), _f64(weights)
    n, v = x.shape[0], w.shape[1]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    if labels is not None:
        labels = np.asarray(labels)
        if ignore_index is not None:
            valid = valid & (labels != ignore_index)
    # Excluded rows contribute nothing: their (possibly non-finite) inputs are unused.
    x = np.where(valid[:, None], x, 0.0)
    xt = np.where(valid[:, None], xt, 0.0)
    z, dz_draw = _head_logits(x, w, bias, softcap)
    u, _ = _head_logits(xt, wt, teacher_bias, teacher_softcap)
    t = temperature
    lq, lp = _log_softmax(z / t), _log_softmax(u / t)
    q, p = np.exp(lq), np.exp(lp)
    if divergence == "forward_kl":
        div = np.sum(_plogq(p, lp - lq), -1)
        g_s = q - p  # d div / d (z / T)
    elif divergence == "reverse_kl":
        div = np.sum(_plogq(q, lq - lp), -1)
        g_s = _plogq(q, lq - lp - div[:, None])
    elif divergence == "jsd":
        m = beta * p + (1 - beta) * q
        lm = np.log(np.where(m > 0, m, 1.0))
        k = np.sum(_plogq(q, lq - lm), -1)
        div = beta * np.sum(_plogq(p, lp - lm), -1) + (1 - beta) * k
        g_s = (1 - beta) * _plogq(q, lq - lm - k[:, None])
    else:
        raise ValueError(divergence)
    a = hard_label_weight if labels is not None else 0.0
    if labels is not None:
        l1 = _log_softmax(z)
        lab = np.where(valid, labels, 0)
        ce = -l1[np.arange(n), lab]
        onehot = np.arange(v)[None, :] == lab[:, None]
        g_ce = np.exp(l1) - onehot
    else:
        ce, g_ce = np.zeros(n), np.zeros_like(z)
    per = (1 - a) * div + a * ce
    loss, coef, ct = _reduce(per, valid, weights, reduction, cotangent)
    ct = np.where(valid, ct, 0.0)
    dlogits = ((1 - a) * g_s / t + a * g_ce) * ct[:, None] * dz_draw
    dlogits = np.where(valid[:, None], dlogits, 0.0)
    red = (lambda a_: a_) if reduction == "none" else np.sum
    return dict(
        loss=loss,
        divergence=red(np.where(valid, div, 0.0) * coef),
        hard_loss=red(np.where(valid, ce, 0.0) * coef),
        num_tokens=int(valid.sum()),
        weight_sum=float(np.where(valid, 1.0 if weights is None else weights, 0.0).sum()),
        dx=dlogits @ w.T,
        dw=x.T @ dlogits,
        dbias=None if bias is None else dlogits.sum(0),
    )


def distill_topk_oracle(
    x, w, teacher_ids, teacher_log_probs, *, temperature=1.0, bias=None, softcap=None,
    valid=None, weights=None, reduction="mean", cotangent=None,
):  # fmt: skip
    """The K + 1-bin forward KL of the top-K distillation and the student's gradients.

    ``KL = sum_k p_k (log p_k - log q_k) + r_p (log r_p - log r_q)`` with ``r = 1 -
    sum_k (.)_k`` (``r_p`` clipped at 0, ``0 log 0 = 0``); ``q = softmax(z / T)``.
    Its gradient w.r.t. ``z / T`` is ``q - p [j in K] - (r_p / r_q) q [j not in K]``.
    Returns a dict: ``loss``, ``dx``, ``dw``, ``dbias``.
    """
    x, w, bias, weights = _f64(x), _f64(w), _f64(bias), _f64(weights)
    tlp = _f64(teacher_log_probs)
    ids = np.asarray(teacher_ids)
    n, v = x.shape[0], w.shape[1]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    x = np.where(valid[:, None], x, 0.0)
    tlp = np.where(valid[:, None], tlp, 0.0)
    ids = np.where(valid[:, None], ids, 0)
    z, dz_draw = _head_logits(x, w, bias, softcap)
    lq = _log_softmax(z / temperature)
    q = np.exp(lq)
    rows = np.arange(n)[:, None]
    lqk = lq[rows, ids]
    pk = np.exp(tlp)
    rp = np.maximum(1.0 - pk.sum(-1), 0.0)
    rq = 1.0 - np.exp(lqk).sum(-1)
    kl = np.sum(_plogq(pk, tlp - lqk), -1)
    kl = kl + np.where(rp > 0, rp * (np.log(np.where(rp > 0, rp, 1.0)) - np.log(rq)), 0.0)
    loss, _, ct = _reduce(kl, valid, weights, reduction, cotangent)
    inside = np.zeros((n, v), bool)
    inside[rows, ids] = True
    p_full = np.zeros((n, v))
    p_full[rows, ids] = pk
    ratio = np.where(rp > 0, rp / rq, 0.0)[:, None]
    g_s = q - p_full - ratio * np.where(inside, 0.0, q)
    dlogits = np.where(valid[:, None], g_s / temperature * ct[:, None] * dz_draw, 0.0)
    return dict(
        loss=loss,
        dx=dlogits @ w.T,
        dw=x.T @ dlogits,
        dbias=None if bias is None else dlogits.sum(0),
    )


def assert_within_error_budget(name, got, naive, ref):
    """The fused low-precision result is no further from the float64 ``ref`` than the
    materialized computation in the same precision (``naive``), plus one bf16 unit at
    the output's scale (the fused paths round the logits' gradient to the input dtype
    before the matmuls, as tensor-core kernels do)."""
    got, naive, ref = (np.asarray(a, np.float64) for a in (got, naive, ref))
    err = np.abs(got - ref).max()
    budget = np.abs(naive - ref).max()
    assert err <= 1.25 * budget + 2**-8 * np.abs(ref).max(), (name, err, budget)


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
