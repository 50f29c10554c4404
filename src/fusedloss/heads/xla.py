"""Chunked linear cross-entropy in plain JAX (every backend), with custom JVPs.

Two strategies, both holding at most one ``[token_chunk, vocab_chunk]`` float32
block of logits (and its gradient) at a time:

``recompute``
    Vocabulary chunks with an online log-sum-exp; the forward saves only per-token
    statistics (log-sum-exp, label logit, logit sum), the backward recomputes each
    block of logits from them. Four matmuls instead of three, least memory. The
    backward sweeps vocabulary chunks on the outside, so each ``dw[:, chunk]`` is
    finished (and cast to ``w``'s dtype) before the next: no float32 copy of
    ``w``-sized data is ever held.

``grad_in_forward``
    Token chunks over the whole vocabulary; the forward forms the loss and, in the
    same pass, the gradients w.r.t. ``x``, ``w`` and ``bias`` for a unit cotangent
    (the same three matmuls as the materialized version). The backward only scales
    them. Needs a float32 ``[D, V]`` accumulator for ``dw`` and a scalar loss.

``w`` is read in whichever orientation it is stored in: a ``[D, V]`` kernel in
column chunks, or the ``[V, D]`` array behind a ``w`` passed as ``embedding.T``
(tied embeddings) in row chunks, so that neither is ever copied whole.

Chunks never pad ``x`` or ``w`` (that would copy them): a trailing partial chunk
is handled by clamping its start so it ends at the last row/column and masking the
rows/columns that an earlier chunk already covered.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from fusedloss import _ce_math
from fusedloss.heads import _tangents
from fusedloss.heads._engine import (
    HeadOutput,
    Hyper,
    Problem,
    TokenStats,
    cdiv,
    cross_entropy_from_stats,
    make_stats_core,
    round_down,
    side_outputs,
)
from fusedloss.heads._targets import Target
from fusedloss.heads.reference import materialized_stats

Strategy = Literal["auto", "grad_in_forward", "recompute", "materialized"]
_STRATEGIES = ("auto", "grad_in_forward", "recompute", "materialized")


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """Tuning knobs of the chunked ``xla`` implementation.

    Attributes:
      strategy: ``"auto"`` (``"materialized"`` when the whole ``[N, V]`` float32
        logits fit in ``block_bytes``, where chunking gains nothing; else
        ``grad_in_forward`` for a reduced loss when its float32 ``dw`` accumulator
        fits ``accumulator_bytes``, else ``recompute``), ``"grad_in_forward"``,
        ``"recompute"`` or ``"materialized"`` (the logits at once, gradients by
        autodiff: the plain computation).
      block_bytes: float32 bytes of one ``[token_chunk, vocab_chunk]`` logits block;
        sets the chunk sizes that are not given explicitly. Default: 128 MiB for
        ``grad_in_forward`` (larger token chunks keep it at the materialized
        path's speed) and 32 MiB for ``recompute`` (whose backward holds a few
        blocks at once).
      token_chunk: rows per block (default: from ``block_bytes``).
      vocab_chunk: columns per block for ``recompute``; for ``grad_in_forward``
        (whose logits blocks span the whole vocabulary) the columns of each
        ``[D, vocab_chunk]`` product that ``dw`` is accumulated from. Default: from
        ``block_bytes``.
      accumulator_bytes: largest extra float32 ``dw`` accumulator ``"auto"`` accepts
        for ``grad_in_forward`` (none is needed when ``w`` is float32 already).

    A ``w`` passed as :class:`~fusedloss.Transposed` (tied embeddings) is read in row
    chunks of its ``[V, D]`` array, so that no copy of ``w`` is made.
    """

    strategy: Strategy = "auto"
    block_bytes: int | None = None
    token_chunk: int | None = None
    vocab_chunk: int | None = None
    accumulator_bytes: int = 1 * 2**30

    def __post_init__(self):
        if self.strategy not in _STRATEGIES:
            raise ValueError(
                f"XlaConfig.strategy must be one of {_STRATEGIES}, got {self.strategy!r}."
            )
        if self.block_bytes is not None and self.block_bytes < 4 * 8 * 8:
            raise ValueError(f"XlaConfig.block_bytes must be >= 256, got {self.block_bytes}.")
        for name in ("token_chunk", "vocab_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"XlaConfig.{name} must be a positive int, got {value!r}.")


class XlaPlan(NamedTuple):
    strategy: str  # "grad_in_forward" | "recompute"
    tn: int  # tokens per block
    vc: int  # vocabulary columns per block of the statistics passes
    vc_acc: int  # columns per dw accumulation product (grad_in_forward)
    w_vd: bool  # w is held as its [V, D] transpose


def plan(config: XlaConfig | None, problem: Problem, target: Target) -> XlaPlan:
    """Strategy and chunk sizes for an ``[n, d] @ [d, v]`` problem (any target)."""
    del target  # plain JAX: the same plan compiles everywhere
    config = XlaConfig() if config is None else config
    n, d, v = problem.n, problem.d, problem.v
    strategy = config.strategy
    if strategy == "auto" and 4 * n * v <= (config.block_bytes or 128 * 2**20):
        # The logits fit one block: no regret, the plain computation in memory and time.
        strategy = "materialized"
    if strategy == "auto":
        # A float32 w's gradient is its own accumulator; other dtypes need one more.
        extra = 0 if jnp.dtype(problem.dtype) == jnp.float32 else 4 * d * v
        fits = extra <= config.accumulator_bytes
        strategy = "grad_in_forward" if (not problem.needs_stats and fits) else "recompute"
    if strategy == "grad_in_forward" and problem.needs_stats:
        raise ValueError(
            "strategy='grad_in_forward' fuses a reduced cross-entropy with its gradients; "
            "this call needs per-token statistics (reduction='none', another head, or a "
            "sharded call): use strategy='recompute' or 'auto'."
        )
    block = config.block_bytes
    if block is None:
        block = (128 if strategy == "grad_in_forward" else 32) * 2**20
    elems = max(block // 4, 64)
    n1, v1 = max(n, 1), max(v, 1)
    if strategy == "grad_in_forward":
        # No regret at small N: the blocks held at once (logits, their gradient, a dw
        # product) stay within the materialized path's one [N, V] buffer.
        largest = min(round_down(elems // v1, 8, 8), round_down(n1 // 4, 8, 8))
        tn = min(config.token_chunk or _balanced(n1, largest, 8), n1)
        # dw is accumulated in [D, vc_acc] products no larger than one logits block
        # (a whole [D, V] product would be a second w-sized temporary).
        vc_acc = config.vocab_chunk or round_down((tn * v1) // max(d, 1), 128, 128)
        vc_acc = min(vc_acc, v1)
        # The statistics-only pass (no differentiation) uses recompute's blocks.
        vc = _balanced(v1, round_down(32 * 2**18 // _stats_token_chunk(n1), 128, 128), 32)
        return XlaPlan(strategy, tn, min(vc, v1), vc_acc, problem.w_vd)
    tn = min(config.token_chunk or _stats_token_chunk(n1), n1)
    # The backward's float32 [D, vc] dw accumulator stays within a quarter of the
    # materialized [N, V] logits (no regret at small N).
    largest = min(round_down(elems // tn, 128, 128), round_down(n1 * v1 // (4 * d), 128, 128))
    vc = config.vocab_chunk or _balanced(v1, largest, 32)
    return XlaPlan(strategy, tn, min(vc, v1), min(vc, v1), problem.w_vd)


def _stats_token_chunk(n: int) -> int:
    """Tokens per block of a statistics pass (vocabulary chunks inside)."""
    return min(_balanced(n, 4096, 8), n)


def _balanced(total: int, largest: int, align: int) -> int:
    """A chunk of at most about ``largest`` that splits ``total`` into equal chunks.

    The last chunk is clamped to end at ``total`` and overlaps its predecessor (work
    done twice), so chunks of equal size, rounded up to ``align``, leave the least.
    """
    count = cdiv(total, max(largest, 1))
    return min(total, cdiv(cdiv(total, count), align) * align)


def _chunk_start(i, chunk: int, total: int):
    """Clamped start and nominal start of chunk ``i`` (the last one may overlap)."""
    nominal = i * chunk
    return jnp.minimum(nominal, total - chunk), nominal


# ``w`` as stored: ``va`` is its vocabulary axis (1 for a [D, V] kernel, 0 for the
# [V, D] embedding behind ``embedding.T``). These helpers keep every product in the
# stored orientation, so XLA never needs to relayout a whole ``w``.


def _w_slice(w, start, size: int, va: int):
    return jax.lax.dynamic_slice_in_dim(w, start, size, axis=va)


def _vocab_mask(mask, va: int):
    """A [vc] column mask broadcast against a block of ``w`` (or of ``dw``)."""
    return mask[None, :] if va == 1 else mask[:, None]


def _dx_product(dl, w_blk, va: int, dt):
    """``dl @ w_blk.T``: [tn, vc] x stored block -> [tn, D]."""
    return jax.lax.dot_general(dl, w_blk, (((1,), (va,)), ((), ())), preferred_element_type=dt)


def _dw_product(x_blk, dl, va: int, dt):
    """``x_blk.T @ dl`` in the stored orientation: [D, vc] (va=1) or [vc, D] (va=0)."""
    if va == 1:
        return jax.lax.dot_general(x_blk, dl, (((0,), (0,)), ((), ())), preferred_element_type=dt)
    return jax.lax.dot_general(dl, x_blk, (((0,), (0,)), ((), ())), preferred_element_type=dt)


def _block(x_blk, w_blk, b_blk, hp: Hyper, va: int = 1):
    """float32 head logits (softcapped, over the temperature) of one block."""
    dt = _ce_math.acc_dtype(x_blk.dtype)
    z = jax.lax.dot_general(x_blk, w_blk, (((1,), (1 - va,)), ((), ())), preferred_element_type=dt)
    if b_blk is not None:
        z = z + b_blk.astype(dt)[None, :]
    return _ce_math.head_logits(z, hp.softcap, hp.temperature)


def _slice_bias(bias, start, size):
    return None if bias is None else jax.lax.dynamic_slice_in_dim(bias, start, size)


# --------------------------------------------------------------------------------------
# recompute: a differentiable per-token statistics core
# --------------------------------------------------------------------------------------


def _stats_forward(x, w, bias, labels, valid, vocab_offset, hp: Hyper, tn: int, vc: int, va: int):
    n, _ = x.shape
    v = w.shape[va]
    nt, nv = cdiv(n, tn), cdiv(v, vc)
    f32 = _ce_math.acc_dtype(x.dtype)
    # Carries are built "like" the operands so that they carry the operands' varying
    # mesh axes inside shard_map(check_vma=True) and their sharding under Explicit axes.
    # ``labels`` is [N], or [N, K] ids whose logits are all wanted (``hp.picked``).
    rows = labels if labels.ndim == 1 else labels[:, 0]
    init = (
        jnp.full_like(rows, -jnp.inf, dtype=f32),  # running max
        jnp.zeros_like(rows, dtype=f32),  # running sum of exp(s - max)
        jnp.zeros_like(labels, dtype=f32),  # label logit(s)
        jnp.zeros_like(rows, dtype=f32),  # logit sum
        jnp.full_like(rows, -jnp.inf, dtype=f32),  # best logit
        jnp.zeros_like(rows, dtype=jnp.int32),  # its column
        jnp.zeros_like(rows, dtype=f32),  # sum of exp(s - max) * s (expected logit)
    )

    def v_body(j, carry):
        vstart, vnom = _chunk_start(j, vc, v)
        w_blk = _w_slice(w, vstart, vc, va)
        b_blk = _slice_bias(bias, vstart, vc)
        cols = vstart + jnp.arange(vc, dtype=jnp.int32)
        col_new = cols >= vnom

        def t_body(i, carry):
            tstart, tnom = _chunk_start(i, tn, n)
            rows_new = (tstart + jnp.arange(tn)) >= tnom
            x_blk = jax.lax.dynamic_slice_in_dim(x, tstart, tn)
            lab = jax.lax.dynamic_slice_in_dim(labels, tstart, tn)
            old = [jax.lax.dynamic_slice_in_dim(c, tstart, tn) for c in carry]
            m, l, lab_logit, ssum, best, arg, ex = old
            s = _block(x_blk, w_blk, b_blk, hp, va)
            s = jnp.where(col_new[None, :], s, -jnp.inf)
            bm = jnp.max(s, axis=1)
            m_new, l_new = _ce_math.lse_combine(
                m, l, bm, jnp.sum(jnp.exp(s - jnp.where(jnp.isneginf(bm), 0.0, bm)[:, None]), 1)
            )
            lab_logit = lab_logit + _ce_math.picked_in_chunk(
                s, lab - vocab_offset - vstart, col_new
            )
            if hp.need_sum:
                ssum = ssum + jnp.sum(jnp.where(col_new[None, :], s, 0.0), axis=1)
            barg = jnp.argmax(s, axis=1).astype(jnp.int32) + vstart
            take = bm > best
            best, arg = jnp.maximum(best, bm), jnp.where(take, barg, arg)
            if hp.entropy:  # online, rescaled to the new running max like the sum
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
                old_scale = jnp.where(jnp.isneginf(m), 0.0, jnp.exp(m - m_safe))
                p_s = jnp.where(col_new[None, :], jnp.exp(s - m_safe[:, None]) * s, 0.0)
                ex = ex * old_scale + jnp.sum(p_s, axis=1)
            new = (m_new, l_new, lab_logit, ssum, best, arg, ex)
            return tuple(
                jax.lax.dynamic_update_slice_in_dim(
                    c, jnp.where(rows_new.reshape((tn,) + (1,) * (c.ndim - 1)), nv_, ov), tstart, 0
                )
                for c, nv_, ov in zip(carry, new, old, strict=True)
            )

        return jax.lax.fori_loop(0, nt, t_body, carry)

    m, l, lab_logit, ssum, best, arg, ex = jax.lax.fori_loop(0, nv, v_body, init)
    del valid
    return TokenStats(
        lse=_ce_math.lse_finalize(m, l),
        label_logit=lab_logit,
        sum_logits=ssum,
        max_logit=best,
        argmax=arg + jnp.asarray(vocab_offset, jnp.int32),
        expected_logit=ex / l if hp.entropy else None,
    )


def _stats_backward(x, w, bias, labels, valid, vocab_offset, lse, cts, hp, tn, vc, va):
    mask = lambda c: jnp.where(valid.reshape(valid.shape + (1,) * (c.ndim - 1)), c, 0.0)
    g_lse, g_lab, g_sum, *rest = (mask(c) for c in cts)
    g_exp, expected = rest if hp.entropy else (None, None)
    n = x.shape[0]
    v = w.shape[va]
    nt, nv = cdiv(n, tn), cdiv(v, vc)
    f32 = _ce_math.acc_dtype(x.dtype)
    lse = jnp.where(valid, lse, 0.0)
    zero = jnp.zeros((), x.dtype)
    dx0 = jnp.zeros_like(x, dtype=f32)
    dw0 = jnp.zeros_like(w)
    db0 = None if bias is None else jnp.zeros_like(bias)

    def v_body(j, carry):
        dx, dw, db = carry
        vstart, vnom = _chunk_start(j, vc, v)
        w_blk = _w_slice(w, vstart, vc, va)
        b_blk = _slice_bias(bias, vstart, vc)
        cols = vstart + jnp.arange(vc, dtype=jnp.int32)
        col_new = cols >= vnom

        def t_body(i, inner):
            dx, dw_acc, db_acc = inner
            tstart, tnom = _chunk_start(i, tn, n)
            take_rows = ((tstart + jnp.arange(tn)) >= tnom) & jax.lax.dynamic_slice_in_dim(
                valid, tstart, tn
            )
            x_blk = jax.lax.dynamic_slice_in_dim(x, tstart, tn)
            x_blk = jnp.where(take_rows[:, None], x_blk, zero)
            sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=tstart, slice_size=tn)
            s = _block(x_blk, w_blk, b_blk, hp, va)
            lab = sl(labels) - vocab_offset
            if lab.ndim == 1:
                is_label, g_label = lab[:, None] == cols[None, :], sl(g_lab)[:, None]
            else:  # [tn, K] ids: their cotangents scattered into the block
                local = jnp.where((lab >= vstart) & (lab < vstart + vc), lab - vstart, vc)
                rows = jnp.broadcast_to(jnp.arange(tn, dtype=lab.dtype)[:, None], lab.shape)
                g_label = jnp.zeros((tn, vc), f32).at[rows, local].add(sl(g_lab), mode="drop")
                is_label = True
            dl = _ce_math.stats_grad(
                s,
                sl(lse)[:, None],
                is_label,
                sl(g_lse)[:, None],
                g_label,
                sl(g_sum)[:, None],
                cap=hp.softcap,
                temperature=hp.temperature,
                g_expected=None if g_exp is None else sl(g_exp)[:, None],
                expected=None if expected is None else sl(expected)[:, None],
            )
            dl = jnp.where(take_rows[:, None] & col_new[None, :], dl, 0.0)
            dl_c = dl.astype(x.dtype)
            dx_blk = _dx_product(dl_c, w_blk, va, f32)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, sl(dx) + dx_blk, tstart, 0)
            dw_acc = dw_acc + _dw_product(x_blk, dl_c, va, f32)
            if db_acc is not None:
                db_acc = db_acc + jnp.sum(dl, axis=0)
            return dx, dw_acc, db_acc

        dw_acc0 = jnp.zeros_like(w_blk, dtype=f32)
        db_acc0 = None if b_blk is None else jnp.zeros_like(b_blk, dtype=f32)
        dx, dw_acc, db_acc = jax.lax.fori_loop(0, nt, t_body, (dx, dw_acc0, db_acc0))
        dw, db = _put_columns(dw, db, dw_acc, db_acc, vstart, col_new, va)
        return dx, dw, db

    dx, dw, db = jax.lax.fori_loop(0, nv, v_body, (dx0, dw0, db0))
    return dx.astype(x.dtype), dw, db


def _put_columns(dw, db, dw_acc, db_acc, vstart, new, va: int):
    """``dw``/``db`` with a vocabulary chunk's accumulated gradients written at ``vstart``
    in the columns ``new`` marks (a clamped last chunk leaves the others as they are)."""
    vc = new.shape[0]
    old = _w_slice(dw, vstart, vc, va)
    dw = jax.lax.dynamic_update_slice_in_dim(
        dw, jnp.where(_vocab_mask(new, va), dw_acc.astype(dw.dtype), old), vstart, va
    )
    if db is not None:
        old_b = jax.lax.dynamic_slice_in_dim(db, vstart, vc)
        db = jax.lax.dynamic_update_slice_in_dim(
            db, jnp.where(new, db_acc.astype(db.dtype), old_b), vstart, 0
        )
    return dw, db


def _forward(x, w, bias, local_labels, hp: Hyper, plan: XlaPlan) -> TokenStats:
    va = 0 if plan.w_vd else 1
    valid = jnp.ones_like(local_labels, dtype=bool)
    return _stats_forward(x, w, bias, local_labels, valid, 0, hp, plan.tn, plan.vc, va)


def _backward(x, w, bias, local_labels, valid, lse, cts, hp: Hyper, plan: XlaPlan):
    va = 0 if plan.w_vd else 1
    return _stats_backward(x, w, bias, local_labels, valid, 0, lse, cts, hp, plan.tn, plan.vc, va)


def _tangent_chunks(plan: XlaPlan, n: int, v: int) -> tuple[int, int]:
    """Forward mode walks the statistics pass's blocks."""
    del n, v
    return plan.tn, plan.vc


