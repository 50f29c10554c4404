"""Forward-mode autodiff of the fused heads (``jvp``, ``jacfwd``, ``check_grads`` with
its default modes, ``hessian``) against a float64 oracle that materializes the logits,
on every implementation; and reverse mode keeps its compiled temporaries.

Shapes are tiny and the chunks smaller still, so that the chunk loops (statistics,
tangents, backward) run several iterations with a clamped last chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lce_impls import IMPL_CASES
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import fusedloss as fl

N, D, V, K = 12, 8, 37, 3
SMALL = dict(token_chunk=5, vocab_chunk=8)
PALLAS = [c for c in IMPL_CASES if c[1].startswith("pallas")]
IMPLS = [
    ("reference", "reference", None),
    ("xla-recompute", "xla", fl.XlaConfig(strategy="recompute", **SMALL)),
    ("xla-grad_in_forward", "xla", fl.XlaConfig(strategy="grad_in_forward", **SMALL)),
    ("xla-materialized", "xla", fl.XlaConfig(strategy="materialized")),
    *PALLAS,
]
CE_KW = dict(logit_softcap=4.0, label_smoothing=0.2, z_loss=1e-3, ignore_index=-100)
TOL64 = dict(rtol=1e-9, atol=1e-11)
RED = ("mean", "sum", "none")


def _ids(cases):
    return [c[0] for c in cases]


def _data(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D))
    w = rng.normal(size=(D, V)) / np.sqrt(D) * 2
    b = rng.normal(size=(V,)) * 0.5
    labels = rng.integers(0, V, size=N).astype(np.int32)
    labels[3] = CE_KW["ignore_index"]
    where = rng.random(N) > 0.2
    where[0] = True
    weights = rng.uniform(0.2, 2.0, size=N)
    tangents = [rng.normal(size=a.shape) for a in (x, w, b, weights)]
    cast = lambda a: jnp.asarray(a, dtype)
    return (
        [cast(a) for a in (x, w, b, weights)],
        jnp.asarray(labels),
        jnp.asarray(where),
        [cast(t) for t in tangents],
    )


def _logits64(x, w, b, cap=None, temperature=1.0):
    z = x.astype(jnp.float64) @ w.astype(jnp.float64) + b.astype(jnp.float64)[None, :]
    if cap is not None:
        z = cap * jnp.tanh(z / cap)
    return z / temperature


def _reduce64(per_tok, wts, reduction):
    if reduction == "none":
        return per_tok
    if reduction == "sum":
        return per_tok.sum()
    return per_tok.sum() / wts.sum()


def ce_oracle(x, w, b, weights, labels, where, reduction):
    """linear_cross_entropy from the definition, on the materialized float64 logits."""
    s = _logits64(x, w, b, CE_KW["logit_softcap"])
    lse = jax.nn.logsumexp(s, axis=-1)
    a, zl = CE_KW["label_smoothing"], CE_KW["z_loss"]
    valid = where & (labels != CE_KW["ignore_index"])
    lab = jnp.take_along_axis(s, jnp.clip(labels, 0, V - 1)[:, None], axis=1)[:, 0]
    loss = lse - (1 - a) * lab - a / V * s.sum(-1) + zl * lse**2
    wts = jnp.where(valid, weights.astype(jnp.float64), 0.0)
    return _reduce64(jnp.where(valid, loss, 0.0) * wts, wts, reduction)


def ce_ours(impl, cfg, reduction, labels, where, weights):
    def f(x, w, b):
        return fl.linear_cross_entropy(
            x, w, labels, bias=b, weights=weights, where=where, reduction=reduction,
            implementation=impl, config=cfg, **CE_KW,
        )  # fmt: skip

    return f


def _ce_case(case, reduction, seed=0, dtype=np.float64):
    """(ours, oracle, primals, tangents) of (x, w, bias); the weights are data."""
    _, impl, cfg = case
    args, labels, where, tangents = _data(seed, dtype)
    weights = args.pop()
    tangents.pop()
    ours = ce_ours(impl, cfg, reduction, labels, where, weights)
    ref = functools.partial(
        ce_oracle, weights=weights, labels=labels, where=where, reduction=reduction
    )
    return ours, ref, tuple(args), tuple(tangents)


def _reductions(case):
    """grad_in_forward forms reduced losses only."""
    return ("mean", "sum") if case[0] == "xla-grad_in_forward" else ("mean", "sum", "none")


@pytest.mark.parametrize("case", IMPLS, ids=_ids(IMPLS))
def test_linear_cross_entropy_jvp_and_jacfwd(case):
    """For each reduction, jvp w.r.t. x, w and bias equals the float64 oracle's
    directional derivative; jacfwd (per-token losses where there are: the full
    Jacobian) equals the oracle's and jacrev. One compiled program per implementation
    (the Pallas cores' jacrev, their backward kernels in interpret mode, is left to
    check_grads' reverse mode below, to keep the compile short)."""
    reductions = _reductions(case)
    rev_too = not case[1].startswith("pallas")
    with jax.enable_x64(True):
        cases = [_ce_case(case, r) for r in reductions]
        args, tangents = cases[0][2], cases[0][3]
        last = cases[-1][0]

        def run(a, t):
            jvps = [jax.jvp(c[0], a, t) for c in cases]
            jacs = [jax.jacfwd(last, (0, 1, 2))(*a)]
            if rev_too:
                jacs.append(jax.jacrev(last, (0, 1, 2))(*a))
            return jvps, jacs

        def run_oracle(a, t):
            jvps = [jax.jvp(c[1], a, t) for c in cases]
            return jvps, jax.jacfwd(cases[-1][1], (0, 1, 2))(*a)

        jvps, jacs = jax.jit(run)(args, tangents)
        # The oracle jitted too: run op by op, its float64 Jacobian took seconds.
        want_jvps, want_jac = jax.jit(run_oracle)(args, tangents)
        for (got_out, got), (want_out, want) in zip(jvps, want_jvps, strict=True):
            np.testing.assert_allclose(got_out, want_out, **TOL64)
            np.testing.assert_allclose(got, want, **TOL64)
            assert np.abs(np.asarray(want)).max() > 1e-3
        for jac in jacs:
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL64), jac, want_jac)


