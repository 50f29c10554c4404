"""``linear_topk_distillation_loss`` against a float64 oracle written here (the
materialized student's log-softmax in ``jnp`` under x64, sharing nothing with the
library): values and gradients on every implementation that computes its statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedloss
from fusedloss import XlaConfig, linear_topk_distillation_loss

IMPLS = [
    pytest.param("reference", None, id="reference"),
    pytest.param("xla", XlaConfig(strategy="recompute", token_chunk=16, vocab_chunk=48), id="xla"),
]


def oracle(x, w, ids, tlp, *, bias=None, where=None, weights=None, temperature=1.0,
           cap=None, shift=0, reduction="mean"):  # fmt: skip
    """float64, from the definition of the K + 1-bin forward KL."""
    if shift:
        x, ids, tlp = x[..., :-shift, :], ids[..., shift:, :], tlp[..., shift:, :]
        where = None if where is None else where[..., shift:]
        weights = None if weights is None else weights[..., shift:]
    z = x @ w
    if bias is not None:
        z = z + bias.reshape((1,) * (z.ndim - 1) + (-1,))
    if cap is not None:
        z = cap * jnp.tanh(z / cap)
    logq = jax.nn.log_softmax(z / temperature, axis=-1)
    log_qk = jnp.take_along_axis(logq, ids, axis=-1)
    pk = jnp.exp(tlp)
    rp = jnp.maximum(1 - pk.sum(-1), 0.0)
    rq = 1 - jnp.exp(log_qk).sum(-1)
    kl = jnp.sum(jnp.where(pk > 0, pk * (tlp - log_qk), 0.0), -1)
    kl = kl + jnp.where(rp > 0, rp * jnp.log(jnp.where(rp > 0, rp / rq, 1.0)), 0.0)
    keep = jnp.ones(kl.shape, bool) if where is None else where
    wts = jnp.where(keep, 1.0 if weights is None else weights, 0.0)
    per = jnp.where(keep, kl, 0.0) * wts
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / wts.sum()


def make(seed, lead=(3, 11), d=16, v=97, k=8, teacher_mass=0.9):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 2 / np.sqrt(d)).astype(np.float32)
    bias = rng.normal(size=(v,)).astype(np.float32)
    rows = [rng.permutation(v)[:k] for _ in range(int(np.prod(lead)))]
    for r, end in ((0, 0), (1, v - 1)):  # an id at each end of the vocabulary
        if end not in rows[r]:
            rows[r][0] = end
    ids = np.stack(rows).reshape(*lead, k).astype(np.int32)
    p = rng.dirichlet(np.ones(k), size=lead) * teacher_mass  # mass outside the ids: 0.1
    tlp = np.log(p).astype(np.float32)
    tlp.reshape(-1, k)[0, 1] = -np.inf  # a zero teacher probability
    where = rng.random(lead) > 0.25
    weights = rng.uniform(0.5, 2.0, size=lead).astype(np.float32)
    return x, w, bias, ids, tlp, where, weights


FEATURES = {
    "plain": dict(),
    "temperature_softcap_bias": dict(temperature=2.0, cap=3.0, bias=True),
    "where_weights_shift": dict(where=True, weights=True, shift=1),
}
CASES = [(f, r) for f in FEATURES for r in ("mean", "sum", "none")]


@pytest.mark.parametrize("feature,reduction", CASES)
@pytest.mark.parametrize("impl,cfg", IMPLS)
def test_values_and_gradients_match_float64_oracle(impl, cfg, feature, reduction):
    f = FEATURES[feature]
    x, w, bias, ids, tlp, where, weights = make(sum(map(ord, feature + reduction)))
    kw = dict(temperature=f.get("temperature", 1.0), shift=f.get("shift", 0))
    opt = dict(
        bias=bias if f.get("bias") else None,
        where=where if f.get("where") else None,
        weights=weights if f.get("weights") else None,
    )
    cap = f.get("cap")
    ct = np.random.default_rng(1).normal(size=ids[..., kw["shift"] :, 0].shape)

    def fused(x, w, b):
        out = linear_topk_distillation_loss(
            x, w, ids, tlp, bias=b, where=opt["where"], weights=opt["weights"],
            logit_softcap=cap, reduction=reduction, implementation=impl, config=cfg, **kw,
        )  # fmt: skip
        return jnp.sum(out * ct.astype(np.float32)) if reduction == "none" else out

    argnums = (0, 1, 2) if opt["bias"] is not None else (0, 1)
    got, grads = jax.jit(jax.value_and_grad(fused, argnums))(x, w, opt["bias"])
    with jax.enable_x64(True):
        f64 = lambda a: None if a is None else jnp.asarray(a, jnp.float64)

        def want_fn(x, w, b):
            out = oracle(
                x, w, jnp.asarray(ids), f64(tlp), bias=b, where=opt["where"],
                weights=f64(opt["weights"]), cap=cap, reduction=reduction, **kw,
            )  # fmt: skip
            return jnp.sum(out * ct) if reduction == "none" else out

        want, want_g = jax.value_and_grad(want_fn, argnums)(f64(x), f64(w), f64(opt["bias"]))
    # float32 statistics, O(1) losses: 1e-5 relative.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for name, g, wg in zip(["dx", "dw", "dbias"], grads, want_g, strict=False):
        wg = np.asarray(wg)  # sums over V of float32 terms: atol scaled by the largest
        np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-5 * np.abs(wg).max(), err_msg=name)


def test_no_gradient_to_the_teacher_and_all_mass_on_the_ids():
    x, w, _, ids, tlp, _, _ = make(3, k=97, teacher_mass=1.0)  # K = V: r_p = 0
    g = jax.grad(lambda t: linear_topk_distillation_loss(x, w, ids, t), allow_int=True)(
        jnp.asarray(tlp)
    )
    assert not np.any(np.asarray(g))
    got = linear_topk_distillation_loss(x, w, ids, tlp, implementation="xla")
    with jax.enable_x64(True):
        want = oracle(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64), ids,
                      jnp.asarray(tlp, jnp.float64))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bad_teacher_ids():
    x, w, _, ids, tlp, _, _ = make(4, lead=(6,))
    bad = ids.copy()
    bad[2, 3] = 97
    with pytest.raises(ValueError, match=r"`teacher_ids` must lie in \[0, 97\); got 97"):
        linear_topk_distillation_loss(x, w, bad, tlp)
    out = jax.jit(lambda i: linear_topk_distillation_loss(x, w, i, tlp, reduction="none"))(bad)
    assert np.isnan(out[2]) and np.isfinite(np.delete(np.asarray(out), 2)).all()
    dup = ids.copy()
    dup[4, 1] = dup[4, 0]
    with pytest.raises(ValueError, match="`teacher_ids` must be distinct per token; token 4"):
        linear_topk_distillation_loss(x, w, dup, tlp)
    with pytest.raises(ValueError, match=r"`teacher_ids` must have shape x.shape\[:-1\] \+ \(K,\)"):
        linear_topk_distillation_loss(x, w, ids[..., 0], tlp)
    with pytest.raises(ValueError, match="`teacher_log_probs` must have shape"):
        linear_topk_distillation_loss(x, w, ids, tlp[:, :2])
    with pytest.raises(ValueError, match=r"`temperature` must be in \(0.0, inf\)"):
        linear_topk_distillation_loss(x, w, ids, tlp, temperature=-1.0)
    with pytest.raises(NotImplementedError, match="K logits per token"):
        linear_topk_distillation_loss(
            x, w, ids, tlp, implementation="pallas_tpu",
            config=fusedloss.PallasTpuConfig(interpret=True),
        )  # fmt: skip


def test_memory_topk_64_at_llama3_8b_head_within_cross_entropy():
    """K=64 at Llama-3-8B's head (N=8192, D=4096, V=128256, f32): value_and_grad
    temporaries no larger than the cross-entropy's (both stream the vocabulary)."""
    s = jax.ShapeDtypeStruct
    n, d, v, k = 8192, 4096, 128256, 64
    xs, ws = s((n, d), jnp.float32), s((d, v), jnp.float32)

    def temp(f, *args):
        c = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args).compile()
        return c.memory_analysis().temp_size_in_bytes

    topk = temp(
        lambda x, w, i, t: linear_topk_distillation_loss(x, w, i, t),
        xs, ws, s((n, k), jnp.int32), s((n, k), jnp.float32),
    )  # fmt: skip
    ce = temp(lambda x, w, y: fusedloss.linear_cross_entropy(x, w, y), xs, ws, s((n,), jnp.int32))
    assert topk <= ce, (topk / 2**20, ce / 2**20)