def plain_backward(x, w, bias, labels, valid, lse, cts, hp: Hyper, plan):
    """``J^T . cts`` of the statistics in plain JAX (recompute's loops) for any backend's
    plan: how a kernel's backward is differentiated for second order."""
    va = 0 if plan.w_vd else 1
    tn, vc = _tangents.tangent_chunks(x.shape[0], w.shape[va])
    return _stats_backward(x, w, bias, labels, valid, 0, lse, cts, hp, tn, vc, va)


_recompute_stats = make_stats_core(
    _forward, _backward, "xla_recompute_stats", chunks=_tangent_chunks
)


def xla_stats(x, w, bias, labels, valid, vocab_offset, hp: Hyper, plan: XlaPlan) -> TokenStats:
    """The statistics core of the plan's strategy (differentiable)."""
    if plan.strategy == "materialized":
        return materialized_stats(x, w, bias, labels, valid, vocab_offset, hp, plan.w_vd)
    return _recompute_stats(x, w, bias, labels, valid, vocab_offset, hp, plan)


# --------------------------------------------------------------------------------------
# grad_in_forward: the scalar loss with its gradients formed in the forward pass
# --------------------------------------------------------------------------------------


def _accumulate_columns(acc, x_blk, dl, vc: int, va: int):
    """``acc += x_blk.T @ dl`` (in ``w``'s stored orientation) one vocab chunk at a time.

    A single ``[D, V]`` product would be a second ``w``-sized temporary (XLA does not
    accumulate a matmul into an existing buffer); per chunk, only ``[D, vc]`` is.
    """
    v = acc.shape[va]
    vc = min(vc, v)

    def body(j, acc):
        start, nom = _chunk_start(j, vc, v)
        fresh = _vocab_mask((start + jnp.arange(vc)) >= nom, va)
        dl_blk = jax.lax.dynamic_slice_in_dim(dl, start, vc, axis=1)
        prod = _dw_product(x_blk, dl_blk, va, acc.dtype)
        old = _w_slice(acc, start, vc, va)
        new = old + prod if vc == v else jnp.where(fresh, old + prod, old)
        return jax.lax.dynamic_update_slice_in_dim(acc, new, start, va)

    return jax.lax.fori_loop(0, cdiv(v, vc), body, acc)


