"""The engine every fused head runs on: per-token row statistics and their cores.

Every fused head streams the logits row of each token, ``z = x @ w (+ bias)``, in
chunks and reduces it to a few float32 per-token statistics (:class:`TokenStats`:
log-sum-exp, the logit at the label, the logit sum, the max and argmax). A head's
loss is a small differentiable function of those statistics; autodiff through it
gives the per-token cotangents of the statistics, and the *stats core* of a backend
maps them back to ``dx``, ``dw`` and ``dbias`` chunk by chunk.

A backend (``reference``, ``xla``, ``pallas_gpu``, ``pallas_tpu``) is:

- a frozen config dataclass (its tuning knobs);
- ``plan(config, problem, target)``: the static plan for a :class:`Problem` on a
  :class:`~fusedloss.heads._targets.Target` (tiles chosen for that chip), raising
  ``NotImplementedError`` where the backend cannot run the call;
- ``stats(x, w, bias, labels, valid, vocab_offset, hp, plan) -> TokenStats``: the
  differentiable statistics core (usually :func:`make_stats_core` of a forward and
  a backward).

The fixed table of backends lives in :mod:`._registry`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fusedloss import _ce_math
from fusedloss.heads import _tangents


class Hyper(NamedTuple):
    """Static loss hyperparameters (hashable, so they can be nondiff args)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0  # the head's logits are softcap(z) / temperature
    entropy: bool = False  # the expected logit E_p[s] is wanted (entropy, ...)
    picked: int = 0  # K > 0: the labels are [N, K] ids, each one's logit is wanted

    @property
    def need_sum(self) -> bool:
        return self.label_smoothing != 0.0


class TokenStats(NamedTuple):
    """Per-token float32 statistics over the (local) vocabulary."""

    lse: jax.Array  # log-sum-exp of the (softcapped) logits
    label_logit: jax.Array  # the label's logit ([N, K]: each id's), 0 if not in this vocabulary
    sum_logits: jax.Array  # sum of the (softcapped) logits (0 unless smoothing)
    max_logit: jax.Array  # largest logit, for argmax / accuracy
    argmax: jax.Array  # int32 column of the largest logit (global id)
    expected_logit: jax.Array | None = None  # E_softmax(s)[s] (only with hp.entropy)


class Problem(NamedTuple):
    """What a backend's plan depends on besides its config and the target."""

    n: int  # tokens
    d: int  # hidden size
    v: int  # (local) vocabulary size
    dtype: Any  # x / w dtype
    w_vd: bool  # w is held as its [V, D] transpose (tied embeddings)
    needs_stats: bool  # the head needs the statistics (no loss fused with its gradient)
    hp: Hyper = Hyper()  # what the statistics are of (temperature, expected logit, ...)


class HeadOutput(NamedTuple):
    """A cross-entropy head's loss and its per-token side outputs (constants, 0 or
    -1 on excluded tokens)."""

    loss: jax.Array  # [N] coef-weighted per-token loss, or the scalar sum of it
    lse: jax.Array  # [N]
    label_logit: jax.Array  # [N] the label's (softcapped) logit
    predicted: jax.Array  # [N] int32 argmax id, -1 where excluded