XLA_SMALL = XlaConfig(strategy="recompute", token_chunk=16, vocab_chunk=48)


def test_bf16_gradients_within_the_materialized_error_budget():
    """bf16 student: ``dx`` and ``dw`` (over 32 token blocks) no further from the
    float64 oracle than the materialized bf16 computation's."""
    from oracles import assert_within_error_budget, distill_topk_oracle

    x, w, _, ids, tlp, where, _ = make(41, lead=(512,), d=16, v=64, k=6)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    kw = dict(temperature=1.5, where=where)

    def grads(impl, cfg):
        f = lambda x, w: linear_topk_distillation_loss(
            x, w, ids, tlp, implementation=impl, config=cfg, **kw
        )
        gx, gw = jax.jit(jax.grad(f, (0, 1)))(xb, wb)
        assert gx.dtype == gw.dtype == jnp.bfloat16
        return gx, gw

    want = distill_topk_oracle(
        np.asarray(xb, np.float64), np.asarray(wb, np.float64), ids, tlp, temperature=1.5,
        valid=where,
    )  # fmt: skip
    fused, naive = grads("xla", XLA_SMALL), grads("reference", None)
    for nm, got, base in zip(("dx", "dw"), fused, naive, strict=True):
        assert_within_error_budget(nm, got, base, want[nm])


