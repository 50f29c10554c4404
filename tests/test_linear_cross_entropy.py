"""The shared test base: every linear_cross_entropy implementation meets these tests.

The oracle is written here in float64 (NumPy for values, ``jnp`` under x64 for
gradients by autodiff); it shares no code with the library.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lce_impls import IMPL_CASES
from jax.test_util import check_grads

import fusedloss
from fusedloss import XlaConfig, linear_cross_entropy

IMPL_PARAMS = [pytest.param(name, cfg, id=case_id) for case_id, name, cfg in IMPL_CASES]

# Feature combinations (each run on every implementation).
FEATURES = {
    "plain": {},
    "bias_softcap": {"bias": True, "logit_softcap": 3.0},
    "smooth_ignore": {"label_smoothing": 0.1, "ignore_index": -100},
    "zloss_weights_where": {"z_loss": 1e-2, "weights": True, "where": True},
    "all": {
        "bias": True,
        "logit_softcap": 4.0,
        "label_smoothing": 0.2,
        "ignore_index": -100,
        "z_loss": 1e-3,
        "weights": True,
        "where": True,
    },
}


def make_inputs(seed, lead=(3, 13), d=24, v=123, dtype=np.float32, features=None):
    features = features or {}
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, d)).astype(dtype)
    w = (rng.normal(size=(d, v)) / np.sqrt(d) * 2).astype(dtype)
    labels = rng.integers(0, v, size=lead).astype(np.int32)
    kw = {}
    if features.get("bias"):
        kw["bias"] = rng.normal(size=(v,)).astype(dtype)
    if features.get("ignore_index") is not None:
        labels = np.where(rng.random(lead) < 0.2, features["ignore_index"], labels).astype(np.int32)
        kw["ignore_index"] = features["ignore_index"]
    if features.get("where"):
        kw["where"] = rng.random(lead) > 0.25
    if features.get("weights"):
        kw["weights"] = rng.uniform(0.2, 2.0, size=lead).astype(np.float32)
    for k in ("label_smoothing", "z_loss", "logit_softcap"):
        if k in features:
            kw[k] = features[k]
    return x, w, labels, kw


def oracle(
    x,
    w,
    labels,
    *,
    bias=None,
    where=None,
    weights=None,
    ignore_index=None,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    shift=0,
    xp=np,
):
    """Float64 reference written from the definition (NumPy or jnp under x64)."""
    if shift:
        x, labels = x[..., :-shift, :], labels[..., shift:]
        where = None if where is None else where[..., shift:]
        weights = None if weights is None else weights[..., shift:]
    x = x.astype(xp.float64)
    logits = x @ w.astype(xp.float64)
    if bias is not None:
        logits = logits + bias.astype(xp.float64).reshape((1,) * (logits.ndim - 1) + (-1,))
    if logit_softcap is not None:
        logits = logit_softcap * xp.tanh(logits / logit_softcap)
    v = logits.shape[-1]
    m = logits.max(-1, keepdims=True)
    lse = (m + xp.log(xp.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    valid = xp.ones(labels.shape, bool) if where is None else where
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    onehot = labels[..., None] == xp.arange(v, dtype=labels.dtype).reshape(
        (1,) * labels.ndim + (v,)
    )
    target = (1 - label_smoothing) * onehot.astype(logits.dtype) + label_smoothing / v
    loss = lse - (target * logits).sum(-1) + z_loss * lse**2
    wts = xp.ones(labels.shape) if weights is None else weights.astype(xp.float64)
    wts = xp.where(valid, wts, 0.0)
    per_tok = xp.where(valid, loss, 0.0) * wts
    if reduction == "none":
        return per_tok
    if reduction == "sum":
        return per_tok.sum()
    total = wts.sum()
    return xp.where(total == 0, 0.0, per_tok.sum() / xp.where(total == 0, 1.0, total))


def call(impl, cfg, x, w, labels, **kw):
    return linear_cross_entropy(x, w, labels, implementation=impl, config=cfg, **kw)


def oracle_grads(x, w, labels, kw, argnums):
    """Float64 NumPy gradients of ``sum(oracle(...))`` w.r.t. (x, w, bias)[argnums]."""
    kw = {k: (np.asarray(v) if hasattr(v, "shape") else v) for k, v in kw.items()}
    reduction = kw.get("reduction", "mean")
    smooth, zl = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
    cap = kw.get("logit_softcap")
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    w64 = np.asarray(w, np.float64)
    lab = np.asarray(labels).reshape(-1)
    z = x2 @ w64 + (0.0 if kw.get("bias") is None else kw["bias"].astype(np.float64))
    s_ = z if cap is None else cap * np.tanh(z / cap)
    v = w.shape[1]
    p = np.exp(s_ - s_.max(-1, keepdims=True))
    lse = np.log(p.sum(-1)) + s_.max(-1)
    p = p / p.sum(-1, keepdims=True)
    valid = np.ones(lab.shape, bool) if kw.get("where") is None else kw["where"].reshape(-1)
    if kw.get("ignore_index") is not None:
        valid = valid & (lab != kw["ignore_index"])
    wts = np.ones(lab.shape) if kw.get("weights") is None else kw["weights"].reshape(-1)
    wts = np.where(valid, wts, 0.0)
    coef = wts / wts.sum() if reduction == "mean" and wts.sum() > 0 else wts
    onehot = lab[:, None] == np.arange(v)[None, :]
    ds = (1 + 2 * zl * lse)[:, None] * p - (1 - smooth) * onehot - smooth / v
    dz = ds * coef[:, None] * (1.0 if cap is None else 1 - (s_ / cap) ** 2)
    grads = (dz @ w64.T).reshape(x.shape), x2.T @ dz, dz.sum(0)
    return [grads[i] for i in argnums]


# ---- values and gradients vs the float64 oracle ---------------------------------------


def per_token_case(cfg):
    """grad_in_forward computes reduced losses only: per-token cases use its sibling."""
    if isinstance(cfg, XlaConfig) and cfg.strategy == "grad_in_forward":
        return XlaConfig(strategy="recompute", token_chunk=cfg.token_chunk, vocab_chunk=32)
    return cfg


CASES = [(f, "mean") for f in FEATURES] + [("all", "sum"), ("all", "none"), ("plain", "none")]


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
@pytest.mark.parametrize("feature,reduction", CASES)
def test_matches_float64_oracle(impl, cfg, feature, reduction):
    if reduction == "none":
        cfg = per_token_case(cfg)
    seed = sum(map(ord, feature + reduction))
    x, w, labels, kw = make_inputs(seed, features=FEATURES[feature])
    kw["reduction"] = reduction
    jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    b = jkw.pop("bias", None)

    def f(x, w, b):
        extra = {} if b is None else {"bias": b}
        return call(impl, cfg, x, w, jnp.asarray(labels), **jkw, **extra)

    def total(*a):
        out = f(*a)
        return jnp.sum(out), out

    argnums = (0, 1, 2) if b is not None else (0, 1)
    # One compiled program gives the (per-token) losses and the gradients.
    (got, out), grads = jax.jit(jax.value_and_grad(total, argnums, has_aux=True))(
        jnp.asarray(x), jnp.asarray(w), b
    )
    want = oracle(x, w, labels, **kw)
    np.testing.assert_allclose(float(got), np.sum(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    want_g = oracle_grads(x, w, labels, kw, argnums)
    for name, g, wg in zip("x w bias".split(), grads, want_g, strict=False):
        assert g.dtype == jnp.float32, name
        scale = max(np.abs(wg).max(), 1e-6)
        np.testing.assert_allclose(
            np.asarray(g, np.float64), wg, rtol=1e-5, atol=1e-6 * scale, err_msg=f"d{name}"
        )


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_shift_and_leading_shape(impl, cfg):
    x, w, labels, kw = make_inputs(7, lead=(2, 3, 9), v=77, features=FEATURES["smooth_ignore"])
    args = jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    got = jax.jit(lambda x, w, y: call(impl, cfg, x, w, y, shift=1, **kw))(*args)
    want = oracle(x, w, labels, shift=1, **kw)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    cfg = per_token_case(cfg)
    per_tok, aux = jax.jit(
        lambda x, w, y: call(impl, cfg, x, w, y, shift=2, reduction="none", return_aux=True, **kw)
    )(*args)
    assert per_tok.shape == (2, 3, 7) and aux.lse.shape == (2, 3, 7)
    np.testing.assert_allclose(
        per_tok, oracle(x, w, labels, shift=2, reduction="none", **kw), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_check_grads_reverse_float64(impl, cfg):
    x, w, labels, kw = make_inputs(
        3, lead=(11,), d=6, v=37, dtype=np.float64, features=FEATURES["all"]
    )
    with jax.enable_x64(True):
        bias = jnp.asarray(kw.pop("bias"))
        kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        kw["weights"] = kw["weights"].astype(jnp.float64)
        f = functools.partial(call, impl, cfg, labels=jnp.asarray(labels), **kw)
        check_grads(
            jax.jit(lambda x, w, b: f(x, w, bias=b)),
            (jnp.asarray(x), jnp.asarray(w), bias),
            order=1,
            modes=["rev"],
        )


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_aux_outputs(impl, cfg):
    x, w, labels, kw = make_inputs(11, lead=(29,), v=61, features=FEATURES["zloss_weights_where"])
    loss, aux = call(
        impl, cfg, jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels), return_aux=True, **kw
    )
    np.testing.assert_allclose(float(loss), oracle(x, w, labels, **kw), rtol=1e-5)
    logits = x.astype(np.float64) @ w.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(aux.lse, np.where(kw["where"], lse, 0.0), rtol=1e-5)
    np.testing.assert_array_equal(aux.correct, kw["where"] & (logits.argmax(-1) == labels))
    assert int(aux.num_tokens) == int(kw["where"].sum())
    np.testing.assert_allclose(float(aux.weight_sum), kw["weights"][kw["where"]].sum(), rtol=1e-5)
    label_logit = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        aux.label_logit, np.where(kw["where"], label_logit, 0.0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(aux.predicted, np.where(kw["where"], logits.argmax(-1), -1))
    assert aux.predicted.dtype == np.int32
    np.testing.assert_allclose(
        aux.token_weights, np.where(kw["where"], kw["weights"], 0.0), rtol=1e-6
    )
    assert aux.implementation == impl


# ---- masking, NaN, labels --------------------------------------------------------------


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_fully_masked_gives_zero_loss_and_grads(impl, cfg):
    x, w, labels, _ = make_inputs(5, lead=(20,))
    x[3] = np.nan  # excluded rows are not read
    where = np.zeros(20, bool)
    f = lambda x, w: call(impl, cfg, x, w, jnp.asarray(labels), where=jnp.asarray(where))
    loss, (gx, gw) = jax.jit(jax.value_and_grad(f, (0, 1)))(jnp.asarray(x), jnp.asarray(w))
    assert float(loss) == 0.0
    assert not np.any(np.asarray(gx)) and not np.any(np.asarray(gw))


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_nan_propagates_from_included_token(impl, cfg):
    x, w, labels, _ = make_inputs(6, lead=(20,))
    x[4, 2] = np.nan
    loss = jax.jit(functools.partial(call, impl, cfg))(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    )
    assert np.isnan(float(loss))


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_out_of_range_label(impl, cfg):
    x, w, labels, _ = make_inputs(8, lead=(20,), v=50)
    labels[5] = 50
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 50\); got 50 at index \(5,\)"):
        call(impl, cfg, jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels))
    cfg = per_token_case(cfg)
    per_tok = jax.jit(lambda x, w, y: call(impl, cfg, x, w, y, reduction="none"))(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    )
    assert np.isnan(per_tok[5]) and np.isfinite(np.delete(np.asarray(per_tok), 5)).all()
    # An out-of-range label on an excluded token is fine.
    where = np.ones(20, bool)
    where[5] = False
    loss = call(
        impl, cfg, jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels), where=jnp.asarray(where)
    )
    assert np.isfinite(float(loss))


# ---- transformations -------------------------------------------------------------------


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_vmap_over_sequences_with_shared_w(impl, cfg):
    x, w, labels, kw = make_inputs(12, lead=(3, 17), v=90, features=FEATURES["smooth_ignore"])

    # Jitted: op by op, the reference's vmapped gradient took seconds.
    def total(w, x, y):
        per_sequence = jax.vmap(lambda x, y: call(impl, cfg, x, w, y, **kw))(x, y)
        return jnp.sum(per_sequence), per_sequence

    (_, got), gw = jax.jit(jax.value_and_grad(total, has_aux=True))(
        jnp.asarray(w), jnp.asarray(x), jnp.asarray(labels)
    )
    want = [oracle(x[i], w, labels[i], **kw) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    want_gw = sum(oracle_grads(x[i], w, labels[i], kw, (1,))[0] for i in range(3))
    np.testing.assert_allclose(gw, want_gw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_gradient_accumulation_with_global_token_count(impl, cfg):
    x, w, labels, kw = make_inputs(13, lead=(2, 16), v=70, features=FEATURES["smooth_ignore"])
    xs, ys = jnp.asarray(x), jnp.asarray(labels)

    def micro(w, i):
        return call(impl, cfg, xs[i], w, ys[i], reduction="sum", return_aux=True, **kw)

    total_tokens = 0
    acc_loss, acc_grad = 0.0, jnp.zeros_like(jnp.asarray(w))
    micro_step = jax.jit(jax.value_and_grad(micro, has_aux=True))  # one compile, two steps
    for i in range(2):
        (loss, aux), g = micro_step(jnp.asarray(w), i)
        total_tokens += int(aux.num_tokens)
        acc_loss, acc_grad = acc_loss + loss, acc_grad + g
    full_step = jax.jit(jax.value_and_grad(lambda w: call(impl, cfg, xs, w, ys, **kw)))
    full, gfull = full_step(jnp.asarray(w))
    np.testing.assert_allclose(acc_loss / total_tokens, full, rtol=1e-5)
    np.testing.assert_allclose(acc_grad / total_tokens, gfull, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_loss_cotangent_other_than_one(impl, cfg):
    """Gradients of ``c * loss`` are ``c`` times those of the loss (c = -2.5, 0, 1)."""
    x, w, labels, kw = make_inputs(33, lead=(29,), v=71, features=FEATURES["zloss_weights_where"])
    want = oracle_grads(x, w, labels, kw, (0, 1))
    for c in (-2.5, 0.0, 1.0):
        f = lambda x, w, c=c: c * call(impl, cfg, x, w, jnp.asarray(labels), **kw)
        grads = jax.jit(jax.grad(f, (0, 1)))(jnp.asarray(x), jnp.asarray(w))
        for name, g, wg in zip(["dx", "dw"], grads, want, strict=True):
            np.testing.assert_allclose(
                g, c * wg, rtol=1e-5, atol=1e-6 * np.abs(wg).max(), err_msg=f"{name} c={c}"
            )


# ---- tied embeddings (w passed as embedding.T) ------------------------------------------


@pytest.mark.parametrize("impl,cfg", IMPL_PARAMS)
def test_tied_embedding_transpose_matches_oracle(impl, cfg):
    x, w, labels, kw = make_inputs(31, lead=(2, 19), v=101, features=FEATURES["all"])
    emb = np.ascontiguousarray(w.T)  # [V, D], as a model stores it
    bias = kw.pop("bias")
    jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    f = lambda x, e, b: call(
        impl, cfg, x, fusedloss.Transposed(e), jnp.asarray(labels), bias=b, **jkw
    )
    got, (gx, ge, gb) = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(
        jnp.asarray(x), jnp.asarray(emb), jnp.asarray(bias)
    )
    np.testing.assert_allclose(float(got), oracle(x, w, labels, bias=bias, **kw), rtol=1e-5)
    want = oracle_grads(x, w, labels, {**kw, "bias": bias}, (0, 1, 2))
    assert ge.shape == emb.shape
    for name, g, wg in zip(["x", "embedding", "bias"], (gx, ge.T, gb), want, strict=True):
        scale = max(np.abs(wg).max(), 1e-6)
        np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-6 * scale, err_msg=f"d{name}")


@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
def test_transposed_and_plain_transpose_agree(strategy):
    """``Transposed(e)`` and ``e.T`` give the same results; only the copies differ."""
    x, w, labels, kw = make_inputs(32, lead=(37,), v=83, features=FEATURES["smooth_ignore"])
    emb = jnp.asarray(np.ascontiguousarray(w.T))
    cfg = XlaConfig(strategy=strategy, token_chunk=16, vocab_chunk=32)
    want = [oracle(x, w, labels, **kw), *oracle_grads(x, w, labels, kw, (0, 1))]
    for wrap in (fusedloss.Transposed, lambda e: e.T):
        f = lambda x, e, wrap=wrap: call("xla", cfg, x, wrap(e), jnp.asarray(labels), **kw)
        loss, (gx, ge) = jax.jit(jax.value_and_grad(f, (0, 1)))(jnp.asarray(x), emb)
        for name, g, wg in zip(["loss", "dx", "dw"], (loss, gx, ge.T), want, strict=True):
            np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-6 * np.abs(wg).max(), err_msg=name)


# ---- bf16 error budget -----------------------------------------------------------------


@pytest.mark.parametrize("impl,cfg", [p for p in IMPL_PARAMS if p.values[0] != "reference"])
def test_bf16_error_budget(impl, cfg):
    """The fused bf16 result may be no further from float64 than the materialized one."""
    x, w, labels, kw = make_inputs(21, lead=(64,), d=64, v=300, features=FEATURES["all"])
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    bias = kw.pop("bias")
    jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    x64, w64 = np.asarray(xb, np.float64), np.asarray(wb, np.float64)
    want = oracle(x64, w64, labels, bias=bias, **kw)
    want_g = oracle_grads(x64, w64, labels, {**kw, "bias": bias}, (0, 1))

    def run(impl_, cfg_):
        f = lambda x, w: call(impl_, cfg_, x, w, jnp.asarray(labels), bias=jnp.asarray(bias), **jkw)
        loss, (gx, gw) = jax.jit(jax.value_and_grad(f, (0, 1)))(xb, wb)
        assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
        return [np.asarray(a, np.float64) for a in (loss, gx, gw)]

    fused = run(impl, cfg)
    naive = run("reference", None)
    for name, got, base, ref in zip(
        ["loss", "dx", "dw"], fused, naive, [want, *want_g], strict=True
    ):
        err = np.abs(got - ref).max()
        budget = np.abs(base - ref).max()
        # Plus one bf16 unit at the output's scale: the fused kernels round the logit
        # gradient to bf16 before the matmuls (as tensor-core kernels do).
        assert err <= 1.25 * budget + 2**-8 * np.abs(ref).max(), (name, err, budget)


# ---- implementation selection ----------------------------------------------------------


def test_default_implementation_on_cpu_is_xla_and_visible_in_hlo():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU default")
    x, w, labels, _ = make_inputs(1, lead=(8,))
    _, aux = linear_cross_entropy(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels), return_aux=True
    )
    assert aux.implementation == "xla"
    hlo = (
        jax.jit(lambda x, w: linear_cross_entropy(x, w, jnp.asarray(labels)))
        .lower(jnp.asarray(x), jnp.asarray(w))
        .as_text(debug_info=True)
    )
    assert "fusedloss_xla" in hlo and "fusedloss_reference" not in hlo
    hlo = (
        jax.jit(
            lambda x, w: linear_cross_entropy(x, w, jnp.asarray(labels), implementation="reference")
        )
        .lower(jnp.asarray(x), jnp.asarray(w))
        .as_text(debug_info=True)
    )
    assert "fusedloss_reference" in hlo and "fusedloss_xla" not in hlo


def test_sequence_falls_back_when_kernel_unavailable():
    if jax.default_backend() != "cpu":
        pytest.skip("needs a backend without the GPU kernel")
    x, w, labels, _ = make_inputs(2, lead=(8,))
    _, aux = linear_cross_entropy(
        jnp.asarray(x),
        jnp.asarray(w),
        jnp.asarray(labels),
        implementation=("pallas_gpu", "xla"),
        return_aux=True,
    )
    assert aux.implementation == "xla"


def test_auto_strategy_follows_reduction():
    from fusedloss.heads import _engine, _targets, xla

    def strategy(cfg, d, v, dtype, needs_stats):
        problem = _engine.Problem(1024, d, v, dtype, False, needs_stats)
        return xla.plan(cfg, problem, _targets.Target("cpu")).strategy

    # Logits that fit one block are computed at once; larger ones are chunked.
    assert strategy(XlaConfig(), 64, 1000, jnp.float32, False) == "materialized"
    assert strategy(XlaConfig(), 64, 64000, jnp.float32, False) == "grad_in_forward"
    assert strategy(XlaConfig(), 64, 64000, jnp.float32, True) == "recompute"
    # A bf16 head whose float32 dw accumulator exceeds the budget uses recompute.
    small = XlaConfig(accumulator_bytes=2**20)
    assert strategy(small, 4096, 128256, jnp.bfloat16, False) == "recompute"


# ---- memory contract (compile only) -----------------------------------------------------

MiB = 2**20


def temp_bytes(strategy, n, d=4096, v=128256, dtype=jnp.float32, tied=False, plain_t=False):
    s = jax.ShapeDtypeStruct
    cfg = XlaConfig(strategy=strategy)
    if tied:
        wrap = (lambda e: e.T) if plain_t else fusedloss.Transposed
        f = lambda x, e, y: linear_cross_entropy(x, wrap(e), y, implementation="xla", config=cfg)
        args = (s((n, d), dtype), s((v, d), dtype), s((n,), jnp.int32))
    else:
        f = lambda x, w, y: linear_cross_entropy(x, w, y, implementation="xla", config=cfg)
        args = (s((n, d), dtype), s((d, v), dtype), s((n,), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_llama3_8b_head_float32():
    """N=8192, D=4096, V=128256 (the materialized path needs ~8 GiB of temporaries)."""
    rec, gif = temp_bytes("recompute", 8192), temp_bytes("grad_in_forward", 8192)
    assert rec < 300 * MiB, rec / MiB
    assert gif < 1000 * MiB, gif / MiB
    nv_bytes = 8192 * 128256 * 4
    assert max(rec, gif) < nv_bytes / 8


def test_memory_does_not_grow_with_tokens():
    for strategy in ("recompute", "grad_in_forward"):
        small, large = temp_bytes(strategy, 8192), temp_bytes(strategy, 32768)
        # Allowed growth: the [N, D]-sized gradient buffers only.
        assert large - small <= 2 * (32768 - 8192) * 4096 * 4, (strategy, small, large)
        assert large < 300 * MiB if strategy == "recompute" else large < 1000 * MiB


def test_memory_tied_embeddings_cost_no_copy():
    """``Transposed(embedding)`` at Llama-3-8B's head: the temporaries of a [D, V] kernel."""
    for strategy in ("recompute", "grad_in_forward"):
        untied = temp_bytes(strategy, 8192)
        tied = temp_bytes(strategy, 8192, tied=True)
        assert tied <= untied + MiB, (strategy, tied / MiB, untied / MiB)
    # The check can fail: a plain ``embedding.T`` read as a [D, V] kernel is copied.
    d, v = 1024, 32000
    copied = temp_bytes("recompute", 2048, d, v, tied=True, plain_t=True)
    assert copied >= temp_bytes("recompute", 2048, d, v, tied=True) + d * v * 4 * 0.9