@pytest.mark.parametrize("case", IMPLS, ids=_ids(IMPLS))
def test_linear_cross_entropy_check_grads_default_modes(case):
    """``check_grads(f, args, order=1)``: forward and reverse mode against finite
    differences and each other."""
    with jax.enable_x64(True):
        ours, _, args, _ = _ce_case(case, "mean", seed=2)
        check_grads(jax.jit(ours), args, order=1)


def test_linear_cross_entropy_hessian():
    """jax.hessian (forward over reverse) w.r.t. the bias, both xla strategies (the
    reference and the materialized strategy are plain JAX)."""
    with jax.enable_x64(True):
        cases = [_ce_case(c, "mean", seed=3) for c in IMPLS[1:3]]
        args = cases[0][2]
        got = jax.jit(lambda *a: [jax.hessian(c[0], 2)(*a) for c in cases])(*args)
        want = jax.jit(jax.hessian(cases[0][1], 2))(*args)
        for g in got:
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10), g, want
            )


@pytest.mark.parametrize("case", PALLAS, ids=_ids(PALLAS))
def test_pallas_hessian(case):
    """jax.hessian through the kernels (interpret mode): the forward kernel is
    differentiated by the core's tangent map and the backward kernel as the plain-JAX
    backward, so second order needs no derivative of a kernel."""
    with jax.enable_x64(True):
        ours, ref, args, _ = _ce_case(case, "mean", seed=3)
        got = jax.jit(jax.hessian(ours, 2))(*args)
        want = jax.jit(jax.hessian(ref, 2))(*args)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_bfloat16_jvp():
    """bf16 inputs (both xla strategies): the tangent is accumulated in float32."""
    cases = [_ce_case(c, "mean", seed=4, dtype=jnp.bfloat16) for c in IMPLS[1:3]]
    args, tangents = cases[0][2], cases[0][3]
    got = jax.jit(lambda a, t: [jax.jvp(c[0], a, t)[1] for c in cases])(args, tangents)
    with jax.enable_x64(True):
        _, ref, _, _ = _ce_case(IMPLS[0], "mean", seed=4)
        to64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
        want = jax.jvp(ref, tuple(map(to64, args)), tuple(map(to64, tangents)))[1]
    for g in got:
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(float(g), float(want), rtol=2e-2, atol=2e-2)


def test_tied_embeddings_jvp():
    """w passed as Transposed(embedding) (read in [V, D] row chunks): the tangent of
    the embedding, both xla strategies."""
    with jax.enable_x64(True):
        (x, w, b, weights), labels, where, (tx, tw, tb, _) = _data(5)
        args, tangents = (x, w.T, b), (tx, tw.T, tb)

        def ours(case):
            f = ce_ours(case[1], case[2], "mean", labels, where, weights)
            return lambda x, e, b: f(x, fl.Transposed(e), b)

        run = lambda a, t: [jax.jvp(ours(c), a, t)[1] for c in IMPLS[1:3]]
        got = jax.jit(run)(args, tangents)
        ref = functools.partial(
            ce_oracle, weights=weights, labels=labels, where=where, reduction="mean"
        )
        want = jax.jvp(lambda x, e, b: ref(x, e.T, b), args, tangents)[1]
        for g in got:
            np.testing.assert_allclose(g, want, **TOL64)


