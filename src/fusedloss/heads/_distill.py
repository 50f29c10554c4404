"""The core of the teacher-head distillation loss: two fused heads, one pass each way.

Student logits ``z = softcap(x @ w + b)``, teacher logits ``u = softcap_t(xt @ wt + bt)``;
at temperature ``T``: ``log q = z/T - LS`` (student), ``log p = u/T - LT`` (teacher).
Per token, the divergence is one of

    forward_kl = sum p (log p - log q)          reverse_kl = sum q (log q - log p)
    jsd = beta sum p (log p - log m) + (1 - beta) sum q (log q - log m),
          m = beta p + (1 - beta) q

and, with hard labels, ``ce = logsumexp(z) - z[label]`` (at temperature 1). The core
returns both per token; the teacher is never differentiated.

Three strategies, chosen by :func:`fusedloss.heads.xla.plan` as for the cross-entropy:

``materialized``
    The whole rows at once, gradients by JAX's autodiff (small problems; the
    ``reference`` implementation).
``grad_in_forward``
    Token blocks over the whole vocabulary: both heads' logits of a block, the
    block's log-sum-exps, the losses and the closed-form gradient of the student's
    logits (the softmaxes formed once for all three), then the ``dx``/``dw``
    products, in the forward pass (a reduced loss only). The same matmuls as the
    materialized computation. Columns of probability 0 on both heads (a -inf bias)
    add nothing, to the gradients either.
``recompute``
    Vocabulary chunks with online statistics; the forward keeps per-token scalars
    (the log-sum-exps, the divergence or its ``K``), the backward recomputes each
    block of both heads and applies the closed-form gradient. Any per-token
    cotangent. The vocabulary may be split over mesh ``axes`` (inside
    ``shard_map``): only per-token scalars cross them. Masked columns (probability 0
    on both heads) add nothing here either, whole chunks of them included.

Both chunked strategies are ``custom_jvp`` rules whose tangents are linear maps
(:mod:`fusedloss.heads._tangents`): evaluated, forward mode; transposed by JAX,
exactly the backward described above (reverse mode keeps its residuals and memory).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fusedloss import _ce_math
from fusedloss.heads import _tangents
from fusedloss.heads._engine import Hyper, Problem, cdiv
from fusedloss.heads._registry import candidates, check_config
from fusedloss.heads._tokens import psum_over
from fusedloss.heads.xla import (
    XlaConfig,
    XlaPlan,
    _accumulate_columns,
    _chunk_start,
    _dw_product,
    _dx_product,
    _put_columns,
    _scale_in_place,
    _slice_bias,
    _stats_token_chunk,
    _w_slice,
)
from fusedloss.heads.xla import plan as xla_plan


class Distill(NamedTuple):
    """Static hyperparameters of the distillation head."""

    divergence: str  # "forward_kl" | "reverse_kl" | "jsd"
    beta: float
    temperature: float
    softcap: float | None
    teacher_softcap: float | None
    hard: bool  # the hard-label cross-entropy is wanted
    vd: bool  # the student's w is stored as [V, D]
    teacher_vd: bool  # the teacher's w is stored as [V, Dt]
    # Vocabulary shards: columns with global ids >= vocab_size are padding.
    vocab_size: int | None = None


class Head(NamedTuple):
    """One head's arrays: tokens ``[N, D]``, ``w`` as stored, optional bias."""

    x: jax.Array
    w: jax.Array
    bias: jax.Array | None


def _rows(a, keep):
    """``a``'s rows where ``keep``, zeros elsewhere: excluded tokens' inputs (NaN or inf
    included) are replaced before any matmul, so that nothing of them reaches a loss, a
    logit or a ``dw`` product (a product with 0 would still carry their NaN)."""
    return jnp.where(keep[:, None], a, jnp.zeros((), a.dtype))


def _logits(x_blk, w_blk, b_blk, cap, vd: bool, dt):
    """Softcapped logits of a block, in the accumulation dtype ``dt``."""
    dims = (((1,), (1,)), ((), ())) if vd else (((1,), (0,)), ((), ()))
    z = jax.lax.dot_general(x_blk, w_blk, dims, preferred_element_type=dt)
    if b_blk is not None:
        z = z + b_blk.astype(dt)[None, :]
    return _ce_math.softcap(z, cap)


# --------------------------------------------------------------------------------------
# Whole rows (materialized and grad_in_forward)
# --------------------------------------------------------------------------------------


def _xlogy_diff(p, a, b):
    """``p * (a - b)`` with ``0 * (anything) = 0`` for a probability ``p`` of 0."""
    return jnp.where(p > 0, p * (a - b), 0.0)


