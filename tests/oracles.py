"""float64 NumPy oracles of the fused heads, written from the definitions.

Nothing here imports ``fusedloss``: values and gradients come from the formulas
(closed-form gradients of the logits, then the chain rule by hand), so an oracle
cannot share a bug with the library. Inputs are flattened tokens ``[N, D]``; a
test slices away what ``shift`` drops before calling.
"""

from __future__ import annotations

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
