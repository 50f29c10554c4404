"""Pallas (Mosaic TPU) kernels for ``linear_cross_entropy``.

The ``recompute`` strategy of :mod:`.xla` as three kernels. VMEM (16-128 MiB) holds
a whole ``[block, D]`` accumulator, so unlike on GPUs every accumulation stays on
chip and each kernel is a plain two-dimensional grid whose inner ("arbitrary") axis
is the reduction:

``forward``  grid ``(token tiles, vocab tiles)``
    ``x[rows] @ w[:, cols]`` on the MXU (all of ``D`` at once, float32
    accumulation), softcapped, folded into per-row running statistics (online
    log-sum-exp, label logit, logit sum, max and argmax) kept in VMEM scratch; the
    last vocabulary tile writes them out.
``dx``  grid ``(token tiles, vocab tiles)``
    Recomputes the logits tile, pulls the cotangents of (lse, label logit, logit
    sum) back with :func:`fusedloss._ce_math.stats_grad` and accumulates
    ``dlogits @ w[:, cols].T`` into a float32 ``[block_tokens, D]`` scratch.
``dw``  grid ``(vocab tiles, token tiles)``
    The transpose: accumulates ``dlogits.T @ x[rows]`` into a float32
    ``[block_vocab, D]`` scratch (``dw`` transposed, so the per-step transpose is of
    the small logits tile, not of ``x``) and ``dlogits.sum(0)`` into ``dbias``.

The token axis of the first two and the vocabulary axis of ``dw`` are "parallel"
(split across the TensorCores of a megacore chip). Partial edge blocks are read
with unspecified contents past the array end, so every such row/column is masked
with ``where`` (never a product: the padding may be NaN) before it can reach a
reduction; writes past the end are dropped by Pallas.

On CPU the kernels run with ``PallasTpuConfig(interpret=True)`` (Pallas' generic
interpreter) or ``interpret=pltpu.InterpretParams(...)`` (the TPU-faithful
interpreter); without either, a non-TPU backend raises :class:`NotImplementedError`
so that ``implementation=None`` falls back to ``xla``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fusedloss import _ce_math
from fusedloss.heads import xla
from fusedloss.heads._engine import (
    Hyper,
    Problem,
    TokenStats,
    cdiv,
    make_stats_core,
    require_kernel_support,
)
from fusedloss.heads._targets import Target

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
# VMEM per TensorCore by chip (``device_kind``, lower case; the more specific name
# first). A chip not named here, or a program whose chip tracing cannot see, gets the
# smallest (v4's), so that its tiles compile on every supported chip.
_VMEM_BYTES = (
    ("v6 lite", 128 * 2**20),  # v6e
    ("v6e", 128 * 2**20),
    ("v5 lite", 128 * 2**20),  # v5e
    ("v5e", 128 * 2**20),
    ("v5", 64 * 2**20),  # v5p
    ("v4", 16 * 2**20),
)
_MIN_VMEM = 16 * 2**20
# The tiles' estimate may use this share of VMEM (the rest: Mosaic's own scratch and
# the estimate's slack), and never more than 48 MiB, beyond which tiles gain nothing.
_VMEM_BUDGET = 48 * 2**20


def _vmem_bytes(target: Target | None) -> int:
    kind = ((target and target.device_kind) or "").lower()
    if target is None or target.platform != "tpu" or not kind:
        return _MIN_VMEM
    return next((size for name, size in _VMEM_BYTES if name in kind), _MIN_VMEM)


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig:
    """Tuning knobs of the ``pallas_tpu`` implementation.

    Attributes:
      block_tokens: rows per tile; on a TPU a multiple of 8 (16 for 16-bit inputs)
        or all tokens. Default: 256, or all tokens if fewer.
      block_vocab: columns per tile; on a TPU a multiple of 128 or the whole
        vocabulary. Default: 512 (256 for ``D`` > 4096), shrunk (then
        ``block_tokens``) until the kernels' VMEM estimate fits three quarters of
        the chip's VMEM (at most 48 MiB): 16 MiB on v4 and on a chip tracing cannot
        see, 64 MiB on v5p, 128 MiB on v5e and v6e.
      vmem_limit_bytes: Mosaic's scoped-VMEM limit (default: from the estimate,
        at most the chip's VMEM).
      interpret: False, True (Pallas' generic interpreter, any backend) or a
        ``jax.experimental.pallas.tpu.InterpretParams`` (the TPU interpreter).
    """

    block_tokens: int | None = None
    block_vocab: int | None = None
    vmem_limit_bytes: int | None = None
    interpret: Any = False

    def __post_init__(self):
        for name in ("block_tokens", "block_vocab", "vmem_limit_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"PallasTpuConfig.{name} must be a positive int, got {value!r}.")
        if not isinstance(self.interpret, bool | pltpu.InterpretParams):
            raise TypeError(
                "PallasTpuConfig.interpret must be a bool or a pltpu.InterpretParams, "
                f"got {self.interpret!r}."
            )

    def resolve(self, n: int, d: int, v: int, dtype: Any, target: Target | None = None) -> _Plan:
        """Concrete tile sizes for an ``[n, d] @ [d, v]`` problem compiled for
        ``target`` (None or an unknown chip: tiles that fit every supported chip)."""
        itemsize = jnp.dtype(dtype).itemsize
        vmem = _vmem_bytes(target)
        budget = min(_VMEM_BUDGET, vmem * 3 // 4)
        bt = self.block_tokens or 256
        bv = self.block_vocab or (512 if d <= 4096 else 256)
        if self.block_vocab is None:
            while bv > 128 and _vmem_estimate(bt, bv, d, itemsize) > budget:
                bv //= 2
        if self.block_tokens is None:
            while bt > 16 and _vmem_estimate(bt, bv, d, itemsize) > budget:
                bt //= 2
        # A block covering the whole axis is always a legal block shape.
        bt, bv = min(bt, n), min(bv, v)
        if not self.interpret:
            sub = 8 * max(1, 4 // itemsize)
            if bt != n and bt % sub:
                raise ValueError(
                    f"PallasTpuConfig.block_tokens must be a multiple of {sub} for "
                    f"{jnp.dtype(dtype).name} inputs (or >= the token count), got {bt}."
                )
            if bv != v and bv % 128:
                raise ValueError(
                    "PallasTpuConfig.block_vocab must be a multiple of 128 (or >= the "
                    f"vocabulary size), got {bv}."
                )
        est = _vmem_estimate(bt, bv, d, itemsize)
        limit = self.vmem_limit_bytes or min(max(32 * 2**20, est + est // 2), 100 * 2**20, vmem)
        return _Plan(bt=bt, bv=bv, vmem_limit_bytes=limit, interpret=self.interpret)


class _Plan(NamedTuple):
    bt: int
    bv: int
    vmem_limit_bytes: int
    interpret: Any
    w_vd: bool = False  # w is held as its [V, D] transpose (tied embeddings)
    # A [D, V] w read through its transpose: XLA:TPU stores a [D, V] array whose V is
    # no multiple of 128 (a vocabulary shard of 32064 columns) column-major, i.e. as
    # its row-major [V, D] transpose, which the kernels then read without a copy.
    flip: bool = False


def _vmem_estimate(bt: int, bv: int, d: int, itemsize: int) -> int:
    """VMEM bytes of the larger backward kernel (the forward needs less).

    Both hold double-buffered ``x`` and ``w`` blocks, up to eight double-buffered
    ``[bt, 1]`` per-row blocks (six, and two more with the entropy; each padded to 128
    lanes of 4 bytes) and a few float32
    logits-sized temporaries; ``dx`` adds its double-buffered output block and a
    float32 ``[bt, D]`` accumulator, ``dw`` its output block and a float32
    ``[bv, D]`` accumulator.
    """
    common = 2 * itemsize * (bt * d + d * bv) + 2 * 8 * bt * 128 * 4 + 4 * 4 * bt * bv
    dx = 2 * itemsize * bt * d + 4 * bt * d
    dw = 2 * itemsize * d * bv + 4 * bv * d
    return common + max(dx, dw)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


class _Static(NamedTuple):
    n: int
    d: int
    v: int
    bt: int
    bv: int
    has_bias: bool
    hp: Hyper
    acc: Any
    in_dtype: Any
    w_vd: bool  # w blocks are [bv, D] rows of the [V, D] embedding, not [D, bv]

    @property
    def precision(self):
        return lax.Precision.HIGHEST if jnp.dtype(self.in_dtype) == jnp.float32 else None


def _row_ok(st: _Static, i):
    """[bt, 1] rows inside the array, or None when every tile is full."""
    if st.n % st.bt == 0:
        return None
    return (i * st.bt + lax.broadcasted_iota(jnp.int32, (st.bt, 1), 0)) < st.n


def _cols(st: _Static, j):
    """([1, bv] column ids, [1, bv] columns inside the array or None)."""
    cols = j * st.bv + lax.broadcasted_iota(jnp.int32, (1, st.bv), 1)
    return cols, (None if st.v % st.bv == 0 else cols < st.v)


def _logits(st: _Static, x, w, b_ref):
    dims = _NT if st.w_vd else _NN
    z = lax.dot_general(x, w, dims, precision=st.precision, preferred_element_type=st.acc)
    if b_ref is not None:
        z = z + b_ref[...].astype(st.acc)
    return _ce_math.head_logits(z, st.hp.softcap, st.hp.temperature)


def _fwd_kernel(x_ref, w_ref, *refs, st: _Static):
    if st.has_bias:
        b_ref, lab_ref, *refs = refs
    else:
        b_ref, (lab_ref, *refs) = None, refs
    n_out = 6 if st.hp.entropy else 5
    outs, scratch = refs[:n_out], refs[n_out:]
    m_sc, l_sc, y_sc, s_sc, best_sc, arg_sc, *e_sc = scratch
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, st.acc)
        l_sc[...] = jnp.zeros(l_sc.shape, st.acc)
        y_sc[...] = jnp.zeros(y_sc.shape, st.acc)
        s_sc[...] = jnp.zeros(s_sc.shape, st.acc)
        best_sc[...] = jnp.full(best_sc.shape, -jnp.inf, st.acc)
        arg_sc[...] = jnp.zeros(arg_sc.shape, jnp.int32)
        for e in e_sc:
            e[...] = jnp.zeros(e.shape, st.acc)

    cols, cols_ok = _cols(st, j)
    s = _logits(st, x_ref[...], w_ref[...], b_ref)
    if cols_ok is not None:
        s = jnp.where(cols_ok, s, -jnp.inf)
    bm = jnp.max(s, axis=1, keepdims=True)
    shift = jnp.where(jnp.isneginf(bm), 0.0, bm)
    m_old = m_sc[...]
    p = jnp.exp(s - shift)
    m, l = _ce_math.lse_combine(m_old, l_sc[...], bm, jnp.sum(p, axis=1, keepdims=True))
    m_sc[...], l_sc[...] = m, l
    for e in e_sc:  # sum(exp(s - max) * s), from the same exponentials
        finite = s if cols_ok is None else jnp.where(cols_ok, s, 0.0)
        tile = jnp.sum(p * finite, axis=1, keepdims=True)
        e[...] = _ce_math.expected_combine(m_old, e[...], m, shift, tile)
    is_label = lab_ref[...] == cols
    if cols_ok is not None:
        is_label = is_label & cols_ok
    y_sc[...] += jnp.sum(jnp.where(is_label, s, 0.0), axis=1, keepdims=True)
    if st.hp.need_sum:
        finite = s if cols_ok is None else jnp.where(cols_ok, s, 0.0)
        s_sc[...] += jnp.sum(finite, axis=1, keepdims=True)
    # First column holding the maximum (as jnp.argmax), found with a float min
    # (exact below 2**24 columns) because integer lane reductions are not universal.
    colf = cols.astype(jnp.float32)
    first = jnp.min(jnp.where(s == bm, colf, jnp.inf), axis=1, keepdims=True)
    first = jnp.where(first < jnp.inf, first, colf[:, :1]).astype(jnp.int32)
    take = bm > best_sc[...]
    best_sc[...] = jnp.maximum(best_sc[...], bm)
    arg_sc[...] = jnp.where(take, first, arg_sc[...])

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse_ref, lab_out, sum_out, max_out, arg_out = outs[:5]
        lse_ref[...] = _ce_math.lse_finalize(m_sc[...], l_sc[...])
        lab_out[...] = y_sc[...]
        sum_out[...] = s_sc[...]
        max_out[...] = best_sc[...]
        arg_out[...] = arg_sc[...]
        for e, e_out in zip(e_sc, outs[5:], strict=True):
            e_out[...] = e[...] / l_sc[...]


def _dlogits(st: _Static, s, cols, cols_ok, row_refs, rows_ok):
    """float32 gradient w.r.t. a tile's raw logits; 0 on excluded rows / columns."""
    lab_ref, ok_ref, lse_ref, gl_ref, gy_ref, gs_ref, *ent_refs = row_refs
    g_exp, expected = (r[...] for r in ent_refs) if ent_refs else (None, None)
    dl = _ce_math.stats_grad(
        s,
        lse_ref[...],
        lab_ref[...] == cols,
        gl_ref[...],
        gy_ref[...],
        gs_ref[...] if st.hp.need_sum else 0.0,
        cap=st.hp.softcap,
        temperature=st.hp.temperature,
        g_expected=g_exp,
        expected=expected,
    )
    keep = ok_ref[...] != 0
    if rows_ok is not None:
        keep = keep & rows_ok
    if cols_ok is not None:
        keep = keep & cols_ok
    return jnp.where(keep, dl, 0.0)


def _dx_kernel(x_ref, w_ref, *refs, st: _Static):
    if st.has_bias:
        b_ref, *refs = refs
    else:
        b_ref = None
    *row_refs, dx_ref, acc_sc = refs
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, st.acc)

    cols, cols_ok = _cols(st, j)
    w = w_ref[...]
    s = _logits(st, x_ref[...], w, b_ref)
    dl = _dlogits(st, s, cols, cols_ok, row_refs, _row_ok(st, i))
    if cols_ok is not None:  # the edge block's padding
        w = jnp.where(cols_ok.T if st.w_vd else cols_ok, w, jnp.zeros((), w.dtype))
    acc_sc[...] += lax.dot_general(
        dl.astype(st.in_dtype),
        w,
        _NN if st.w_vd else _NT,
        precision=st.precision,
        preferred_element_type=st.acc,
    )

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dx_ref[...] = acc_sc[...].astype(dx_ref.dtype)