def _xlogy_diff_safe(p, a, b):
    """:func:`_xlogy_diff` whose gradient is 0, not NaN, where ``p`` is 0: ``a`` and
    ``b`` are replaced there before the difference (``-inf - -inf`` of a column of
    probability 0 under both heads would otherwise reach the gradient as ``0 * NaN``)."""
    pos = p > 0
    return jnp.where(pos, p * (jnp.where(pos, a, 0.0) - jnp.where(pos, b, 0.0)), 0.0)


def row_losses(z, u, labels, dh: Distill):
    """Per-row (divergence, cross-entropy) of whole rows of softcapped logits."""
    t = dh.temperature
    ls = jax.nn.log_softmax(z / t, axis=-1)
    lt = jax.nn.log_softmax(u / t, axis=-1)
    q, p = jnp.exp(ls), jnp.exp(lt)
    xd = _xlogy_diff_safe  # differentiated by autodiff
    if dh.divergence == "forward_kl":
        div = jnp.sum(xd(p, lt, ls), axis=-1)
    elif dh.divergence == "reverse_kl":
        div = jnp.sum(xd(q, ls, lt), axis=-1)
    else:
        # logaddexp(-inf, -inf) has a NaN gradient: the columns of probability 0 on
        # both sides (whose summands are 0) take finite stand-ins.
        some = (p > 0) | (q > 0)
        safe = lambda a: jnp.where(some, a, 0.0)
        lm = jnp.logaddexp(safe(math.log(dh.beta) + lt), safe(math.log1p(-dh.beta) + ls))
        div = dh.beta * jnp.sum(xd(p, lt, lm), axis=-1) + (1 - dh.beta) * jnp.sum(
            xd(q, ls, lm), axis=-1
        )
    if not dh.hard:
        return div, jnp.zeros_like(div)
    v = z.shape[-1]
    picked = jnp.take_along_axis(z, jnp.clip(labels, 0, v - 1)[:, None], axis=-1)[:, 0]
    return div, jax.nn.logsumexp(z, axis=-1) - picked


def materialized_losses(student: Head, teacher: Head, labels, valid, dh: Distill):
    """Both rows whole; gradients (student only) by autodiff."""
    dt = _ce_math.acc_dtype(student.x.dtype)
    z = _logits(_rows(student.x, valid), student.w, student.bias, dh.softcap, dh.vd, dt)
    xt = _rows(teacher.x, valid)
    u = _logits(xt, teacher.w, teacher.bias, dh.teacher_softcap, dh.teacher_vd, dt)
    return row_losses(z, jax.lax.stop_gradient(u), labels, dh)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _gif_total(student: Head, teacher: Head, labels, valid, coefs, dh: Distill, plan: XlaPlan):
    # Without differentiation only the losses are needed: the statistics passes.
    stats_plan = plan._replace(tn=_stats_token_chunk(student.x.shape[0]))
    div, ce, _ = _recompute_forward(student, teacher, labels, valid, 0, dh, stats_plan, ())
    total = jnp.sum(jnp.where(valid, coefs[0] * div + coefs[1] * ce, 0.0))
    return total, div, ce


def _row_closed_form(z, u, lab, dh: Distill):
    """Whole rows of softcapped logits: per-row (divergence, cross-entropy), ``ds``
    (the divergence's gradient w.r.t. ``z / T``, as in :func:`_dlogits`), the softmax
    at temperature 1 where it is the student's (``T = 1``) and the log-sum-exp at
    temperature 1. The KL divergences come with the log-sum-exps' sums, as in
    :func:`_recompute_forward` (a summand is 0 where its weight ``exp`` is 0); jsd
    shares its summands with ``ds``: ``q (log q - log m - K) = s - q K`` of the
    summands ``s`` of ``K = sum q (log q - log m)``."""
    t = dh.temperature
    zs, us = z / t, u / t
    ms, es = _max_exp(zs)
    mt, et = _max_exp(us)
    ss, st = jnp.sum(es, axis=-1), jnp.sum(et, axis=-1)
    ls, lt = ms + jnp.log(ss), mt + jnp.log(st)
    lq, lp = zs - ls[:, None], us - lt[:, None]
    q = jnp.exp(lq)
    if dh.divergence == "forward_kl":
        a = jnp.sum(jnp.where(et > 0, et * (us - zs), 0.0), axis=-1)
        div = a / st - lt + ls
        ds = q - jnp.exp(lp)
    elif dh.divergence == "reverse_kl":
        a = jnp.sum(jnp.where(es > 0, es * (zs - us), 0.0), axis=-1)
        div = a / ss - ls + lt
        ds = jnp.where(q > 0, q * (lq - lp - div[:, None]), 0.0)
    else:
        lm = jnp.logaddexp(math.log(dh.beta) + lp, math.log1p(-dh.beta) + lq)
        s = _xlogy_diff(q, lq, lm)
        k = jnp.sum(s, axis=-1)
        div = dh.beta * jnp.sum(_xlogy_diff(jnp.exp(lp), lp, lm), axis=-1) + (1 - dh.beta) * k
        ds = (1 - dh.beta) * (s - q * k[:, None])
    if not dh.hard:
        return div, jnp.zeros_like(div), ds, None, None
    l1 = ls if t == 1.0 else jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, lab[:, None], axis=-1)[:, 0]
    return div, l1 - picked, ds, q if t == 1.0 else None, l1