def test_eager_id_checks_find_any_position():
    """A repeated id at two non-adjacent inner slots of a random inner token, and an
    out-of-range id at a random inner slot of another, are each reported with their
    token; excluded tokens are not checked."""
    rng = np.random.default_rng(43)
    x, w, _, ids, tlp, _, _ = make(44, lead=(9,), k=8)
    tok_dup, tok_bad = (int(t) for t in rng.choice(np.arange(1, 8), size=2, replace=False))
    i, j = 1 + int(rng.integers(0, 2)), 4 + int(rng.integers(0, 3))  # slots 1-2 and 4-6
    dup = ids.copy()
    dup[tok_dup, j] = dup[tok_dup, i]
    with pytest.raises(ValueError, match=rf"distinct per token; token {tok_dup} \(flattened\)"):
        linear_topk_distillation_loss(x, w, dup, tlp)
    bad = ids.copy()
    bad[tok_bad, j] = 97 + int(rng.integers(0, 9))
    msg = rf"`teacher_ids` must lie in \[0, 97\); got {bad[tok_bad, j]} at index \({tok_bad}, {j}\)"
    with pytest.raises(ValueError, match=msg):
        linear_topk_distillation_loss(x, w, bad, tlp)
    where = np.ones(9, bool)
    where[[tok_dup, tok_bad]] = False
    both = np.where(np.arange(9)[:, None] == tok_dup, dup, bad)
    assert np.isfinite(linear_topk_distillation_loss(x, w, both, tlp, where=where))


def test_vmap_over_a_middle_axis_and_constants_in_both_modes():
    """``vmap`` over axis 1 (token-major sequences) under ``jvp`` and ``grad`` equals
    the oracle per sequence; the teacher's log-probabilities and the weights get zero
    gradients and tangents."""
    from oracles import distill_topk_oracle

    nb = 3
    x, w, _, ids, tlp, _, weights = make(45, lead=(11, nb), d=16, v=97, k=5)
    rng = np.random.default_rng(46)
    tx, tw = rng.normal(size=x.shape).astype(np.float32), rng.normal(size=w.shape)
    tw = tw.astype(np.float32)
    seq_w = rng.uniform(0.5, 1.5, nb).astype(np.float32)
    ids_j = jnp.asarray(ids)

    @jax.jit
    def run(x, w, tlp, weights):
        one = lambda x, i, t, w: linear_topk_distillation_loss(
            x, w, i, t, temperature=1.3, config=XLA_SMALL
        )
        batched = lambda x, w: jax.vmap(one, (1, 1, 1, None))(x, ids_j, tlp, w)
        loss, tangent = jax.jvp(batched, (x, w), (tx, tw))
        grads = jax.grad(lambda x, w: jnp.sum(batched(x, w) * seq_w), (0, 1))(x, w)
        const = lambda t, wt: linear_topk_distillation_loss(
            x, w, ids_j, t, weights=wt, temperature=1.3, config=XLA_SMALL
        )
        c_grads = jax.grad(const, (0, 1))(tlp, weights)
        _, c_tan = jax.jvp(const, (tlp, weights), (jnp.ones_like(tlp), jnp.ones_like(weights)))
        return loss, tangent, grads, c_grads, c_tan

    loss, tangent, (gx, gw), c_grads, c_tan = run(x, w, tlp, weights)
    want_dw = 0.0
    for b in range(nb):
        want = distill_topk_oracle(x[:, b], w, ids[:, b], tlp[:, b], temperature=1.3)
        np.testing.assert_allclose(loss[b], want["loss"], rtol=1e-5)
        t_want = np.sum(want["dx"] * tx[:, b]) + np.sum(want["dw"] * tw)
        np.testing.assert_allclose(tangent[b], t_want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gx[:, b], seq_w[b] * want["dx"], rtol=1e-4, atol=1e-6)
        want_dw = want_dw + seq_w[b] * want["dw"]
    np.testing.assert_allclose(gw, want_dw, rtol=1e-4, atol=1e-5 * np.abs(want_dw).max())
    assert all(not np.any(np.asarray(g)) for g in c_grads) and float(c_tan) == 0.0


