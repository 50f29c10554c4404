"""Pallas kernels for ``linear_cross_entropy`` on GPUs (Triton lowering).

The ``recompute`` strategy of :mod:`.xla`: the forward keeps per-token statistics
only, the backward recomputes logits tile by tile. No kernel writes a float32
``[tokens, vocab]`` array.

``forward``  grid ``(vocab splits, token tiles)``
    Each program owns ``block_tokens`` rows and a contiguous range of vocabulary
    tiles. Per tile it forms ``x[rows] @ w[:, cols]`` in float32 registers
    (``block_d`` columns of ``x`` at a time), softcaps it and folds it into running
    per-row statistics with an online log-sum-exp. The splits' partial statistics
    (``[splits, N]``, a few KiB) are merged by the wrapper with
    :func:`fusedloss._ce_math.lse_combine`. The split index varies fastest, so the
    programs resident at one time share few token tiles: their ``x`` rows, re-read
    for every vocabulary tile, stay in L2, and ``w`` streams from HBM about
    ``token tiles * splits / SMs`` times.

The backward
    One kernel, a 2-D tiled matmul with a fused epilogue (program order grouped as
    in Triton's matmul tutorial so neighbouring programs share ``x`` and ``w`` tiles
    in L2): recompute a logits tile, pull the cotangents of (lse, label logit, logit
    sum) back with :func:`fusedloss._ce_math.stats_grad` and store the logits
    gradient in the input dtype, for one vocabulary chunk ``[N, chunk]`` at a time
    (``chunk_bytes``), with its float32 column sums (``dbias``). XLA's GEMMs then
    add ``dlogits @ w[:, chunk].T`` into a float32 ``dx`` and form
    ``x.T @ dlogits`` as ``dw[:, chunk]``. Both big products run at library speed;
    the chunk is the only logits-sized buffer, in the input dtype and bounded. (An
    all-Pallas backward that read-modify-writes float32 ``dx``/``dw`` slices in
    global memory was removed: nothing selected it, and its predicted traffic,
    hundreds of GB at LM heads, made it memory-bound; ``benchmarks/NOTES.md``.)

FLOPs: the forward is one ``N x D x V`` matmul (2 N D V), the backward three
(recompute, ``dx``, ``dw``): 8 N D V in all, against the materialized version's 6.

Partial tiles (``N``, ``D`` or ``V`` not multiples of the blocks) are handled with
masked loads and stores (``other=0`` for the matmul operands, ``-inf`` for logits
of columns past ``V``); nothing is padded or copied.

Why the Triton lowering and not Mosaic GPU: Triton Pallas kernels run unchanged on
Ampere (A100) and Hopper (H100/H200) and their API (``pallas.triton``: masked
``load``/``store``, ``CompilerParams(num_warps, num_stages)``) is the same in JAX
0.10 and 0.11, whereas Mosaic GPU targets Hopper+ (wgmma/TMA) only and its Pallas
API still changes between releases. Triton pipelines the ``block_d`` loop with
``num_stages`` and uses tensor cores for bf16/f16 operands with float32
accumulation; float32 operands use full-precision (IEEE) products.

On CPU the kernels run with ``PallasGpuConfig(interpret=True)`` (the tests do);
without it a non-GPU backend raises :class:`NotImplementedError`, so
``implementation=None`` falls back to ``xla``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

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
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
# Resident token tiles' x rows the forward tries to keep in L2 (H100: 50 MiB).
_L2_X_BYTES = 24 * 2**20


_HOPPER = ("h100", "h200", "h800", "h20", "gh200", "b200", "gb200")


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig:
    """Tuning knobs of the ``pallas_gpu`` implementation.

    Every field left at None takes a heuristic default for the device kind
    (``jax.devices()[0].device_kind``) and the problem shape; see :meth:`resolve`.

    Attributes:
      block_tokens: rows per tile (power of 2, >= 16).
      block_vocab: columns per tile (power of 2, >= 16).
      block_d: hidden-size slice per matmul step (power of 2, >= 16).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the ``block_d`` loops.
      vocab_splits: programs per token tile along the vocabulary in the forward;
        default: enough programs to fill the GPU with few enough token tiles
        resident that their ``x`` rows stay in L2.
      chunk_bytes: bytes of the larger per-chunk backward buffer: the ``[N, chunk]``
        logits gradient in the input dtype or the float32 ``[D, chunk]`` product of
        ``dw``. Default 48 MiB (3072 columns at Llama-3-8B's head, N = 8192 in bf16):
        with the float32 ``dx`` it keeps the backward's temporaries under 256 MiB
        there (and per device of a sharded call), while each chunk's GEMMs stay
        large.
      group_tokens: token tiles per program group of the backward kernel
        (L2 reuse, as ``GROUP_M`` in Triton's matmul tutorial).
      interpret: run the kernels in Pallas interpret mode (any backend, slow);
        what the CPU tests use.
    """

    block_tokens: int | None = None
    block_vocab: int | None = None
    block_d: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    vocab_splits: int | None = None
    chunk_bytes: int = 48 * 2**20
    group_tokens: int = 8
    interpret: bool = False

    def __post_init__(self):
        for name in ("block_tokens", "block_vocab", "block_d"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or value < 16 or not _is_pow2(value)
            ):
                raise ValueError(
                    f"PallasGpuConfig.{name} must be a power of 2 >= 16 (a Triton tile size), "
                    f"got {value!r}."
                )
        for name in ("num_warps", "num_stages", "vocab_splits", "chunk_bytes", "group_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"PallasGpuConfig.{name} must be a positive int, got {value!r}.")
        if not isinstance(self.interpret, bool):
            raise TypeError(f"PallasGpuConfig.interpret must be a bool, got {self.interpret!r}.")

    def resolve(
        self, n: int, d: int, v: int, dtype: Any, target: Target, entropy: bool = False
    ) -> _Plan:
        """Concrete tile sizes and launch parameters for an ``[n, d] @ [d, v]`` problem
        compiled for ``target`` (``entropy``: the forward also folds the expected
        logit)."""
        kind, sm_count = _device_info(target, self.interpret)
        itemsize = jnp.dtype(dtype).itemsize
        bt, bv, bd, warps, stages = _default_tiles(kind, itemsize)
        if entropy and kind != "cpu":
            # The expected logit's running sum and its tile of exp(s) * s: 128-column
            # tiles spill on Ampere (255 registers); 64 columns fit every chip.
            bv = min(bv, 64)
        # Tiles larger than the problem only waste masked lanes.
        bt = self.block_tokens or min(bt, max(16, pl.next_power_of_2(n)))
        bv = self.block_vocab or min(bv, max(16, pl.next_power_of_2(v)))
        bd = self.block_d or min(bd, max(16, pl.next_power_of_2(d)))
        nt, nv = cdiv(n, bt), cdiv(v, bv)
        if self.vocab_splits:
            fwd_splits = self.vocab_splits
        else:
            # Two waves of programs, and at most _L2_X_BYTES of x rows resident.
            fwd_splits = min(
                16, max(cdiv(2 * sm_count, nt), cdiv(sm_count * bt * d * itemsize, _L2_X_BYTES))
            )
        chunk = max(bv, (self.chunk_bytes // max(n * itemsize, d * 4)) // bv * bv)
        return _Plan(
            bt=bt,
            bv=bv,
            bd=bd,
            num_warps=self.num_warps or warps,
            num_stages=self.num_stages or stages,
            fwd=_splits(nv, fwd_splits),
            chunk=min(chunk, v),
            group=self.group_tokens,
            interpret=self.interpret,
        )


def _splits(nv: int, splits: int) -> tuple[int, int]:
    """(splits, vocabulary tiles per split), no split left empty."""
    per_split = cdiv(nv, max(1, min(splits, nv)))
    return cdiv(nv, per_split), per_split


class _Plan(NamedTuple):
    bt: int
    bv: int
    bd: int
    num_warps: int
    num_stages: int
    fwd: tuple[int, int]  # forward (splits, tiles per split)
    chunk: int  # vocabulary columns per backward chunk
    group: int
    interpret: bool
    w_vd: bool = False  # w is held as its [V, D] transpose (tied embeddings)


def _device_info(target: Target, interpret: bool) -> tuple[str, int]:
    """(device kind, streaming multiprocessors) of the chip compiled for.

    An unknown chip of the GPU platform gets tiles that compile on every supported
    one (Ampere's); interpret mode off a GPU counts as one small "cpu" device.
    """
    if target.platform != "gpu":
        return ("cpu", 1) if interpret else ("", 108)
    kind = (target.device_kind or "").lower()
    if not kind:
        return "a100", 108
    return kind, 132 if any(k in kind for k in _HOPPER) else 108


def _default_tiles(kind: str, itemsize: int) -> tuple[int, int, int, int, int]:
    """(block_tokens, block_vocab, block_d, num_warps, num_stages) for a device kind.

    A 128x128 float32 logits tile is 64 KiB of registers over 8 warps; with
    ``block_d`` = 64 (bf16) three pipeline stages of both operands take 96 KiB of
    shared memory, which fits Hopper (228 KiB) and Ampere (164 KiB).
    """
    kind = kind.lower()
    bd = 64 if itemsize <= 2 else 32
    if any(k in kind for k in _HOPPER):
        return 128, 128, bd, 8, 3
    if any(k in kind for k in ("a100", "a800", "a30", "a40", "a6000", "l40", "l4")):
        return 128, 128, bd, 8, 2
    if kind == "cpu":  # interpret mode: bigger tiles mean fewer interpreted steps
        return 64, 128, 64, 4, 1
    return 64, 64, 32, 4, 2


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


class _Static(NamedTuple):
    """Compile-time facts shared by the kernels."""

    n: int
    d: int
    v: int
    bt: int
    bv: int
    bd: int
    has_bias: bool
    hp: Hyper
    acc: Any  # accumulation dtype
    in_dtype: Any  # x / w dtype
    interpret: bool
    w_vd: bool  # w tiles are [bv, bd] pieces of the [V, D] embedding, not [bd, bv]

    @property
    def precision(self):
        # float32 operands: IEEE products (Triton's default would be TF32).
        return lax.Precision.HIGHEST if jnp.dtype(self.in_dtype) == jnp.float32 else None


def _iota(size: int) -> jax.Array:
    return lax.iota(jnp.int32, size)


def _fori(upper: int, body, init):
    """``lax.fori_loop(0, upper, ...)`` with an int32 index, also under x64.

    Pallas' interpreter rejects slices mixing int32 program ids with int64 indices.
    """
    return lax.fori_loop(
        0, upper, lambda k, c: body(lax.convert_element_type(k, jnp.int32), c), init
    )


def _load(ref, mask, other):
    if mask is None:
        return ref[...]
    return plgpu.load(ref, mask=mask, other=other)


def _store(ref, value, mask):
    if mask is None:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=mask)


def _d_slice(st: _Static, k):
    """Start and (optional) validity mask of the ``k``-th ``block_d`` slice of D."""
    k0 = k * st.bd
    k_ok = None if st.d % st.bd == 0 else (k0 + _iota(st.bd)) < st.d
    return k0, k_ok


def _vd_tile(st: _Static, ref, k0, k_ok, c0, cols_ok):
    """View and mask of ``[k0:k0+bd, c0:c0+bv]`` of a ``[D, V]`` array (``w`` or a
    ``dw`` chunk) as stored: ``[bd, bv]``, or ``[bv, bd]`` when held as ``[V, D]``."""
    if st.w_vd:
        return ref.at[pl.ds(c0, st.bv), pl.ds(k0, st.bd)], _outer(cols_ok, k_ok, st.bv, st.bd)
    return ref.at[pl.ds(k0, st.bd), pl.ds(c0, st.bv)], _outer(k_ok, cols_ok, st.bd, st.bv)


def _w_tile(st: _Static, w_ref, k0, k_ok, c0, cols_ok):
    return _load(*_vd_tile(st, w_ref, k0, k_ok, c0, cols_ok), 0.0)


def _logits_tile(st: _Static, x_ref, w_ref, b_ref, r0, c0, rows_ok, cols_ok):
    """float32 head logits (softcapped, over the temperature) of rows ``r0 + [0, bt)``
    and columns ``c0 + [0, bv)``."""

    def body(k, acc):
        k0, k_ok = _d_slice(st, k)
        xb = _load(
            x_ref.at[pl.ds(r0, st.bt), pl.ds(k0, st.bd)],
            _outer(rows_ok, k_ok, st.bt, st.bd),
            0.0,
        )
        wb = _w_tile(st, w_ref, k0, k_ok, c0, cols_ok)
        return acc + lax.dot_general(
            xb, wb, _NT if st.w_vd else _NN, precision=st.precision, preferred_element_type=st.acc
        )

    z = _fori(cdiv(st.d, st.bd), body, jnp.zeros((st.bt, st.bv), st.acc))
    if b_ref is not None:
        b = _load(b_ref.at[pl.ds(c0, st.bv)], cols_ok, 0.0)
        z = z + b.astype(st.acc)[None, :]
    return _ce_math.head_logits(z, st.hp.softcap, st.hp.temperature)


def _outer(a_ok, b_ok, na: int, nb: int):
    """``a_ok[:, None] & b_ok[None, :]`` as an ``[na, nb]`` mask, or None if both are."""
    if a_ok is None and b_ok is None:
        return None
    a = jnp.ones((na, 1), jnp.bool_) if a_ok is None else a_ok[:, None]
    b = jnp.ones((1, nb), jnp.bool_) if b_ok is None else b_ok[None, :]
    return a & b


def _rows(st: _Static, i):
    r0 = i * st.bt
    rows_ok = None if st.n % st.bt == 0 else (r0 + _iota(st.bt)) < st.n
    return r0, rows_ok


def _fwd_kernel(x_ref, w_ref, *refs, st: _Static, tiles_per_split: int, nv: int):
    if st.has_bias:
        b_ref, lab_ref, *out_refs = refs
    else:
        b_ref, (lab_ref, *out_refs) = None, refs
    split, i = pl.program_id(0), pl.program_id(1)
    r0, rows_ok = _rows(st, i)
    lab = _load(lab_ref.at[pl.ds(r0, st.bt)], rows_ok, -1)
    acc = st.acc
    # Splits past the last vocabulary tile (when nv % tiles_per_split != 0) see all
    # columns masked; checking `< v` covers them as well as the partial last tile.
    check_cols = st.v % st.bv != 0 or nv % tiles_per_split != 0

    def body(jj, carry):
        m_old, l, lab_logit, ssum, best, arg, ex = carry
        c0 = (split * tiles_per_split + jj) * st.bv
        cols = c0 + _iota(st.bv)
        cols_ok = (cols < st.v) if check_cols else None
        s = _logits_tile(st, x_ref, w_ref, b_ref, r0, c0, rows_ok, cols_ok)
        if cols_ok is not None:
            s = jnp.where(cols_ok[None, :], s, -jnp.inf)
        bm = jnp.max(s, axis=1)
        shift = jnp.where(jnp.isneginf(bm), 0.0, bm)
        e = jnp.exp(s - shift[:, None])
        m, l = _ce_math.lse_combine(m_old, l, bm, jnp.sum(e, axis=1))
        if st.hp.entropy:
            # sum(exp(s - max) * s) over the tile, from the same exponentials (one
            # logits-sized temporary: the A100 tiles would spill with a second).
            finite = s if cols_ok is None else jnp.where(cols_ok[None, :], s, 0.0)
            ex = _ce_math.expected_combine(m_old, ex, m, shift, jnp.sum(e * finite, axis=1))
        is_label = lab[:, None] == cols[None, :]
        if cols_ok is not None:
            is_label = is_label & cols_ok[None, :]
        lab_logit = lab_logit + jnp.sum(jnp.where(is_label, s, 0.0), axis=1)
        if st.hp.need_sum:
            finite = s if cols_ok is None else jnp.where(cols_ok[None, :], s, 0.0)
            ssum = ssum + jnp.sum(finite, axis=1)
        barg = lax.argmax(s, 1, jnp.int32) + c0
        take = bm > best
        return m, l, lab_logit, ssum, jnp.maximum(best, bm), jnp.where(take, barg, arg), ex

    init = (
        jnp.full((st.bt,), -jnp.inf, acc),
        jnp.zeros((st.bt,), acc),
        jnp.zeros((st.bt,), acc),
        jnp.zeros((st.bt,), acc),
        jnp.full((st.bt,), -jnp.inf, acc),
        jnp.zeros((st.bt,), jnp.int32),
        jnp.zeros((st.bt,), acc),
    )
    out = _fori(tiles_per_split, body, init)
    out = out if st.hp.entropy else out[:-1]
    base = split * st.n + r0
    for ref, val in zip(out_refs, out, strict=True):
        _store(ref.at[pl.ds(base, st.bt)], val, rows_ok)


def _row_inputs(st: _Static, row_refs, r0, rows_ok):
    """Loads a tile's (label, include, lse, g_lse, g_label, g_sum) rows and, with the
    entropy, (g_expected, expected)."""
    lab_ref, ok_ref, lse_ref, gl_ref, gy_ref, gs_ref, *ent_refs = row_refs
    sl = pl.ds(r0, st.bt)
    lab = _load(lab_ref.at[sl], rows_ok, -1)
    ok = _load(ok_ref.at[sl], rows_ok, 0) != 0
    lse = _load(lse_ref.at[sl], rows_ok, 0.0)
    g_lse = _load(gl_ref.at[sl], rows_ok, 0.0)
    g_lab = _load(gy_ref.at[sl], rows_ok, 0.0)
    g_sum = _load(gs_ref.at[sl], rows_ok, 0.0) if st.hp.need_sum else None
    ent = tuple(_load(r.at[sl], rows_ok, 0.0) for r in ent_refs)
    return lab, ok, lse, g_lse, g_lab, g_sum, ent


def _dlogits(st: _Static, s, cols, cols_ok, rows):
    """float32 gradient w.r.t. a tile's raw logits; 0 on excluded rows / columns."""
    lab, ok, lse, g_lse, g_lab, g_sum, ent = rows
    g_exp, expected = (e[:, None] for e in ent) if ent else (None, None)
    dl = _ce_math.stats_grad(
        s,
        lse[:, None],
        lab[:, None] == cols[None, :],
        g_lse[:, None],
        g_lab[:, None],
        0.0 if g_sum is None else g_sum[:, None],
        cap=st.hp.softcap,
        temperature=st.hp.temperature,
        g_expected=g_exp,
        expected=expected,
    )
    # `where`, not a product: an excluded row may hold NaN/Inf logits.
    keep = ok[:, None] if cols_ok is None else ok[:, None] & cols_ok[None, :]
    return jnp.where(keep, dl, 0.0)


def _swizzle(pid, n_rows: int, n_cols: int, group: int):
    """Tile (row, column) of program ``pid``, programs ordered in groups of ``group``
    row tiles that sweep the columns together (neighbours share tiles in L2)."""
    # Python ints stay weakly typed: int32 arithmetic also under x64.
    per_group = group * n_cols
    first = (pid // per_group) * group
    size = jnp.minimum(n_rows - first, group)
    within = pid % per_group
    return first + within % size, within // size


def _dlogits_kernel(x_ref, w_ref, *refs, st: _Static, chunk: int, group: int):
    if st.has_bias:
        b_ref, *refs = refs
    else:
        b_ref = None
    cols_ref, *row_refs, dl_ref, db_ref = refs
    nt = cdiv(st.n, st.bt)
    i, j = _swizzle(pl.program_id(0), nt, cdiv(chunk, st.bv), group)
    r0, rows_ok = _rows(st, i)
    rows = _row_inputs(st, row_refs, r0, rows_ok)
    # Chunk c covers columns [start, start + chunk); when the last chunk is shifted
    # back to end at V, the columns before `fresh` belong to its predecessor.
    start, fresh = cols_ref[0], cols_ref[1]
    lc0 = j * st.bv
    lcols = lc0 + _iota(st.bv)
    in_chunk = (lcols < chunk) if chunk % st.bv != 0 else None
    cols = start + lcols
    s = _logits_tile(st, x_ref, w_ref, b_ref, r0, start + lc0, rows_ok, in_chunk)
    dl = _dlogits(
        st, s, cols, cols >= fresh if in_chunk is None else in_chunk & (cols >= fresh), rows
    )
    _store(
        dl_ref.at[pl.ds(r0, st.bt), pl.ds(lc0, st.bv)],
        dl.astype(dl_ref.dtype),
        _outer(rows_ok, in_chunk, st.bt, st.bv),
    )
    _store(db_ref.at[pl.ds(i * chunk + lc0, st.bv)], jnp.sum(dl, axis=0), in_chunk)


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
        bd=plan.bd,
        has_bias=bias is not None,
        hp=hp,
        acc=_ce_math.acc_dtype(x.dtype),
        in_dtype=x.dtype,
        interpret=plan.interpret,
        w_vd=plan.w_vd,
    )


def _call(kernel, plan: _Plan, grid, out_shape, name: str):
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        interpret=plan.interpret,
        name=name,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
    )


def _forward(x, w, bias, labels, hp: Hyper, plan: _Plan) -> TokenStats:
    st = _static(x, w, bias, hp, plan)
    n, v = st.n, st.v
    nt, nv = cdiv(n, st.bt), cdiv(v, st.bv)
    splits, per_split = plan.fwd
    rows = (splits * n,)
    f32, i32 = jax.ShapeDtypeStruct(rows, st.acc), jax.ShapeDtypeStruct(rows, jnp.int32)
    out_shape = [f32] * 5 + [i32] + ([f32] if hp.entropy else [])
    kernel = functools.partial(_fwd_kernel, st=st, tiles_per_split=per_split, nv=nv)
    args = (x, w) + (() if bias is None else (bias,)) + (labels,)
    parts = _call(kernel, plan, (splits, nt), out_shape, "fusedloss_lce_fwd")(*args)
    return _combine_splits(*(p.reshape(splits, n) for p in parts))


def _combine_splits(m, l, lab_logit, ssum, best, arg, ex=None) -> TokenStats:
    """Merges the per-split statistics ``[splits, N]`` into per-token ones."""
    mt, lt = m[0], l[0]
    for k in range(1, m.shape[0]):
        mt, lt = _ce_math.lse_combine(mt, lt, m[k], l[k])
    expected = None
    if ex is not None:  # each split's sum of exp(s - m_k) * s, rescaled to the total max
        mt_safe = jnp.where(jnp.isneginf(mt), 0.0, mt)
        scale = jnp.where(jnp.isneginf(m), 0.0, jnp.exp(m - mt_safe[None, :]))
        expected = jnp.sum(ex * scale, axis=0) / lt
    # The first split holding the maximum wins, as jnp.argmax picks the first column.
    which = jnp.argmax(best, axis=0)
    return TokenStats(
        lse=_ce_math.lse_finalize(mt, lt),
        label_logit=jnp.sum(lab_logit, axis=0),
        sum_logits=jnp.sum(ssum, axis=0),
        max_logit=jnp.max(best, axis=0),
        argmax=jnp.take_along_axis(arg, which[None, :], axis=0)[0],
        expected_logit=expected,
    )


def _backward(x, w, bias, labels, valid, lse, cts, hp: Hyper, plan: _Plan):
    st = _static(x, w, bias, hp, plan)
    # (g_lse, g_label, g_sum) and, with the entropy, (g_expected, expected).
    rows = [jnp.where(valid, c.astype(st.acc), 0.0) for c in cts]
    # Excluded rows: lse may be NaN/Inf there; their gradient is zeroed in-kernel.
    lse = jnp.where(valid, lse, 0.0)
    row_args = (labels, valid.astype(jnp.int32), lse, *rows)
    head = (x, w) + (() if bias is None else (bias,))
    return _backward_dlogits(st, plan, x, w, bias, valid, head, row_args)


def _over_chunks(v: int, chunk: int, chunk_grads, init):
    """Folds ``chunk_grads(start, fresh, carry)`` over the vocabulary in chunks.

    The last chunk is shifted back to end at ``v`` (nothing is padded); its columns
    before ``fresh`` were already done by its predecessor.
    """
    num = cdiv(v, chunk)
    if num == 1:
        return chunk_grads(jnp.int32(0), jnp.int32(0), init)

    def body(c, carry):
        nominal = c * chunk
        return chunk_grads(jnp.minimum(nominal, v - chunk), nominal, carry)

    return _fori(num, body, init)


def _put_columns(buf, new, start, fresh, axis: int = -1):
    """``buf[..., start:start + k, ...] = new`` along the vocabulary ``axis`` (the
    last by default), for vocabulary ids >= fresh."""
    axis = axis % buf.ndim
    k = new.shape[axis]
    keep = (start + lax.iota(jnp.int32, k)) >= fresh
    if axis == 0 and buf.ndim == 2:
        keep = keep[:, None]
    old = lax.dynamic_slice_in_dim(buf, start, k, axis=axis)
    return lax.dynamic_update_slice_in_dim(
        buf, jnp.where(keep, new.astype(buf.dtype), old), start, axis
    )


def _backward_dlogits(st: _Static, plan: _Plan, x, w, bias, valid, head, row_args):
    n, d, v, chunk = st.n, st.d, st.v, plan.chunk
    nt = cdiv(n, st.bt)
    dl_call = _call(
        functools.partial(_dlogits_kernel, st=st, chunk=chunk, group=plan.group),
        plan,
        (nt * cdiv(chunk, st.bv),),
        [jax.ShapeDtypeStruct((n, chunk), x.dtype), jax.ShapeDtypeStruct((nt * chunk,), st.acc)],
        "fusedloss_lce_bwd_dlogits",
    )
    # Excluded rows may hold NaN; a zero logits gradient does not cancel NaN * 0.
    xz = jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))
    dims = dict(precision=st.precision, preferred_element_type=st.acc)

    va = 0 if st.w_vd else 1  # w's vocabulary axis

    def chunk_grads(start, fresh, carry):
        dx, dw, db = carry
        dl, db_parts = dl_call(*head, jnp.stack([start, fresh]).astype(jnp.int32), *row_args)
        w_c = lax.dynamic_slice_in_dim(w, start, chunk, axis=va)
        dx = dx + lax.dot_general(dl, w_c, _NN if st.w_vd else _NT, **dims)
        dw_c = lax.dot_general(*((dl, xz) if st.w_vd else (xz, dl)), _TN, **dims)
        dw = _put_columns(dw, dw_c, start, fresh, axis=va)
        if db is not None:
            db = _put_columns(db, jnp.sum(db_parts.reshape(nt, chunk), axis=0), start, fresh)
        return dx, dw, db

    init = (
        jnp.zeros((n, d), st.acc),
        jnp.zeros_like(w),
        None if bias is None else jnp.zeros_like(bias),
    )
    dx, dw, db = _over_chunks(v, chunk, chunk_grads, init)
    return dx.astype(x.dtype), dw, db


# --------------------------------------------------------------------------------------
# differentiable statistics core (same contract as xla.chunked_stats)
# --------------------------------------------------------------------------------------


pallas_gpu_stats = make_stats_core(
    _forward, _backward, "pallas_gpu_stats", second_order=xla.plain_backward
)


def plan(config: PallasGpuConfig | None, problem: Problem, target: Target) -> _Plan:
    """The kernels' plan, or ``NotImplementedError`` where they cannot run."""
    config = PallasGpuConfig() if config is None else config
    require_kernel_support("pallas_gpu", "gpu", config.interpret, problem, target)
    p = config.resolve(
        problem.n, problem.d, problem.v, problem.dtype, target, entropy=problem.hp.entropy
    )
    return p._replace(w_vd=problem.w_vd)