def _max_exp(a):
    """Row maxima of ``a`` (0 for a row of -inf) and ``exp(a - max)``."""
    m = jnp.max(a, axis=-1)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    return m, jnp.exp(a - m[:, None])


def _gif_pass(student: Head, teacher: Head, labels, valid, coefs, dh: Distill, plan: XlaPlan):
    """Token blocks over the whole vocabulary: losses and unit-cotangent gradients."""
    x, w, bias = student
    n, d = x.shape
    vd = dh.vd
    va = 0 if vd else 1
    tn = min(plan.tn, n)
    dt = _ce_math.acc_dtype(x.dtype)
    c_div, c_ce = coefs
    init = (
        jnp.zeros((n,), dt),  # divergence per token
        jnp.zeros((n,), dt),  # cross-entropy per token
        jnp.zeros((n, d), x.dtype),  # dx
        jnp.zeros(w.shape, dt),  # dw accumulator (stored orientation)
        None if bias is None else jnp.zeros(bias.shape, dt),
    )

    def body(i, carry):
        div_c, ce_c, dx, dw, db = carry
        start, nom = _chunk_start(i, tn, n)
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=tn)
        fresh = (start + jnp.arange(tn)) >= nom
        take = fresh & sl(valid)
        x_blk = _rows(sl(x), take)
        u = _logits(
            _rows(sl(teacher.x), take),
            teacher.w,
            teacher.bias,
            dh.teacher_softcap,
            dh.teacher_vd,
            dt,
        )
        raw = _logits(x_blk, w, bias, None, vd, dt)
        z = _ce_math.softcap(raw, dh.softcap)
        lab = jnp.clip(sl(labels), 0, z.shape[1] - 1)
        div, ce, ds, q1, l1 = _row_closed_form(z, u, lab, dh)
        g_div, g_ce = jnp.where(take, sl(c_div), 0.0), jnp.where(take, sl(c_ce), 0.0)
        cols = jnp.arange(z.shape[1], dtype=lab.dtype)
        dl = _dz(z, ds, q1, lab, l1, g_div, g_ce, dh, cols)
        dl_c = dl.astype(x.dtype)
        put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf, jnp.where(fresh.reshape((tn,) + (1,) * (new.ndim - 1)), new, sl(buf)), start, 0
        )
        dx = put(dx, _dx_product(dl_c, w, va, dt).astype(x.dtype))
        dw = _accumulate_columns(dw, x_blk, dl_c, plan.vc_acc, va)
        if db is not None:
            db = db + jnp.sum(dl, axis=0)
        return put(div_c, div), put(ce_c, ce), dx, dw, db

    div, ce, dx, dw, db = jax.lax.fori_loop(0, cdiv(n, tn), body, init)
    total = jnp.sum(jnp.where(valid, c_div * div + c_ce * ce, 0.0))
    return total, div, ce, dx, dw, db


def _gif_jvp(dh, plan, primals, tangents):
    """The total's tangent is ``<dx, tx> + <dw, tw> + <db, tb> + <losses, tcoefs>`` of the
    gradients the forward pass formed; transposed (reverse mode), it scales them."""
    student = primals[0]
    gif = lambda *a: _gif_pass(*a, dh, plan)
    total, div, ce, dx, dw, db = _tangents.known_call(gif, *primals)
    t_student, t_coefs = tangents[0], tangents[4]
    lin = (t_student.x, t_student.w, t_student.bias, *t_coefs)
    have = tuple(_tangents.present(t) for t in lin)
    zero = _tangents.zero_tangent
    if not any(have):
        return (total, div, ce), (zero(total), zero(div), zero(ce))
    res = [r for r in (dx, dw, db, div, ce) if r is not None]
    dtypes = tuple(None if a is None else jnp.dtype(a.dtype) for a in student[1:])
    static = (have, dtypes, plan.vc_acc, 0 if dh.vd else 1)
    lin = [t for t, h in zip(lin, have, strict=True) if h]
    (t_total,) = _tangents.linear_map(_GIF_RULE, static, res, lin, [jax.typeof(total)])
    return (total, div, ce), (t_total, zero(div), zero(ce))