def test_default_plan_on_the_host_at_llama3_8b():
    """K=64 at Llama-3-8B's head (N=8192, D=4096, V=128256) on the host: the chunked
    xla core, recompute (per-token statistics), 4096-token blocks of 2048 columns."""
    from fusedloss.heads._engine import Hyper, Problem
    from fusedloss.heads._registry import choose_for

    problem = Problem(8192, 4096, 128256, jnp.float32, False, True, Hyper(picked=64))
    choice = choose_for(None, False, None, problem, None)
    assert choice.name == "xla"
    assert (choice.plan.strategy, choice.plan.tn, choice.plan.vc) == ("recompute", 4096, 2048)


def truncated_oracle(x, w, ids, tlp, *, bias, where, weights, temperature, shift):
    """float64: forward KL of both distributions renormalized over the K ids."""
    x, ids, tlp = x[..., :-shift, :], ids[..., shift:, :], tlp[..., shift:, :]
    where, weights = where[..., shift:], weights[..., shift:]
    z = (x @ w + bias.reshape(1, 1, -1)) / temperature
    ls = jax.nn.log_softmax(jnp.take_along_axis(z, ids, axis=-1), axis=-1)
    lt = jax.nn.log_softmax(tlp, axis=-1)
    pt = jnp.exp(lt)
    kl = jnp.sum(jnp.where(pt > 0, pt * (lt - ls), 0.0), -1)
    wts = jnp.where(where, weights, 0.0)
    return jnp.sum(jnp.where(where, kl, 0.0) * wts) / wts.sum()


@pytest.mark.parametrize("impl,cfg", IMPLS)
def test_truncated_mode_matches_float64_oracle(impl, cfg):
    """``mode="truncated"`` renormalizes both distributions over the K ids; one device,
    and (reference) a 2 x 4 mesh equal to it."""
    x, w, bias, ids, tlp, where, weights = make(21, lead=(4, 11))
    kw = dict(where=where, weights=weights, temperature=1.6, shift=1, mode="truncated")

    def fused(x, w, b):
        return linear_topk_distillation_loss(
            x, w, ids, tlp, bias=b, implementation=impl, config=cfg, **kw
        )

    got, grads = jax.jit(jax.value_and_grad(fused, (0, 1, 2)))(x, w, bias)
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)

        def want_fn(x, w, b):
            return truncated_oracle(
                x, w, ids, f64(tlp), bias=b, where=where, weights=f64(weights),
                temperature=1.6, shift=1,
            )  # fmt: skip

        want, want_g = jax.value_and_grad(want_fn, (0, 1, 2))(f64(x), f64(w), f64(bias))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, h in zip(grads, want_g, strict=True):
        h = np.asarray(h)
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5 * np.abs(h).max())
    if impl == "reference":
        mesh = jax.make_mesh((2, 4), ("data", "model"))

        def sharded(x, w, b):
            return fusedloss.sharded_linear_topk_distillation_loss(
                x, w, ids, tlp, bias=b, mesh=mesh, **kw
            )

        np.testing.assert_allclose(float(jax.jit(sharded)(x, w, bias)), float(got), rtol=1e-5)
    with pytest.raises(ValueError, match=r"`mode` must be one of \('k_plus_one', 'truncated'\)"):
        linear_topk_distillation_loss(x, w, ids, tlp, mode="renormalized")