@pytest.mark.parametrize("tied", [False, True], ids=["w", "embedding_T"])
@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
def test_bf16_program_has_no_float32_copy_of_w(strategy, tied):
    """The bf16 memory contract, on the lowered (backend-independent) program.

    At Llama-3-8B's head in bf16, no float32 ``[D, V]`` array is made from ``w``;
    ``recompute`` creates no float32 ``w``-sized array at all, ``grad_in_forward``
    exactly one (its ``dw`` accumulator, updated in place). XLA:CPU itself converts
    a bf16 ``w`` for its matmuls, so compiled CPU bytes cannot show this; a GPU can.
    """
    import re

    n, d, v = 8192, 4096, 128256
    s = jax.ShapeDtypeStruct
    cfg = XlaConfig(strategy=strategy)
    w_shape = (v, d) if tied else (d, v)
    f = lambda x, w, y: linear_cross_entropy(
        x, fusedloss.Transposed(w) if tied else w, y, implementation="xla", config=cfg
    )
    text = (
        jax.jit(jax.value_and_grad(f, (0, 1)))
        .lower(s((n, d), jnp.bfloat16), s(w_shape, jnp.bfloat16), s((n,), jnp.int32))
        .as_text()
    )
    big = rf"tensor<(?:{d}x{v}|{v}x{d})xf32>"
    made = [  # ops whose result is a float32 w-sized array
        line.strip()
        for line in text.splitlines()
        if re.search(rf"= stablehlo\.\w+ .*(?:-> {big}|: {big})$", line.strip())
    ]
    assert not [m for m in made if "convert" in m], made
    if strategy == "recompute":
        assert made == []
    else:
        created = [m for m in made if "dynamic_update_slice" not in m]
        assert len(created) == 1 and "broadcast_in_dim" in created[0], created