def _gif_res(res):
    return (res[0], res[1], res[2], res[3], res[4]) if len(res) == 5 else (*res[:2], None, *res[2:])


def _gif_apply(static, res, lin):
    have = static[0]
    lin, acc = list(lin), _ce_math.acc_dtype(res[0].dtype)
    total = jnp.zeros((), acc)
    for g, h in zip(_gif_res(res), have, strict=True):
        if h:
            total = total + jnp.sum(g.astype(acc) * lin.pop(0).astype(acc))
    return (total,)


def _gif_transpose(static, res, cts, undefined):
    have, (w_dtype, b_dtype), vc_acc, va = static
    dx, dw, db, div, ce = _gif_res(res)
    g = cts[0]
    grads = (
        g.astype(dx.dtype) * dx,
        _scale_in_place(dw, g, w_dtype, vc_acc, va),
        None if db is None else (g * db).astype(b_dtype),
        g * div,
        g * ce,
    )
    return tuple(gr for gr, h in zip(grads, have, strict=True) if h)


_GIF_RULE = _tangents.LinearRule(
    "distillation_grad_in_forward_tangents", _gif_apply, _gif_transpose
)
_gif_total.defjvp(_gif_jvp, symbolic_zeros=True)


def gif_losses(student: Head, teacher: Head, labels, valid, coefs, dh: Distill, plan: XlaPlan):
    """(scalar sum of coefs . losses, per-token divergence, per-token cross-entropy)."""
    total, div, ce = _gif_total(student, teacher, labels, valid, coefs, dh, plan)
    return total, jax.lax.stop_gradient(div), jax.lax.stop_gradient(ce)


# --------------------------------------------------------------------------------------
# recompute: vocabulary chunks, per-token scalars, any cotangent, vocabulary shards
# --------------------------------------------------------------------------------------


def _blocks(student: Head, teacher: Head, x_blk, xt_blk, vstart, vc, dh: Distill, dt):
    """The (softcapped) student and teacher logits of one block."""
    sw = _w_slice(student.w, vstart, vc, 0 if dh.vd else 1)
    tw = _w_slice(teacher.w, vstart, vc, 0 if dh.teacher_vd else 1)
    z = _logits(x_blk, sw, _slice_bias(student.bias, vstart, vc), dh.softcap, dh.vd, dt)
    tb = _slice_bias(teacher.bias, vstart, vc)
    u = _logits(xt_blk, tw, tb, dh.teacher_softcap, dh.teacher_vd, dt)
    return z, u


def _columns(vstart, vnom, vc: int, offset, dh: Distill):
    """The columns of a vocabulary chunk that count: not seen by an earlier (clamped)
    chunk, and not padding past the vocabulary."""
    cols = vstart + jnp.arange(vc, dtype=jnp.int32)
    new = cols >= vnom
    return new if dh.vocab_size is None else new & (cols + offset < dh.vocab_size)


def _token_loop(n: int, tn: int, init, step):
    """Runs ``step(rows_slice, fresh_rows, carry_slices) -> new slices`` over token
    chunks of per-token carries (the last chunk clamped; its old rows kept)."""

    def body(i, carry):
        start, nom = _chunk_start(i, tn, n)
        fresh = (start + jnp.arange(tn)) >= nom
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=tn)
        old = tuple(sl(c) for c in carry)
        new = step(sl, fresh, old)
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(c, jnp.where(fresh, nv, ov), start, 0)
            for c, nv, ov in zip(carry, new, old, strict=True)
        )

    return jax.lax.fori_loop(0, cdiv(n, tn), body, init)


def _online(m, acc, block, weights_of):
    """Online update of (running max ``m``, sums ``acc``) with a block of logits;
    ``weights_of(e)`` maps ``exp(block - new max)`` to the summands of each sum."""
    bm = jnp.max(block, axis=1)
    m_new = jnp.maximum(m, bm)
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    scale = jnp.where(jnp.isneginf(m), 0.0, jnp.exp(m - m_safe))
    e = jnp.exp(block - m_safe[:, None])
    return m_new, tuple(
        a * scale + jnp.sum(s, axis=1) for a, s in zip(acc, weights_of(e), strict=True)
    )


def _weighted(e, a):
    """``e * a`` with ``0 * (anything) = 0`` for a weight ``e`` of 0."""
    return jnp.where(e > 0, e * a, 0.0)