def _gif_pass(x, w, bias, labels, valid, coef, hp: Hyper, tn: int, vc: int, va: int):
    n, d = x.shape
    v = w.shape[va]
    nt = cdiv(n, tn)
    f32 = _ce_math.acc_dtype(x.dtype)
    zero = jnp.zeros((), x.dtype)
    cols = jnp.arange(v, dtype=jnp.int32)
    b = None if bias is None else bias.astype(f32)
    init = (
        jnp.zeros((n,), f32),  # per-token weighted loss
        jnp.zeros((n,), f32),  # lse
        jnp.zeros((n,), f32),  # label logit
        jnp.zeros((n,), jnp.int32),  # argmax
        jnp.zeros((n, d), x.dtype),  # dx
        jnp.zeros(w.shape, f32),  # dw accumulator (stored orientation)
        None if bias is None else jnp.zeros((v,), f32),
    )

    def t_body(i, carry):
        loss_c, lse_c, lab_c, arg_c, dx, dw, db = carry
        tstart, tnom = _chunk_start(i, tn, n)
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=tstart, slice_size=tn)
        rows_new = (tstart + jnp.arange(tn)) >= tnom
        val = sl(valid)
        take = rows_new & val
        x_blk = jnp.where(take[:, None], sl(x), zero)
        lab = sl(labels)
        s = _block(x_blk, w, b, hp, va)
        lse = jax.nn.logsumexp(s, axis=1)
        is_label = lab[:, None] == cols[None, :]
        # A gather (out-of-range labels of included tokens make the loss NaN later).
        lab_logit = jnp.take_along_axis(s, jnp.clip(lab, 0, v - 1)[:, None], axis=1)[:, 0]
        ssum = jnp.sum(s, axis=1) if hp.need_sum else None
        loss = _ce_math.token_loss(
            lse,
            lab_logit,
            ssum,
            num_classes=v,
            label_smoothing=hp.label_smoothing,
            z_loss=hp.z_loss,
        )
        c = jnp.where(take, sl(coef), 0.0)
        dl = _ce_math.logit_grad(
            s,
            lse[:, None],
            is_label,
            c[:, None],
            num_classes=v,
            label_smoothing=hp.label_smoothing,
            z_loss=hp.z_loss,
            cap=hp.softcap,
        )
        dl_c = dl.astype(x.dtype)
        dx_blk = _dx_product(dl_c, w, va, f32)
        upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf,
            jnp.where(rows_new.reshape((tn,) + (1,) * (new.ndim - 1)), new, sl(buf)),
            tstart,
            0,
        )
        loss_c = upd(loss_c, jnp.where(val, loss, 0.0))
        lse_c = upd(lse_c, lse)
        lab_c = upd(lab_c, lab_logit)
        arg_c = upd(arg_c, jnp.argmax(s, axis=1).astype(jnp.int32))
        dx = upd(dx, dx_blk.astype(x.dtype))
        dw = _accumulate_columns(dw, x_blk, dl_c, vc, va)
        if db is not None:
            db = db + jnp.sum(dl, axis=0)
        return loss_c, lse_c, lab_c, arg_c, dx, dw, db

    return jax.lax.fori_loop(0, nt, t_body, init)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7))