# ---- bad input -------------------------------------------------------------------------


def test_bad_input_messages():
    x, w, y = jnp.ones((4, 8)), jnp.ones((8, 10)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
        linear_cross_entropy(x.astype(jnp.int32), w, y)
    with pytest.raises(TypeError, match="`labels` must have an integer dtype"):
        linear_cross_entropy(x, w, y.astype(jnp.float32))
    with pytest.raises(
        ValueError, match=r"`w` must have shape \[D, V\] with D = x.shape\[-1\] = 8"
    ):
        linear_cross_entropy(x, jnp.ones((7, 10)), y)
    with pytest.raises(TypeError, match="same dtype"):
        linear_cross_entropy(x, w.astype(jnp.bfloat16), y)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(4,\)"):
        linear_cross_entropy(x, w, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"`bias` must have shape \(10,\)"):
        linear_cross_entropy(x, w, y, bias=jnp.ones(9))
    with pytest.raises(ValueError, match=r"`where` must have shape \(4,\)"):
        linear_cross_entropy(x, w, y, where=jnp.ones((1,), bool))
    with pytest.raises(TypeError, match="`where` must be a boolean array"):
        linear_cross_entropy(x, w, y, where=jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"`weights` must have shape \(4,\)"):
        linear_cross_entropy(x, w, y, weights=jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        linear_cross_entropy(x, w, y, reduction="avg")
    with pytest.raises(ValueError, match=r"`label_smoothing` must be in \[0.0, 1.0\), got 1.0"):
        linear_cross_entropy(x, w, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"`z_loss` must be in \[0.0, inf\)"):
        linear_cross_entropy(x, w, y, z_loss=-1.0)
    with pytest.raises(ValueError, match="`shift`=5 needs `x` of shape"):
        linear_cross_entropy(x[None], w, y[None], shift=5)
    with pytest.raises(ValueError, match="`implementation` must be one of"):
        linear_cross_entropy(x, w, y, implementation="cuda")
    with pytest.raises(TypeError, match="must be a XlaConfig"):
        linear_cross_entropy(x, w, y, implementation="xla", config={"strategy": "recompute"})
    with pytest.raises(ValueError, match=r"XlaConfig\.strategy must be one of"):
        XlaConfig(strategy="fast")
    with pytest.raises(ValueError, match="fuses a reduced cross-entropy"):
        linear_cross_entropy(
            x,
            w,
            y,
            reduction="none",
            implementation="xla",
            config=XlaConfig(strategy="grad_in_forward"),
        )


def test_no_retrace_on_same_shapes():
    import chex

    x, w, labels, _ = make_inputs(4, lead=(12,))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, w, y):
        return linear_cross_entropy(x, w, y)

    for _ in range(3):
        f(jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels))