def _rescale(m, sums, axes):
    """Per-token (max, sums) of vocabulary shards combined over ``axes``."""
    if not axes:
        return m, sums
    big = m
    for a in axes:
        big = jax.lax.pmax(big, a)
    safe = jnp.where(jnp.isneginf(big), 0.0, big)
    scale = jnp.where(jnp.isneginf(m), 0.0, jnp.exp(m - safe))
    return big, tuple(psum_over(s * scale, axes) for s in sums)


class _Scalars(NamedTuple):
    """Per-token scalars of the recompute strategy (global over vocabulary shards)."""

    ls: jax.Array  # log-sum-exp of z / T
    lt: jax.Array  # log-sum-exp of u / T
    l1: jax.Array  # log-sum-exp of z (hard labels; ls when T = 1)
    k: jax.Array  # reverse_kl: the divergence; jsd: sum q (log q - log m)


def _recompute_forward(student, teacher, labels, valid, offset, dh, plan, axes):
    n, _, v, tn, vc, dt = _sizes(student.x, student.w, plan, dh)
    t = dh.temperature
    ninf = jnp.full((n,), -jnp.inf, dt)
    zero = jnp.zeros((n,), dt)
    hard1 = dh.hard and t != 1.0  # a separate log-sum-exp at temperature 1

    def pass1(sl, fresh, carry):
        rows = sl(valid)
        x_blk, xt_blk = _rows(sl(student.x), rows), _rows(sl(teacher.x), rows)
        lab_ids = sl(labels) - offset

        def v_body(j, c):
            ms, ss, a_s, mt, st, a_t, m1, s1, lab = c
            vstart, vnom = _chunk_start(j, vc, v)
            z, u = _blocks(student, teacher, x_blk, xt_blk, vstart, vc, dh, dt)
            new = _columns(vstart, vnom, vc, offset, dh)[None, :]
            s, tt = jnp.where(new, z / t, -jnp.inf), jnp.where(new, u / t, -jnp.inf)
            # A summand is 0 where its weight is 0: columns not counted, and those of
            # probability 0 (-inf - -inf is NaN where both heads mask a column).
            diff = s - tt
            ms, (ss, a_s) = _online(ms, (ss, a_s), s, lambda e: (e, _weighted(e, diff)))
            mt, (st, a_t) = _online(mt, (st, a_t), tt, lambda e: (e, _weighted(e, -diff)))
            if hard1:
                m1, (s1,) = _online(m1, (s1,), jnp.where(new, z, -jnp.inf), lambda e: (e,))
            if dh.hard:
                lab = lab + _ce_math.picked_in_chunk(z, lab_ids - vstart, new[0])
            return ms, ss, a_s, mt, st, a_t, m1, s1, lab

        return jax.lax.fori_loop(0, cdiv(v, vc), v_body, carry)

    init = (ninf, zero, zero, ninf, zero, zero, ninf, zero, zero)
    ms, ss, a_s, mt, st, a_t, m1, s1, lab = _token_loop(n, tn, init, pass1)
    # Shards -> global: the sums of each softmax are rescaled to the global max.
    ms, (ss, a_s) = _rescale(ms, (ss, a_s), axes)
    mt, (st, a_t) = _rescale(mt, (st, a_t), axes)
    m1, (s1,) = _rescale(m1, (s1,), axes)
    lab = psum_over(lab, axes) if dh.hard else lab
    ls, lt = _ce_math.lse_finalize(ms, ss), _ce_math.lse_finalize(mt, st)
    l1 = _ce_math.lse_finalize(m1, s1) if hard1 else ls
    ce = l1 - lab if dh.hard else zero
    if dh.divergence == "forward_kl":  # E_p[log p - log q] = E_p[u - z]/T - LT + LS
        div = a_t / st - lt + ls
        return div, ce, _Scalars(ls, lt, l1, zero)
    if dh.divergence == "reverse_kl":
        div = a_s / ss - ls + lt
        return div, ce, _Scalars(ls, lt, l1, div)

    # jsd: a second pass, with the global log-sum-exps known.
    lb, lb1 = math.log(dh.beta), math.log1p(-dh.beta)

    def pass2(sl, fresh, carry):
        rows = sl(valid)
        x_blk, xt_blk = _rows(sl(student.x), rows), _rows(sl(teacher.x), rows)
        ls_b, lt_b = sl(ls)[:, None], sl(lt)[:, None]

        def v_body(j, c):
            jsd, k = c
            vstart, vnom = _chunk_start(j, vc, v)
            z, u = _blocks(student, teacher, x_blk, xt_blk, vstart, vc, dh, dt)
            new = _columns(vstart, vnom, vc, offset, dh)[None, :]
            lq, lp = z / t - ls_b, u / t - lt_b
            lm = jnp.logaddexp(lb + lp, lb1 + lq)
            kq = jnp.where(new, _xlogy_diff(jnp.exp(lq), lq, lm), 0.0)
            kp = jnp.where(new, _xlogy_diff(jnp.exp(lp), lp, lm), 0.0)
            return jsd + jnp.sum(dh.beta * kp + (1 - dh.beta) * kq, axis=1), k + jnp.sum(kq, 1)

        return jax.lax.fori_loop(0, cdiv(v, vc), v_body, carry)

    jsd, k = _token_loop(n, tn, (zero, zero), pass2)
    jsd, k = psum_over(jsd, axes), psum_over(k, axes)
    return jsd, ce, _Scalars(ls, lt, l1, k)