def _dw_kernel(x_ref, w_ref, *refs, st: _Static):
    if st.has_bias:
        b_ref, *refs = refs
    else:
        b_ref = None
    *row_refs, dw_ref, db_ref, acc_sc, db_sc = refs
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, st.acc)
        db_sc[...] = jnp.zeros(db_sc.shape, st.acc)

    cols, cols_ok = _cols(st, j)
    x = x_ref[...]
    s = _logits(st, x, w_ref[...], b_ref)
    rows_ok = _row_ok(st, i)
    dl = _dlogits(st, s, cols, cols_ok, row_refs, rows_ok)
    # Excluded and padding rows of x are zeroed: 0 * NaN would poison dw.
    keep_rows = row_refs[1][...] != 0
    if rows_ok is not None:
        keep_rows = keep_rows & rows_ok
    x = jnp.where(keep_rows, x, jnp.zeros((), x.dtype))
    acc_sc[...] += lax.dot_general(
        dl.T.astype(st.in_dtype), x, _NN, precision=st.precision, preferred_element_type=st.acc
    )
    db_sc[...] += jnp.sum(dl, axis=0, keepdims=True)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        acc = acc_sc[...]
        dw_ref[...] = (acc if st.w_vd else acc.T).astype(dw_ref.dtype)
        db_ref[...] = db_sc[...].astype(db_ref.dtype)