def _gif_loss(x, w, bias, labels, valid, coef, hp: Hyper, plan: XlaPlan):
    # Without differentiation only the statistics are needed: one matmul per block.
    stats = _forward(x, w, bias, labels, hp, plan._replace(tn=_stats_token_chunk(x.shape[0])))
    v = w.shape[0] if plan.w_vd else w.shape[1]
    out = cross_entropy_from_stats(stats, labels, valid, coef, hp, v, False)
    return out.loss, stats.lse, stats.label_logit, stats.argmax


def _gif_fwd(x, w, bias, labels, valid, coef, hp, plan):
    va = 0 if plan.w_vd else 1
    loss, lse, lab, arg, dx, dw, db = _gif_pass(
        x, w, bias, labels, valid, coef, hp, plan.tn, plan.vc_acc, va
    )
    loss = _ce_math.nan_if_bad_label(loss, labels, w.shape[va], valid)
    total = jnp.sum(jnp.where(valid, loss * coef, 0.0))
    return (total, lse, lab, arg), (loss, dx, dw, db)


def _gif_jvp(hp, plan, primals, tangents):
    """The loss's tangent is ``<dx, tx> + <dw, tw> + <db, tb> + <loss, tcoef>`` of the
    gradients the forward pass formed; transposed (reverse mode), it scales them."""
    w, bias = primals[1], primals[2]
    gif_fwd = functools.partial(_gif_fwd, hp=hp, plan=plan)
    (total, *side), (loss, dx, dw, db) = _tangents.known_call(gif_fwd, *primals)
    tx, tw, tb, _, _, tcoef = tangents
    have = tuple(_tangents.present(t) for t in (tx, tw, tb, tcoef))
    if any(have):
        lin = [t for t, h in zip((tx, tw, tb, tcoef), have, strict=True) if h]
        res = [loss, dx, dw] + ([] if db is None else [db])
        b_dtype = None if bias is None else jnp.dtype(bias.dtype)
        static = (plan, have, jnp.dtype(w.dtype), b_dtype)
        (t_total,) = _tangents.linear_map(_GIF_RULE, static, res, lin, [jax.typeof(total)])
    else:
        t_total = _tangents.zero_tangent(total)
    zero = _tangents.zero_tangent
    return (total, *side), (t_total, *map(zero, side))