def _ds(z, u, sc: _Scalars, dh: Distill):
    """The divergence's gradient w.r.t. ``z / T`` of one block, from the per-token scalars."""
    t = dh.temperature
    lq, lp = z / t - sc.ls[:, None], u / t - sc.lt[:, None]
    q = jnp.exp(lq)
    if dh.divergence == "forward_kl":
        return q - jnp.exp(lp)
    if dh.divergence == "reverse_kl":  # 0 where q is 0 (lq - lp may be -inf - -inf)
        return _weighted(q, lq - lp - sc.k[:, None])
    lm = jnp.logaddexp(math.log(dh.beta) + lp, math.log1p(-dh.beta) + lq)
    return (1 - dh.beta) * _weighted(q, lq - lm - sc.k[:, None])


def _dlogits(z, u, lab_ids, sc: _Scalars, g_div, g_ce, dh: Distill, cols):
    """d(g_div . divergence + g_ce . ce) / d(raw student logits) of one block."""
    return _dz(z, _ds(z, u, sc, dh), None, lab_ids, sc.l1, g_div, g_ce, dh, cols)


def _dz(z, ds, q1, lab_ids, l1, g_div, g_ce, dh: Distill, cols):
    """The raw student logits' gradient from ``ds`` (the divergence's gradient w.r.t.
    ``z / T``) and, with hard labels, the softmax at temperature 1 (``q1``, formed here
    when None); a term whose per-token weight (``g_div``, ``g_ce``) is None is left out."""
    dz = 0.0 if g_div is None else g_div[:, None] * ds / dh.temperature
    if dh.hard and g_ce is not None:
        q1 = jnp.exp(z - l1[:, None]) if q1 is None else q1
        onehot = jnp.where(lab_ids[:, None] == cols[None, :], 1.0, 0.0)
        dz = dz + g_ce[:, None] * (q1 - onehot)
    return dz * _ce_math.softcap_grad(z, dh.softcap)


def _sizes(x, w, plan, dh: Distill):
    """(tokens, ``w``'s vocabulary axis, vocabulary, token block, vocabulary chunk,
    accumulation dtype) of a recompute pass."""
    n, va = x.shape[0], 0 if dh.vd else 1
    v = w.shape[va]
    return n, va, v, min(plan.tn, n), min(plan.vc, v), _ce_math.acc_dtype(x.dtype)


def _recompute_backward(student, teacher, labels, valid, offset, sc, g_div, g_ce, dh, plan):
    x, w, bias = student
    n, va, v, tn, vc, dt = _sizes(x, w, plan, dh)
    keep = lambda a: jnp.where(valid, a, 0.0)
    g_div, g_ce = keep(g_div), keep(g_ce)
    sc = _Scalars(*(keep(a) for a in sc))  # excluded rows: finite, and no gradient

    def v_body(j, carry):
        dx, dw, db = carry
        vstart, vnom = _chunk_start(j, vc, v)
        cols = vstart + jnp.arange(vc, dtype=jnp.int32)
        new = _columns(vstart, vnom, vc, offset, dh)

        def t_body(i, inner):
            dx, dw_acc, db_acc = inner
            start, nom = _chunk_start(i, tn, n)
            sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=tn)
            rows = ((start + jnp.arange(tn)) >= nom) & sl(valid)
            x_blk, xt_blk = _rows(sl(x), rows), _rows(sl(teacher.x), rows)
            z, u = _blocks(student, teacher, x_blk, xt_blk, vstart, vc, dh, dt)
            scs = _Scalars(*(sl(a) for a in sc))
            dl = _dlogits(z, u, sl(labels) - offset, scs, sl(g_div), sl(g_ce), dh, cols)
            dl = jnp.where(rows[:, None] & new[None, :], dl, 0.0)
            dl_c = dl.astype(x.dtype)
            w_blk = _w_slice(w, vstart, vc, va)
            dx = jax.lax.dynamic_update_slice_in_dim(
                dx, sl(dx) + _dx_product(dl_c, w_blk, va, dt), start, 0
            )
            dw_acc = dw_acc + _dw_product(x_blk, dl_c, va, dt)
            if db_acc is not None:
                db_acc = db_acc + jnp.sum(dl, axis=0)
            return dx, dw_acc, db_acc

        w_blk = _w_slice(w, vstart, vc, va)
        acc0 = (jnp.zeros_like(w_blk, dtype=dt), None if bias is None else jnp.zeros((vc,), dt))
        dx, dw_acc, db_acc = jax.lax.fori_loop(0, cdiv(n, tn), t_body, (dx, *acc0))
        dw, db = _put_columns(dw, db, dw_acc, db_acc, vstart, new, va)
        return dx, dw, db

    init = (
        jnp.zeros_like(x, dtype=dt),
        jnp.zeros_like(w),
        None if bias is None else jnp.zeros_like(bias),
    )
    dx, dw, db = jax.lax.fori_loop(0, cdiv(v, vc), v_body, init)
    return Head(dx.astype(x.dtype), dw, db)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7))
