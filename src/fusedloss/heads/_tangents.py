"""Forward-mode autodiff of the fused heads: linear maps with a backward as transpose.

A fused head's cores are differentiated through ``jax.custom_jvp`` rules whose
tangent outputs come from one linear primitive, ``fusedloss_linear_map``:

- evaluated (``jax.jvp``, ``jax.jacfwd``), it applies a plain-JAX linear map to the
  input tangents, chunk by chunk (never anything ``[N, V]``-sized);
- transposed (``jax.grad``, ``jax.vjp``: JAX linearizes the ``custom_jvp`` rule and
  transposes its linear part), it runs the core's own backward pass (the chunked
  ``xla`` loops or the Pallas kernels), so reverse mode keeps exactly the residuals,
  the memory and the speed of a ``custom_vjp``;
- batched (``jax.vmap``, ``jax.jacfwd``), it stays one linear map: the plain-JAX map
  under ``jax.vmap``, transposed by the backward under ``jax.vmap`` (the gradient of
  a vmapped head runs the same backward as a vmapped ``custom_vjp``);
- differentiated again (forward over forward), it is the plain-JAX map under
  ``jax.jvp``. Forward over reverse (``jax.hessian``) differentiates the backward.

A :class:`LinearRule` names the map (``apply``) and its transpose (``transpose``);
both take a hashable ``static`` (hyperparameters, plan, which tangents are present)
and the residuals, which are not linear inputs. Only public JAX interfaces are used
(``jax.extend.core.Primitive`` and the registries of ``jax.interpreters``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive, unmapped_aval
from jax.interpreters import ad, batching, mlir

from fusedloss import _ce_math


class LinearRule(NamedTuple):
    """``apply(static, res, lin) -> outs`` (linear in ``lin``) and
    ``transpose(static, res, cts, undefined) -> lin cotangents`` (one per ``lin``
    entry; those of entries not in ``undefined`` may be None)."""

    name: str
    apply: Callable[..., tuple]
    transpose: Callable[..., tuple]


linear_map_p = Primitive("fusedloss_linear_map")
linear_map_p.multiple_results = True


def linear_map(rule: LinearRule, static, residuals, linear, out_avals) -> list:
    """``rule.apply(static, residuals, linear)`` as a transposable primitive.

    ``out_avals`` are the outputs' abstract values (``jax.typeof`` of the primal
    values they are tangents of: shape, dtype and the varying mesh axes inside
    ``shard_map``)."""
    return linear_map_p.bind(
        *residuals,
        *linear,
        rule=rule,
        static=static,
        num_res=len(residuals),
        out_avals=tuple(out_avals),
    )


def _apply(*args, rule, static, num_res, out_avals):
    del out_avals
    outs = rule.apply(static, tuple(args[:num_res]), tuple(args[num_res:]))
    return [jnp.asarray(o) for o in outs]


_apply_jit = jax.jit(_apply, static_argnames=("rule", "static", "num_res", "out_avals"))


def _abstract_eval(*args, rule, static, num_res, out_avals):
    del args, rule, static, num_res
    return list(out_avals)


def _transpose(cts, *args, rule, static, num_res, out_avals):
    res, lin = args[:num_res], args[num_res:]
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError(f"{rule.name}: the residuals are not linear inputs.")
    if rule is _BATCHED:  # zero cotangents are made per example, unbatched
        cts = [None if type(ct) is ad.Zero else ct for ct in cts]
    else:
        cts = [
            jnp.zeros(a.shape, a.dtype) if type(ct) is ad.Zero else jnp.asarray(ct, a.dtype)
            for ct, a in zip(cts, out_avals, strict=True)
        ]
    undefined = tuple(ad.is_undefined_primal(t) for t in lin)
    out = rule.transpose(static, tuple(res), tuple(cts), undefined)
    return [None] * num_res + [o if u else None for o, u in zip(out, undefined, strict=True)]


def _batch(args, dims, *, rule, static, num_res, out_avals):
    # Batched, it stays one linear map (its transpose the batched backward): the
    # gradient of a vmapped head runs the core's backward under vmap, as a custom_vjp's.
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    bstatic = (rule, static, tuple(dims[:num_res]), tuple(dims[num_res:]), out_avals)
    outs = linear_map_p.bind(
        *args,
        rule=_BATCHED,
        static=bstatic,
        num_res=num_res,
        out_avals=tuple(unmapped_aval(size, 0, a) for a in out_avals),
    )
    return outs, [0] * len(outs)


def _batched_apply(bstatic, res, lin):
    rule, static, res_dims, lin_dims, _ = bstatic
    fn = lambda r, t: tuple(rule.apply(static, r, t))
    return jax.vmap(fn, in_axes=(res_dims, lin_dims))(res, lin)


def _batched_transpose(bstatic, res, cts, undefined):
    rule, static, res_dims, lin_dims, out_avals = bstatic

    def fn(r, c):
        c = [
            jnp.zeros(a.shape, a.dtype) if ct is None else ct
            for ct, a in zip(c, out_avals, strict=True)
        ]
        return tuple(rule.transpose(static, r, c, undefined))

    out = jax.vmap(fn, in_axes=(res_dims, 0))(res, tuple(cts))
    # A linear input shared by the batch gets the sum of the per-example cotangents.
    return tuple(
        None if o is None else (jnp.sum(o, axis=0) if d is None else jnp.moveaxis(o, 0, d))
        for o, d in zip(out, lin_dims, strict=True)
    )


_BATCHED = LinearRule("batched", _batched_apply, _batched_transpose)


def _jvp(primals, tangents, *, rule, static, num_res, out_avals):
    # Second order: the plain-JAX map differentiated by JAX.
    fn = functools.partial(_apply, rule=rule, static=static, num_res=num_res, out_avals=out_avals)
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(fn, list(primals), tangents)


linear_map_p.def_impl(_apply_jit)
linear_map_p.def_abstract_eval(_abstract_eval)
ad.primitive_transposes[linear_map_p] = _transpose
ad.primitive_jvps[linear_map_p] = _jvp
batching.primitive_batchers[linear_map_p] = _batch
mlir.register_lowering(linear_map_p, mlir.lower_fun(_apply, multiple_results=True))


def present(tangent) -> bool:
    """Whether a ``custom_jvp`` tangent (with ``symbolic_zeros=True``) is a real one
    (not a symbolic zero, nor the None of an absent argument)."""
    return tangent is not None and not isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def known_call(fn, *args):
    """``fn(*args)``, seen by JAX's partial evaluation as one call.

    A ``custom_jvp`` rule's primal part runs under partial evaluation in reverse mode;
    there, chunk loops traced op by op get loop-invariant residuals hoisted out of
    them (a stacked copy of ``x``). Evaluated as one call (a ``custom_jvp`` with
    JAX's own derivative, so second order still differentiates ``fn``), the known
    computation is traced exactly as without differentiation.
    """

    @jax.custom_jvp
    def call(*a):
        return fn(*a)

    call.defjvp(lambda primals, tangents: jax.jvp(fn, primals, tangents))
    return call(*args)


def zero_tangent(value) -> Any:
    """A symbolic zero tangent for ``value`` (a ``custom_jvp`` rule's output with
    ``symbolic_zeros=True``): free, and typed like ``value`` (integer outputs get
    float0, and the varying mesh axes inside ``shard_map`` are kept)."""
    return jax.custom_derivatives.SymbolicZero(jax.typeof(value).to_tangent_aval())


# --------------------------------------------------------------------------------------
# The tangents of the per-token statistics: J . (tx, tw, tb), in vocabulary chunks
# --------------------------------------------------------------------------------------


def tangent_chunks(n: int, v: int, block_bytes: int = 32 * 2**20) -> tuple[int, int]:
    """Default ``[token_chunk, vocab_chunk]`` of the tangent pass (a float32 block)."""
    tn = max(1, min(n, 4096))
    vc = max(1, min(v, max(128, block_bytes // (4 * tn))))
    return tn, vc


def _start(i, chunk: int, total: int):
    nominal = i * chunk
    return jnp.minimum(nominal, total - chunk), nominal


def stats_tangents(x, w, bias, labels, valid, lse, expected, tx, tw, tb, hp, tn, vc, va):
    """Tangents of (lse, label logit(s), logit sum[, expected logit]) for input
    tangents ``tx``, ``tw``, ``tb`` (each may be None: a zero tangent).

    ``labels`` are local column ids (``[N]``, or ``[N, K]`` with ``hp.picked``); ``w``
    is ``[D, V]`` (``va == 1``) or ``[V, D]`` (``va == 0``). With ``s`` the head's
    logits and ``p = softmax(s)``, ``ds = (tx @ w + x @ tw + tb) * ds/dz`` and
    ``d lse = <p, ds>``, ``d s_y = ds_y``, ``d sum(s) = sum(ds)``,
    ``d E_p[s] = <p, ds * (1 + s - E_p[s])>``. Excluded tokens get zero tangents
    (the backward passes give them zero gradients). The max logit and the argmax
    have none.
    """
    n = x.shape[0]
    v = w.shape[va]
    f32 = _ce_math.acc_dtype(x.dtype)
    if n == 0 or v == 0:
        return (
            jnp.zeros_like(lse, dtype=f32),
            jnp.zeros_like(labels, dtype=f32),
            jnp.zeros_like(lse, dtype=f32),
            jnp.zeros_like(lse, dtype=f32),
        )
    tn, vc = max(1, min(tn, n)), max(1, min(vc, v))
    zero = jnp.zeros((), x.dtype)
    rowmask = valid[:, None]
    x = jnp.where(rowmask, x, zero)
    if tx is not None:
        tx = jnp.where(rowmask, tx, jnp.zeros((), tx.dtype))
    lse = jnp.where(valid, lse, 0.0)
    if expected is not None:
        expected = jnp.where(valid, expected, 0.0)
    w_dims = (((1,), (1 - va,)), ((), ()))
    init = (
        jnp.zeros_like(lse, dtype=f32),  # d lse
        jnp.zeros_like(labels, dtype=f32),  # d label logit(s)
        jnp.zeros_like(lse, dtype=f32),  # d logit sum
        jnp.zeros_like(lse, dtype=f32),  # d expected logit
    )

    def v_body(j, carry):
        vstart, vnom = _start(j, vc, v)
        col_new = (vstart + jnp.arange(vc, dtype=jnp.int32)) >= vnom
        w_blk = jax.lax.dynamic_slice_in_dim(w, vstart, vc, axis=va)
        tw_blk = None if tw is None else jax.lax.dynamic_slice_in_dim(tw, vstart, vc, axis=va)
        b_blk = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, vstart, vc)
        tb_blk = None if tb is None else jax.lax.dynamic_slice_in_dim(tb, vstart, vc)

        def t_body(i, carry):
            tstart, tnom = _start(i, tn, n)
            rows_new = (tstart + jnp.arange(tn)) >= tnom
            sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=tstart, slice_size=tn)
            x_blk = sl(x)
            z = jax.lax.dot_general(x_blk, w_blk, w_dims, preferred_element_type=f32)
            if b_blk is not None:
                z = z + b_blk.astype(f32)[None, :]
            s = _ce_math.head_logits(z, hp.softcap, hp.temperature)
            dz = jnp.zeros_like(s)
            if tx is not None:
                dz = dz + jax.lax.dot_general(sl(tx), w_blk, w_dims, preferred_element_type=f32)
            if tw_blk is not None:
                dz = dz + jax.lax.dot_general(x_blk, tw_blk, w_dims, preferred_element_type=f32)
            if tb_blk is not None:
                dz = dz + tb_blk.astype(f32)[None, :]
            if hp.temperature == 1.0:
                ds = dz * _ce_math.softcap_grad(s, hp.softcap)
            else:
                ds = dz * _ce_math.softcap_grad(s * hp.temperature, hp.softcap) / hp.temperature
            ds = jnp.where(col_new[None, :], ds, 0.0)
            p = jnp.where(col_new[None, :], jnp.exp(s - sl(lse)[:, None]), 0.0)
            p_ds = p * ds
            old = [sl(c) for c in carry]
            d_lse, d_lab, d_sum, d_exp = old
            d_lse = d_lse + jnp.sum(p_ds, axis=1)
            d_lab = d_lab + _ce_math.picked_in_chunk(ds, sl(labels) - vstart, col_new)
            if hp.need_sum:
                d_sum = d_sum + jnp.sum(ds, axis=1)
            if expected is not None:
                d_exp = d_exp + jnp.sum(p_ds * (1.0 + s - sl(expected)[:, None]), axis=1)
            new = (d_lse, d_lab, d_sum, d_exp)
            return tuple(
                jax.lax.dynamic_update_slice_in_dim(
                    c, jnp.where(rows_new.reshape((tn,) + (1,) * (c.ndim - 1)), nw, od), tstart, 0
                )
                for c, nw, od in zip(carry, new, old, strict=True)
            )

        return jax.lax.fori_loop(0, -(-n // tn), t_body, carry)

    d_lse, d_lab, d_sum, d_exp = jax.lax.fori_loop(0, -(-v // vc), v_body, init)
    mask = lambda t: jnp.where(valid.reshape(valid.shape + (1,) * (t.ndim - 1)), t, 0.0)
    return mask(d_lse), mask(d_lab), mask(d_sum), mask(d_exp)