# --------------------------------------------------------------------------------------
# pallas_call wrappers
# --------------------------------------------------------------------------------------


def _static(x, w, bias, hp: Hyper, plan: _Plan) -> _Static:
    n, d = x.shape
    return _Static(
        n=n,
        d=d,
        v=w.shape[0] if plan.w_vd else w.shape[1],
        bt=plan.bt,
        bv=plan.bv,
        has_bias=bias is not None,
        hp=hp,
        acc=_ce_math.acc_dtype(x.dtype),
        in_dtype=x.dtype,
        w_vd=plan.w_vd,
    )


def _call(kernel, plan: _Plan, grid, in_specs, out_specs, out_shape, scratch, semantics, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        interpret=plan.interpret,
        name=name,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=semantics, vmem_limit_bytes=plan.vmem_limit_bytes
        ),
    )


def _specs(st: _Static, token_axis: int):
    """Block specs of x, w, bias and a per-row [N, 1] array for a 2-D grid whose
    token index is grid axis ``token_axis`` (the vocabulary index is the other)."""

    def idx(*g):
        return g[token_axis], g[1 - token_axis]

    x_spec = pl.BlockSpec((st.bt, st.d), lambda *g: (idx(*g)[0], 0))
    if st.w_vd:
        w_spec = pl.BlockSpec((st.bv, st.d), lambda *g: (idx(*g)[1], 0))
    else:
        w_spec = pl.BlockSpec((st.d, st.bv), lambda *g: (0, idx(*g)[1]))
    b_spec = pl.BlockSpec((1, st.bv), lambda *g: (0, idx(*g)[1]))
    row_spec = pl.BlockSpec((st.bt, 1), lambda *g: (idx(*g)[0], 0))
    return x_spec, w_spec, b_spec, row_spec