def _gif_apply(static, res, lin):
    have = static[1]
    loss, dx, dw = res[:3]
    db = res[3] if len(res) > 3 else None
    acc = _ce_math.acc_dtype(dx.dtype)
    total = jnp.zeros((), acc)
    lin = list(lin)
    # The gradients of the total w.r.t. x, w, bias and coef, against their tangents.
    for g, h in zip((dx, dw, db, loss), have, strict=True):
        if h:
            total = total + jnp.sum(g.astype(acc) * lin.pop(0).astype(acc))
    return (total,)


def _gif_transpose(static, res, cts, undefined):
    plan, have, w_dtype, b_dtype = static
    loss, dx, dw = res[:3]
    db = res[3] if len(res) > 3 else None
    g = cts[0]
    grads = [
        g.astype(dx.dtype) * dx,
        _scale_in_place(dw, g, w_dtype, plan.vc_acc, 0 if plan.w_vd else 1),
        None if db is None else (g * db).astype(b_dtype),
        g * loss,
    ]
    return tuple(gr for gr, h in zip(grads, have, strict=True) if h)


_GIF_RULE = _tangents.LinearRule("xla_grad_in_forward_tangents", _gif_apply, _gif_transpose)


def _scale_in_place(buf, g, out_dtype, chunk: int, axis: int):
    """``(g * buf).astype(out_dtype)`` along ``axis`` in chunks.

    Written as a loop of slice updates so that XLA can reuse ``buf`` (a dead residual)
    for the result instead of allocating a second ``buf``-sized buffer; with a cast,
    only one chunk is ever held in ``buf``'s dtype besides ``buf``. Without a cast the
    loop runs no iteration for the usual cotangent ``g == 1`` (the loss is what is
    differentiated), sparing a pass over ``buf``.
    """
    total = buf.shape[axis]
    chunk = min(chunk, total)
    steps = cdiv(total, chunk)
    if buf.dtype != out_dtype:
        # A cast too (e.g. to a bf16 w's dtype): one chunk of float32 at a time.
        def cast_body(j, out):
            start, _ = _chunk_start(j, chunk, total)
            new = (g * _w_slice(buf, start, chunk, axis)).astype(out_dtype)
            return jax.lax.dynamic_update_slice_in_dim(out, new, start, axis)

        return jax.lax.fori_loop(0, steps, cast_body, jnp.zeros_like(buf, dtype=out_dtype))

    def body(j, buf):
        start, nom = _chunk_start(j, chunk, total)
        old = _w_slice(buf, start, chunk, axis)
        fresh = _vocab_mask((start + jnp.arange(chunk)) >= nom, axis)
        new = jnp.where(fresh, g.astype(buf.dtype) * old, old)
        return jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis)

    return jax.lax.fori_loop(0, jnp.where(g == 1, 0, steps), body, buf)


_gif_loss.defjvp(_gif_jvp, symbolic_zeros=True)


def gif_cross_entropy(x, w, bias, labels, valid, coef, hp: Hyper, plan: XlaPlan) -> HeadOutput:
    """The reduced cross-entropy with its gradients formed in the forward pass."""
    with jax.named_scope("fusedloss_xla_grad_in_forward"):
        loss, lse, label_logit, arg = _gif_loss(x, w, bias, labels, valid, coef, hp, plan)
    return HeadOutput(loss, *side_outputs(valid, lse, label_logit, arg))