# ----------------------------------------------------------------------------------
# linear_log_probs (temperature, entropy) and linear_topk_distillation_loss (K ids)
# ----------------------------------------------------------------------------------

LP_KW = dict(temperature=0.7, logit_softcap=3.0)


def log_probs_oracle(x, w, b, labels, where):
    s = _logits64(x, w, b, LP_KW["logit_softcap"], LP_KW["temperature"])
    logp = jax.nn.log_softmax(s, axis=-1)
    picked = jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.where(where, picked, 0.0), jnp.where(where, ent, 0.0)


def test_log_probs_forward_mode():
    _, impl, cfg = IMPLS[1]
    with jax.enable_x64(True):
        (x, w, b, _), labels, where, (tx, tw, tb, _) = _data(3)
        labels = jnp.clip(labels, 0, V - 1)

        def ours(x, w, b):
            return fl.linear_log_probs(
                x, w, labels, bias=b, where=where, return_entropy=True,
                implementation=impl, config=cfg, **LP_KW,
            )  # fmt: skip

        ref = functools.partial(log_probs_oracle, labels=labels, where=where)
        got = jax.jit(lambda a, t: jax.jvp(ours, a, t)[1])((x, w, b), (tx, tw, tb))
        want = jax.jvp(ref, (x, w, b), (tx, tw, tb))[1]
        jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, **TOL64), got, want)
        check_grads(jax.jit(ours), (x, w, b), order=1)


def topk_oracle(x, w, b, ids, tlp, reduction):
    s = _logits64(x, w, b, LP_KW["logit_softcap"], LP_KW["temperature"])
    log_ps = jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), ids, axis=1)
    pt = jnp.exp(tlp)
    rt = 1.0 - pt.sum(-1)
    rs = 1.0 - jnp.exp(log_ps).sum(-1)
    kl = jnp.sum(pt * (tlp - log_ps), axis=-1) + rt * (jnp.log(rt) - jnp.log(rs))
    return _reduce64(kl, jnp.ones_like(kl), reduction)


def test_topk_distillation_forward_mode():
    _, impl, cfg = IMPLS[1]
    with jax.enable_x64(True):
        (x, w, b, _), _, _, (tx, tw, tb, _) = _data(4)
        rng = np.random.default_rng(5)
        ids = jnp.asarray(np.stack([rng.permutation(V)[:K] for _ in range(N)]).astype(np.int32))
        tlp = jnp.asarray(np.log(rng.dirichlet(np.ones(K + 1), size=N)[:, :K]))

        def ours(x, w, b, reduction="none"):
            return fl.linear_topk_distillation_loss(
                x, w, ids, tlp, bias=b, reduction=reduction,
                implementation=impl, config=cfg, **LP_KW,
            )  # fmt: skip

        run = lambda a, t: [jax.jvp(functools.partial(ours, reduction=r), a, t)[1] for r in RED]
        got = jax.jit(run)((x, w, b), (tx, tw, tb))
        for g, r in zip(got, RED, strict=True):
            ref = functools.partial(topk_oracle, ids=ids, tlp=tlp, reduction=r)
            want = jax.jvp(ref, (x, w, b), (tx, tw, tb))[1]
            np.testing.assert_allclose(g, want, **TOL64)
        check_grads(jax.jit(ours), (x, w, b), order=1)


# ----------------------------------------------------------------------------------
# Sharded: forward mode through the per-device cores and the collectives
# ----------------------------------------------------------------------------------


def test_vocab_parallel_forward_mode(check_vma=True):
    """jvp of the in-shard function inside a user's shard_map (1 x 4 mesh, vocabulary
    split in four, shard_map's default check_vma=True) equals the unsharded oracle's
    directional derivative."""
    mesh = jax.make_mesh((1, 4), ("data", "model"), devices=jax.devices()[:4])
    with jax.enable_x64(True):
        (x, w, b, _), labels, where, (tx, tw, tb, _) = _data(6)
        w, b, tw, tb = (jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, 3)]) for a in (w, b, tw, tb))
        labels = jnp.clip(labels, 0, V - 1)
        cfg = fl.XlaConfig(strategy="recompute", **SMALL)

        def loss(x, w, b):
            return fl.vocab_parallel_linear_cross_entropy(
                x, w, labels, bias=b, where=where, model_axis="model", vocab_size=V,
                implementation="xla", config=cfg, logit_softcap=4.0, z_loss=1e-3,
            )  # fmt: skip

        specs = (P(), P(None, "model"), P("model"))
        fn = jax.shard_map(loss, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)
        put = lambda arrays: tuple(
            jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(arrays, specs, strict=True)
        )
        got = jax.jit(lambda a, t: jax.jvp(fn, a, t)[1])(put((x, w, b)), put((tx, tw, tb)))

        def ref(x, w, b):
            s = _logits64(x, w[:, :V], b[:V], 4.0)
            lse = jax.nn.logsumexp(s, axis=-1)
            lab = jnp.take_along_axis(s, labels[:, None], axis=1)[:, 0]
            return jnp.sum(jnp.where(where, lse - lab + 1e-3 * lse**2, 0.0)) / jnp.sum(
                where.astype(jnp.float64)
            )

        want = jax.jvp(ref, (x, w, b), (tx, tw, tb))[1]
        np.testing.assert_allclose(got, want, **TOL64)