def _head(x, w, bias, st: _Static, token_axis: int):
    x_spec, w_spec, b_spec, row_spec = _specs(st, token_axis)
    args, specs = [x, w], [x_spec, w_spec]
    if bias is not None:
        args.append(bias.reshape(1, st.v))
        specs.append(b_spec)
    return args, specs, row_spec


def _flipped(w, plan: _Plan):
    """(w as the kernels read it, their plan): ``[V, D]`` when ``plan.flip``."""
    return (w.T, plan._replace(w_vd=True, flip=False)) if plan.flip else (w, plan)


def _forward(x, w, bias, labels, hp: Hyper, plan: _Plan) -> TokenStats:
    w, plan = _flipped(w, plan)
    st = _static(x, w, bias, hp, plan)
    nt, nv = cdiv(st.n, st.bt), cdiv(st.v, st.bv)
    args, specs, row_spec = _head(x, w, bias, st, 0)
    col = (st.n, 1)
    f32, i32 = jax.ShapeDtypeStruct(col, st.acc), jax.ShapeDtypeStruct(col, jnp.int32)
    ent = 1 if hp.entropy else 0
    out_shape = [f32] * 4 + [i32] + [f32] * ent
    scratch = [pltpu.VMEM((st.bt, 1), st.acc)] * 5 + [pltpu.VMEM((st.bt, 1), jnp.int32)]
    scratch += [pltpu.VMEM((st.bt, 1), st.acc)] * ent
    lse, lab_logit, ssum, best, arg, *expected = _call(
        functools.partial(_fwd_kernel, st=st),
        plan,
        (nt, nv),
        [*specs, row_spec],
        [row_spec] * len(out_shape),
        out_shape,
        scratch,
        ("parallel", "arbitrary"),
        "fusedloss_lce_fwd",
    )(*args, labels.reshape(col))
    return TokenStats(
        lse=lse[:, 0],
        label_logit=lab_logit[:, 0],
        sum_logits=ssum[:, 0],
        max_logit=best[:, 0],
        argmax=arg[:, 0],
        expected_logit=expected[0][:, 0] if expected else None,
    )