def recompute_losses(student: Head, teacher: Head, labels, valid, offset, dh, plan, axes):
    """Per-token (divergence, cross-entropy); ``student.w``'s column ``j`` is vocabulary
    id ``offset + j``, the rest of the vocabulary lives on the shards of ``axes``."""
    return _recompute_forward(student, teacher, labels, valid, offset, dh, plan, axes)[:2]


def _recompute_jvp(dh, plan, axes, primals, tangents):
    """Tangents from the closed-form dlogits against the logits' tangents, chunk by
    chunk; transposed (reverse mode), the recompute backward."""
    student, teacher, labels, valid, offset = primals
    fwd = lambda *a: _recompute_forward(*a, dh, plan, axes)
    div, ce, sc = _tangents.known_call(fwd, *primals)
    t = tangents[0]
    lin = (t.x, t.w, t.bias)
    have = tuple(_tangents.present(a) for a in lin)
    if not any(have):
        zero = _tangents.zero_tangent
        return (div, ce), (zero(div), zero(ce))
    res = (student, teacher, labels, valid, offset, sc)
    leaves, tree = jax.tree.flatten(res)
    static = (dh, plan, axes, have, tree)
    lin = [a for a, h in zip(lin, have, strict=True) if h]
    outs = _tangents.linear_map(
        _RECOMPUTE_RULE, static, leaves, lin, [jax.typeof(div), jax.typeof(ce)]
    )
    return (div, ce), tuple(outs)


def _recompute_apply(static, leaves, lin):
    dh, plan, axes, have, tree = static
    student, teacher, labels, valid, offset, sc = jax.tree.unflatten(tree, leaves)
    lin = list(lin)
    tx, tw, tb = (lin.pop(0) if h else None for h in have)
    x, w, _ = student
    n, va, v, tn, vc, dt = _sizes(x, w, plan, dh)
    one = jnp.ones((tn,), dt)
    sc = _Scalars(*(jnp.where(valid, a, 0.0) for a in sc))

    def step(sl, fresh, carry):
        rows = fresh & sl(valid)
        x_blk, xt_blk = _rows(sl(x), rows), _rows(sl(teacher.x), rows)
        scs = _Scalars(*(sl(a) for a in sc))
        lab = sl(labels) - offset

        def v_body(j, c):
            t_div, t_ce = c
            vstart, vnom = _chunk_start(j, vc, v)
            cols = vstart + jnp.arange(vc, dtype=jnp.int32)
            keep = rows[:, None] & _columns(vstart, vnom, vc, offset, dh)[None, :]
            z, u = _blocks(student, teacher, x_blk, xt_blk, vstart, vc, dh, dt)
            dz = jnp.zeros_like(z)  # the tangent of the raw student logits
            if tx is not None:
                w_blk = _w_slice(w, vstart, vc, va)
                dz = dz + _logits(sl(tx), w_blk, None, None, dh.vd, dt)
            if tw is not None:
                dz = dz + _logits(x_blk, _w_slice(tw, vstart, vc, va), None, None, dh.vd, dt)
            if tb is not None:
                dz = dz + _slice_bias(tb, vstart, vc).astype(dt)[None, :]
            dz = jnp.where(keep, dz, 0.0)
            g_div = _dz(z, _ds(z, u, scs, dh), None, lab, scs.l1, one, None, dh, cols)
            t_div = t_div + jnp.sum(jnp.where(keep, g_div * dz, 0.0), axis=1)
            if dh.hard:  # the cross-entropy's term alone: the divergence's is not formed twice
                g_ce = _dz(z, None, None, lab, scs.l1, None, one, dh, cols)
                t_ce = t_ce + jnp.sum(jnp.where(keep, g_ce * dz, 0.0), axis=1)
            return t_div, t_ce

        return jax.lax.fori_loop(0, cdiv(v, vc), v_body, carry)

    init = (jnp.zeros((n,), dt), jnp.zeros((n,), dt))
    t_div, t_ce = _token_loop(n, tn, init, step)
    return psum_over(t_div, axes), psum_over(t_ce, axes)