def test_sharded_wrapper_forward_mode():
    """jvp of sharded_linear_cross_entropy on a 2 x 4 (data x model) mesh."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    with jax.enable_x64(True):
        (x, w, b, _), labels, where, (tx, tw, tb, _) = _data(7)
        labels = jnp.clip(labels, 0, V - 1)
        kw = dict(bias=b, where=where, logit_softcap=4.0, z_loss=1e-3)

        def loss(x, w, b):
            return fl.sharded_linear_cross_entropy(
                x, w, labels, mesh=mesh, data_axis="data", model_axis="model",
                implementation="xla", config=fl.XlaConfig(strategy="recompute", **SMALL),
                **{**kw, "bias": b},
            )  # fmt: skip

        def ref(x, w, b):
            return fl.linear_cross_entropy(
                x, w, labels, implementation="reference", **{**kw, "bias": b}
            )

        got = jax.jit(lambda a, t: jax.jvp(loss, a, t)[1])((x, w, b), (tx, tw, tb))
        want = jax.jvp(ref, (x, w, b), (tx, tw, tb))[1]
        np.testing.assert_allclose(got, want, **TOL64)


# ----------------------------------------------------------------------------------
# Reverse mode keeps its compiled temporaries (compile only)
# ----------------------------------------------------------------------------------

# value_and_grad w.r.t. (x, w) at N=2048, D=512, V=32000 float32 on the CPU backend, as
# compiled when the cores were custom_vjp's (recorded with JAX 0.10; identical with
# their custom_jvp's, whose linear part is transposed by the same backward passes).
TEMP_BYTES = {
    "grad_in_forward": 133_313_736,
    "recompute": 65_579_288,
    "log_probs_entropy": 65_644_840,
    "vmap_recompute": 432_565_352,  # the gradient of a head vmapped over 4 sequences
}


def _temporaries(name):
    n, d, v = 2048, 512, 32000
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    if name == "vmap_recompute":
        x = jax.ShapeDtypeStruct((4, n // 4, d), jnp.float32)
        labels = jax.ShapeDtypeStruct((4, n // 4), jnp.int32)
        cfg = fl.XlaConfig(strategy="recompute")
        ce = lambda x, w, y: fl.linear_cross_entropy(x, w, y, implementation="xla", config=cfg)
        f = lambda x, w, labels: jnp.sum(jax.vmap(ce, (0, None, 0))(x, w, labels))
    elif name == "log_probs_entropy":

        def f(x, w, labels):
            logp, ent = fl.linear_log_probs(x, w, labels, return_entropy=True, temperature=0.7)
            return jnp.sum(logp) + 0.1 * jnp.sum(ent)
    else:

        def f(x, w, labels):
            cfg = fl.XlaConfig(strategy=name)
            return fl.linear_cross_entropy(x, w, labels, implementation="xla", config=cfg)

    compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(x, w, labels).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", list(TEMP_BYTES))
def test_reverse_mode_temporaries_are_unchanged(name):
    assert _temporaries(name) <= TEMP_BYTES[name]


def test_reverse_mode_runs_the_backward_kernels():
    """value_and_grad of a Pallas core runs its backward kernel; the forward-mode map
    is only transposed, never evaluated."""
    _, impl, cfg = PALLAS[0]
    x = jax.ShapeDtypeStruct((N, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    labels = jax.ShapeDtypeStruct((N,), jnp.int32)
    f = lambda x, w, y: fl.linear_cross_entropy(x, w, y, implementation=impl, config=cfg)
    text = str(jax.make_jaxpr(jax.value_and_grad(f, (0, 1)))(x, w, labels))
    assert "fusedloss_lce_bwd_dlogits" in text
    assert "fusedloss_linear_map" not in text