def _backward(x, w, bias, labels, valid, lse, cts, hp: Hyper, plan: _Plan):
    flip = plan.flip
    w, plan = _flipped(w, plan)
    st = _static(x, w, bias, hp, plan)
    n, d, v = st.n, st.d, st.v
    nt, nv = cdiv(n, st.bt), cdiv(v, st.bv)
    acc = st.acc
    # (g_lse, g_label, g_sum) and, with the entropy, (g_expected, expected).
    cts = [jnp.where(valid, c.astype(acc), 0.0) for c in cts]
    # Excluded rows: lse may be NaN/Inf there; their gradient is zeroed in-kernel.
    lse = jnp.where(valid, lse, 0.0)
    rows = [a.reshape(n, 1) for a in (labels, valid.astype(jnp.int32), lse, *cts)]

    args, specs, row_spec = _head(x, w, bias, st, 0)
    dx = _call(
        functools.partial(_dx_kernel, st=st),
        plan,
        (nt, nv),
        [*specs] + [row_spec] * len(rows),
        pl.BlockSpec((st.bt, d), lambda i, j: (i, 0)),
        jax.ShapeDtypeStruct((n, d), x.dtype),
        [pltpu.VMEM((st.bt, d), acc)],
        ("parallel", "arbitrary"),
        "fusedloss_lce_bwd_dx",
    )(*args, *rows)

    args, specs, row_spec = _head(x, w, bias, st, 1)
    b_dtype = acc if bias is None else bias.dtype
    if st.w_vd:
        dw_spec = pl.BlockSpec((st.bv, d), lambda j, i: (j, 0))
    else:
        dw_spec = pl.BlockSpec((d, st.bv), lambda j, i: (0, j))
    dw, db = _call(
        functools.partial(_dw_kernel, st=st),
        plan,
        (nv, nt),
        [*specs] + [row_spec] * len(rows),
        [dw_spec, pl.BlockSpec((1, st.bv), lambda j, i: (0, j))],
        [jax.ShapeDtypeStruct(w.shape, w.dtype), jax.ShapeDtypeStruct((1, v), b_dtype)],
        [pltpu.VMEM((st.bv, d), acc), pltpu.VMEM((1, st.bv), acc)],
        ("parallel", "arbitrary"),
        "fusedloss_lce_bwd_dw",
    )(*args, *rows)
    return dx, dw.T if flip else dw, None if bias is None else db[0]


# --------------------------------------------------------------------------------------
# differentiable statistics core (same contract as xla.chunked_stats)
# --------------------------------------------------------------------------------------


pallas_tpu_stats = make_stats_core(
    _forward, _backward, "pallas_tpu_stats", second_order=xla.plain_backward
)


def plan(config: PallasTpuConfig | None, problem: Problem, target: Target) -> _Plan:
    """The kernels' plan, or ``NotImplementedError`` where they cannot run."""
    config = PallasTpuConfig() if config is None else config
    require_kernel_support("pallas_tpu", "tpu", config.interpret is not False, problem, target)
    p = config.resolve(problem.n, problem.d, problem.v, problem.dtype, target)
    flip = not problem.w_vd and problem.v % 128 != 0 and problem.d % 128 == 0
    return p._replace(w_vd=problem.w_vd, flip=flip)