def _recompute_transpose(static, leaves, cts, undefined):
    dh, plan, axes, have, tree = static
    student, teacher, labels, valid, offset, sc = jax.tree.unflatten(tree, leaves)
    # The forward's psum over the vocabulary shards, transposed: inside a shard_map
    # with check_vma=False the cotangent of an output replicated over ``axes`` arrives
    # split among them (``x``'s partial gradients are summed over them on the way out).
    g_div, g_ce = (psum_over(c, axes) for c in cts)
    d = _recompute_backward(student, teacher, labels, valid, offset, sc, g_div, g_ce, dh, plan)
    return tuple(g for g, h in zip(d, have, strict=True) if h)


_RECOMPUTE_RULE = _tangents.LinearRule(
    "distillation_recompute_tangents", _recompute_apply, _recompute_transpose
)
recompute_losses.defjvp(_recompute_jvp, symbolic_zeros=True)


# --------------------------------------------------------------------------------------
# The choice of strategy
# --------------------------------------------------------------------------------------


def plan_for(implementation, config, student: Head, dh: Distill, *, needs_stats: bool):
    """(implementation name, XlaPlan or None for ``reference``)."""
    names, _ = candidates(implementation)
    usable = tuple(n for n in (names or ("xla",)) if n in _NAMES)
    if not usable:
        raise NotImplementedError(
            f"linear_distillation_loss runs on {_NAMES}; the Pallas kernels compute "
            f"single-head statistics only. Got implementation={implementation!r}."
        )
    check_config(config, usable)
    if usable[0] == "reference":
        return "reference", None
    config = XlaConfig() if config is None else config
    n, d = student.x.shape
    v = student.w.shape[0 if dh.vd else 1]
    problem = Problem(max(n, 1), d, v, student.x.dtype, dh.vd, needs_stats, Hyper())
    plan = xla_plan(config, problem, None)
    if plan.strategy == "grad_in_forward" and config.block_bytes is None:
        plan = xla_plan(dataclasses.replace(config, block_bytes=_GIF_BLOCK_BYTES), problem, None)
    return "xla", plan


_NAMES = ("xla", "reference")
# Two heads' blocks are alive at once, with their softmaxes: half the cross-entropy's
# grad_in_forward block keeps the temporaries at a few hundred MiB at real vocabulary
# sizes (Llama-3-8B with a 70B-sized teacher) while token blocks stay large enough to
# run near the materialized computation's speed (512 tokens at V=32000). recompute
# keeps the cross-entropy's blocks.
_GIF_BLOCK_BYTES = 64 * 2**20


def distillation_losses(
    student: Head, teacher: Head, labels, valid, coefs, dh: Distill, choice, *, offset=0, axes=()
):
    """(per-token divergence, per-token cross-entropy, scalar ``coefs``-weighted sum or
    None); differentiable w.r.t. the student only. With vocabulary shards (``w``'s
    column ``j`` is id ``offset + j``, the rest on the shards of the mesh ``axes``)
    the recompute strategy runs, whatever the plan."""
    name, plan = choice
    teacher = jax.tree.map(jax.lax.stop_gradient, teacher)
    # Excluded tokens' labels (any value) are not looked at. This is also an op on the
    # labels before the custom_jvp rules: under vmap, a caller's NumPy labels would
    # otherwise reach them as a raw, non-canonical constant.
    labels = jnp.where(valid, labels, 0)
    if student.x.shape[0] == 0:
        empty = jnp.zeros((0,), _ce_math.acc_dtype(student.x.dtype))
        return empty, empty, None
    with jax.named_scope(f"fusedloss_distillation_{name}"):
        if axes:
            offset = jnp.asarray(offset, jnp.int32)
            div, ce = recompute_losses(student, teacher, labels, valid, offset, dh, plan, axes)
            return div, ce, None
        if plan is None or plan.strategy == "materialized":
            return (*materialized_losses(student, teacher, labels, valid, dh), None)
        if plan.strategy == "grad_in_forward":
            total, div, ce = gif_losses(student, teacher, labels, valid, coefs, dh, plan)
            return div, ce, total
        div, ce = recompute_losses(student, teacher, labels, valid, jnp.int32(0), dh, plan, ())
        return div, ce, None