def side_outputs(valid, lse, label_logit, argmax) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The per-token side outputs of a head: constants, 0 (ids: -1) where excluded."""
    sg = jax.lax.stop_gradient
    return (
        sg(jnp.where(valid, lse, 0.0)),
        sg(jnp.where(valid, label_logit, 0.0)),
        jnp.where(valid, argmax, -1).astype(jnp.int32),
    )


def cross_entropy_from_stats(
    stats: TokenStats,
    labels: jax.Array,
    valid: jax.Array,
    coef: jax.Array,
    hp: Hyper,
    num_classes: int,
    per_token: bool,
) -> HeadOutput:
    """The cross-entropy head: a differentiable function of the statistics."""
    loss = _ce_math.token_loss(
        stats.lse,
        stats.label_logit,
        stats.sum_logits if hp.need_sum else None,
        num_classes=num_classes,
        label_smoothing=hp.label_smoothing,
        z_loss=hp.z_loss,
    )
    loss = jnp.where(valid, loss * coef, 0.0)
    loss = _ce_math.nan_if_bad_label(loss, labels, num_classes, valid)
    side = side_outputs(valid, stats.lse, stats.label_logit, stats.argmax)
    return HeadOutput(loss if per_token else jnp.sum(loss), *side)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_down(value: int, multiple: int, minimum: int) -> int:
    return max(minimum, (value // multiple) * multiple)


_KERNEL_DTYPES = ("float16", "bfloat16", "float32")


def require_kernel_support(name: str, platform: str, interpreted: bool, problem, target) -> None:
    """What every Pallas kernel's plan checks: one logit per token (the kernels fold
    the log-sum-exp, the label's logit, the logit sum and the expected logit of
    ``softcap(x @ w + bias) / temperature``), its own platform (unless interpreted)
    and a dtype the kernels take; ``NotImplementedError`` otherwise, so that
    ``implementation=None`` falls back."""
    if problem.hp.picked:
        raise NotImplementedError(
            f"{name} folds one label logit per token; K logits per token (the top-K "
            "distillation's teacher ids) need another implementation."
        )
    if interpreted:
        return
    config = "PallasGpuConfig" if platform == "gpu" else "PallasTpuConfig"
    if target.platform != platform:
        raise NotImplementedError(
            f"{name} compiles for {platform.upper()}s, not for {target.platform!r} "
            f"(use {config}(interpret=True) to interpret the kernels)."
        )
    dtype = jnp.dtype(problem.dtype).name
    if dtype not in _KERNEL_DTYPES:
        raise NotImplementedError(f"{name} supports {_KERNEL_DTYPES} inputs, got {dtype}.")


def make_stats_core(forward, backward, name: str, chunks=None, second_order=None):
    """A differentiable stats core from a forward and a backward pass.

    ``forward(x, w, bias, local_labels, hp, plan) -> TokenStats`` (local column ids)
    and ``backward(x, w, bias, local_labels, valid, lse, cts, hp, plan) -> (dx, dw,
    db)`` with ``cts`` the cotangents of (lse, label logit, logit sum). The core's
    ``labels`` are global ids and ``w``'s column ``j`` is vocabulary id
    ``vocab_offset + j`` (a vocabulary shard). ``w`` is ``[D, V]``, or ``[V, D]``
    when ``plan.w_vd``. Only ``(x, w, bias, labels, valid, lse)`` are kept for the
    backward: nothing ``[N, V]``-sized.

    The core is a ``jax.custom_jvp``: its tangents are a linear map of the input
    tangents (:func:`._tangents.stats_tangents`, in vocabulary chunks of
    ``chunks(plan, n, v) -> (token_chunk, vocab_chunk)``) whose transpose is
    ``backward``. Forward mode (``jax.jvp``, ``jax.jacfwd``) evaluates the map;
    reverse mode transposes it, i.e. runs ``backward`` on the same residuals as a
    ``custom_vjp`` would.

    Passes JAX cannot differentiate (Pallas kernels) take ``second_order``, a plain-JAX
    ``backward``: for second order (``jax.hessian``) the forward pass is then
    differentiated by this rule itself, and ``backward`` as ``second_order``.
    """
    if second_order is not None:
        backward = _differentiated_as(backward, second_order)
    rule = _tangents.LinearRule(f"{name}_tangents", _stats_apply, _stats_transpose)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7))
    def stats_core(x, w, bias, labels, valid, vocab_offset, hp: Hyper, plan):
        return fwd(x, w, bias, labels, valid, vocab_offset, hp, plan)[0]

    def fwd(x, w, bias, labels, valid, vocab_offset, hp, plan):
        offset = jnp.asarray(vocab_offset, jnp.int32)
        local = labels.astype(jnp.int32) - offset
        stats = forward(x, w, bias, local, hp, plan)
        stats = stats._replace(argmax=stats.argmax + offset)
        return stats, (x, w, bias, local, valid, stats.lse, stats.expected_logit)

    def jvp(hp, plan, primals, tangents):
        known = functools.partial(fwd, hp=hp, plan=plan)
        if second_order is None:
            stats, res = _tangents.known_call(known, *primals)
        else:
            stats, res = _known_by_rule(known, functools.partial(jvp, hp, plan), *primals)
        x, w, bias, local, valid, lse, expected = res
        tx, tw, tb = tangents[:3]
        have = tuple(_tangents.present(t) for t in (tx, tw, tb))
        if not any(have):  # e.g. only the labels or the offset were "differentiated"
            t_lse = t_lab = t_sum = t_exp = None
        else:
            va = 0 if plan.w_vd else 1
            n, v = x.shape[0], w.shape[va]
            tn, vc = _tangents.tangent_chunks(n, v) if chunks is None else chunks(plan, n, v)
            static = (hp, plan, backward, bias is not None, have, tn, vc, va)
            stat_avals = [stats.lse, stats.label_logit, stats.sum_logits]
            if hp.entropy:
                stat_avals.append(stats.expected_logit)
            lin = [t for t, h in zip((tx, tw, tb), have, strict=True) if h]
            res = [r for r in (x, w, bias, local, valid, lse, expected) if r is not None]
            outs = _tangents.linear_map(rule, static, res, lin, [jax.typeof(a) for a in stat_avals])
            t_lse, t_lab, t_sum = outs[:3]
            t_exp = outs[3] if hp.entropy else None
        zero = _tangents.zero_tangent
        t_stats = TokenStats(
            lse=zero(stats.lse) if t_lse is None else t_lse,
            label_logit=zero(stats.label_logit) if t_lab is None else t_lab,
            sum_logits=zero(stats.sum_logits) if t_sum is None else t_sum,
            max_logit=zero(stats.max_logit),  # no tangent (as in reverse mode)
            argmax=zero(stats.argmax),
            expected_logit=None
            if not hp.entropy
            else (zero(stats.expected_logit) if t_exp is None else t_exp),
        )
        return stats, t_stats

    stats_core.defjvp(jvp, symbolic_zeros=True)
    stats_core.__name__ = stats_core.__qualname__ = name
    return stats_core


def _differentiated_as(backward, plain):
    """``backward`` whose derivative is that of ``plain`` (the same linear map)."""

    def call(x, w, bias, local, valid, lse, cts, hp, plan):
        def run(fn):
            return lambda *a: fn(*a, hp, plan)

        f = jax.custom_jvp(run(backward))
        f.defjvp(lambda primals, tangents: jax.jvp(run(plain), primals, tangents))
        return f(x, w, bias, local, valid, lse, cts)

    return call


def _known_by_rule(fwd, rule, *args):
    """``fwd(*args) -> (stats, residuals)`` as one call, differentiated by the stats
    core's own rule (the residuals' tangents: the inputs' and the statistics')."""

    @jax.custom_jvp
    def call(*a):
        return fwd(*a)

    def call_jvp(primals, tangents):
        stats, t_stats = rule(primals, tangents)
        res = fwd(*primals)[1]
        tx, tw, tb = tangents[:3]
        zero = _tangents.zero_tangent
        t_res = (tx, tw, tb, zero(res[3]), zero(res[4]), t_stats.lse, t_stats.expected_logit)
        return (stats, res), (t_stats, t_res)

    call.defjvp(call_jvp, symbolic_zeros=True)
    return call(*args)


def _unpack_residuals(static, res):
    hp, _, _, has_bias, _, _, _, _ = static
    res = list(res)
    x, w = res.pop(0), res.pop(0)
    bias = res.pop(0) if has_bias else None
    local, valid, lse = res.pop(0), res.pop(0), res.pop(0)
    expected = res.pop(0) if hp.entropy else None
    return x, w, bias, local, valid, lse, expected


def _stats_apply(static, res, lin):
    hp, _, _, _, have, tn, vc, va = static
    x, w, bias, local, valid, lse, expected = _unpack_residuals(static, res)
    lin = list(lin)
    tx, tw, tb = (lin.pop(0) if h else None for h in have)
    outs = _tangents.stats_tangents(
        x, w, bias, local, valid, lse, expected, tx, tw, tb, hp, tn, vc, va
    )
    return outs if hp.entropy else outs[:3]


def _stats_transpose(static, res, cts, undefined):
    hp, plan, backward, _, have, _, _, _ = static
    x, w, bias, local, valid, lse, expected = _unpack_residuals(static, res)
    cts = tuple(cts)
    if hp.entropy:
        cts = (*cts[:3], cts[3], expected)
    grads = backward(x, w, bias, local, valid, lse, cts, hp, plan)
    return tuple(g for g, h in zip(grads, have, strict=True) if h)