def test_donated_inputs():
    x, w, labels, _ = make_inputs(9, lead=(12,))
    want = oracle(x, w, labels)
    want_g = oracle_grads(x, w, labels, {}, (0, 1))
    step = jax.jit(jax.value_and_grad(linear_cross_entropy, (0, 1)), donate_argnums=(0, 1))
    loss, grads = step(jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for name, g, wg in zip(["dx", "dw"], grads, want_g, strict=True):
        np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-6 * np.abs(wg).max(), err_msg=name)


def test_package_exports():
    assert fusedloss.linear_cross_entropy is linear_cross_entropy


def _default_temp_bytes(impl, n, d, v, reduction):
    s = jax.ShapeDtypeStruct

    def f(x, w, y):
        return jnp.sum(linear_cross_entropy(x, w, y, implementation=impl, reduction=reduction))

    args = (s((n, d), jnp.float32), s((d, v), jnp.float32), s((n,), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("d,v", [(4096, 128256), (768, 50257)], ids=["llama3_8b", "gpt2"])
@pytest.mark.parametrize(
    "n,reduction",
    [
        *[(n, "mean") for n in (1, 16, 256, 1000, 32768)],
        *[(n, "none") for n in (16, 256, 1000)],
    ],
)
def test_default_plan_no_regret_against_materialized(n, reduction, d, v):
    """At every N the default plan's temporaries are at most the materialized path's
    (plus 2 MiB of per-token and loop bookkeeping): small batches pay nothing extra."""
    fused = _default_temp_bytes("xla", n, d, v, reduction)
    materialized = _default_temp_bytes("reference", n, d, v, reduction)
    assert fused <= materialized + 2 * MiB, (fused / MiB, materialized / MiB)


def test_pallas_tpu_reads_an_unaligned_kernel_through_its_transpose():
    """A [D, V] kernel whose V is no multiple of 128 (a vocabulary shard of 32064
    columns; here V = 203, D = 128) is read by the TPU kernels as its [V, D] transpose:
    the plan says so, and loss and gradients equal the float64 oracle."""
    from fusedloss.heads import pallas_tpu
    from fusedloss.heads._engine import Hyper, Problem
    from fusedloss.heads._targets import Target

    x, w, labels, kw = make_inputs(17, lead=(40,), d=128, v=203, features=FEATURES["all"])
    cfg = fusedloss.PallasTpuConfig(block_tokens=16, block_vocab=128, interpret=True)
    problem = Problem(40, 128, 203, jnp.float32, False, False, Hyper())
    assert pallas_tpu.plan(cfg, problem, Target("tpu")).flip
    assert not pallas_tpu.plan(cfg, problem._replace(v=256), Target("tpu")).flip

    def loss(x, w, b):
        return call("pallas_tpu", cfg, x, w, jnp.asarray(labels), **{**kw, "bias": b})

    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(kw["bias"]))
    value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(*args)
    np.testing.assert_allclose(float(value), oracle(x, w, labels, **kw), rtol=1e-5)
    for g, want in zip(grads, oracle_grads(x, w, labels, kw, (0, 1, 2)), strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
