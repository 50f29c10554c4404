"""``linear_log_probs`` against a float64 oracle written here (plain ``jnp`` under x64,
sharing nothing with the library): values, and gradients for arbitrary per-token
cotangents on both outputs (log-probs and entropy), on every implementation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedloss
from fusedloss import PallasGpuConfig, PallasTpuConfig, XlaConfig, linear_log_probs

XLA = XlaConfig(strategy="recompute", token_chunk=16, vocab_chunk=48)
# (id, implementation, config)
IMPLS = [
    ("reference", "reference", None),
    ("xla", "xla", XLA),
    (
        "pallas_gpu-interpret",
        "pallas_gpu",
        PallasGpuConfig(block_tokens=16, block_vocab=32, block_d=16, vocab_splits=2,
                        chunk_bytes=8192, interpret=True),
    ),
    (
        "pallas_tpu-interpret",
        "pallas_tpu",
        PallasTpuConfig(block_tokens=16, block_vocab=32, interpret=True),
    ),
]  # fmt: skip
PARAMS = [pytest.param(*c, id=c[0]) for c in IMPLS]


def oracle(x, w, labels, *, bias=None, where=None, temperature=1.0, cap=None, shift=0):
    """float64 (log-probs, entropy) from the definition; jnp so it can be differentiated."""
    if shift:
        x, labels = x[..., :-shift, :], labels[..., shift:]
        where = None if where is None else where[..., shift:]
    z = x.astype(jnp.float64) @ w.astype(jnp.float64)
    if bias is not None:
        z = z + bias.astype(jnp.float64).reshape((1,) * (z.ndim - 1) + (-1,))
    if cap is not None:
        z = cap * jnp.tanh(z / cap)
    s = z / temperature
    logq = s - jax.scipy.special.logsumexp(s, axis=-1, keepdims=True)
    logp = jnp.take_along_axis(logq, labels[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logq) * logq, axis=-1)
    keep = jnp.ones(labels.shape, bool) if where is None else where
    return jnp.where(keep, logp, 0.0), jnp.where(keep, ent, 0.0)


def inputs(seed, lead=(3, 13), d=24, v=123):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 2 / np.sqrt(d)).astype(np.float32)
    bias = rng.normal(size=(v,)).astype(np.float32)
    labels = rng.integers(0, v, size=lead).astype(np.int32)
    labels.flat[0], labels.flat[-1] = 0, v - 1  # both ends of the vocabulary
    where = rng.random(lead) > 0.25
    return x, w, bias, labels, where


FEATURES = {
    "plain": {},
    "temperature_softcap_bias": {"temperature": 0.7, "logit_softcap": 3.0, "bias": True},
    "where_shift": {"where": True, "shift": 1, "bias": True},
}


CASES = [
    pytest.param(impl, cfg, feature, entropy, id=f"{case_id}-{feature}-{int(entropy)}")
    for case_id, impl, cfg in IMPLS
    for feature in FEATURES
    for entropy in (False, True)
]


@pytest.mark.parametrize("impl,cfg,feature,entropy", CASES)
def test_values_and_gradients_match_float64_oracle(impl, cfg, feature, entropy):
    f = FEATURES[feature]
    x, w, bias, labels, where = inputs(sum(map(ord, feature)) + entropy)
    kw = dict(shift=f.get("shift", 0), temperature=f.get("temperature", 1.0))
    cap = f.get("logit_softcap")
    b = jnp.asarray(bias) if f.get("bias") else None
    wh = jnp.asarray(where) if f.get("where") else None
    out_shape = labels[..., kw["shift"] :].shape
    rng = np.random.default_rng(5)
    ct_lp = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    ct_ent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    def fused(x, w, b):
        out = linear_log_probs(
            x, w, jnp.asarray(labels), bias=b, where=wh, logit_softcap=cap,
            return_entropy=entropy, implementation=impl, config=cfg, **kw,
        )  # fmt: skip
        lp, ent = out if entropy else (out, jnp.zeros_like(out))
        return jnp.sum(lp * ct_lp) + jnp.sum(ent * ct_ent), (lp, ent)

    argnums = (0, 1, 2) if b is not None else (0, 1)
    (_, (lp, ent)), grads = jax.jit(jax.value_and_grad(fused, argnums, has_aux=True))(
        jnp.asarray(x), jnp.asarray(w), b
    )
    assert lp.dtype == jnp.float32 and lp.shape == out_shape
    with jax.enable_x64(True):

        def want_fn(x, w, b):
            lp, en = oracle(x, w, jnp.asarray(labels), bias=b, where=wh, cap=cap, **kw)
            en = en if entropy else jnp.zeros_like(en)
            c1, c2 = ct_lp.astype(jnp.float64), ct_ent.astype(jnp.float64)
            return jnp.sum(lp * c1) + jnp.sum(en * c2), (lp, en)

        args64 = [jnp.asarray(a, jnp.float64) for a in (x, w, bias)]
        # Jitted: op by op, the float64 oracle's gradient took seconds.
        want_vg = jax.jit(jax.value_and_grad(want_fn, argnums, has_aux=True))
        (_, (want_lp, want_ent)), want_g = want_vg(
            args64[0], args64[1], args64[2] if b is not None else None
        )
    # float32 statistics of O(10) logits: 1e-5 relative, 1e-5 absolute near zero.
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
    for name, g, wg in zip(["dx", "dw", "dbias"], grads, want_g, strict=False):
        # Gradients are sums over V of float32 terms: atol scaled by the largest entry.
        wg = np.asarray(wg)
        np.testing.assert_allclose(
            g, wg, rtol=1e-4, atol=1e-5 * max(np.abs(wg).max(), 1.0), err_msg=name
        )


@pytest.mark.parametrize("case_id,impl,cfg", PARAMS[2:])
def test_kernels_fall_back_for_k_logits_per_token(case_id, impl, cfg):
    """The kernels fold one label logit per token: the top-K head's K ids go to the
    next implementation in the list (and an explicit kernel says why it cannot)."""
    x, w, *_ = inputs(3, lead=(8,))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.argsort(rng.random((8, w.shape[1])), axis=1)[:, :4], jnp.int32)
    tlp = jnp.asarray(np.log(rng.dirichlet(np.ones(5), size=8)[:, :4]), jnp.float32)
    call = functools.partial(fusedloss.linear_topk_distillation_loss, x, w, ids, tlp, config=cfg)
    with pytest.raises(NotImplementedError, match="K logits per token"):
        call(implementation=impl)
    got = call(implementation=(impl, "reference"), config=None)
    np.testing.assert_allclose(got, call(implementation="reference", config=None), rtol=1e-6)


def test_bf16_inputs_give_float32_statistics():
    x, w, _, labels, _ = inputs(4, lead=(64,), d=64, v=300)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    lp, ent = linear_log_probs(xb, wb, labels, return_entropy=True, implementation="xla")
    assert lp.dtype == ent.dtype == jnp.float32
    with jax.enable_x64(True):
        want_lp, want_ent = oracle(
            jnp.asarray(xb, jnp.float64), jnp.asarray(wb, jnp.float64), labels
        )
    # Inputs are exactly bf16 values; only the float32 accumulation differs.
    np.testing.assert_allclose(lp, want_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-4, atol=1e-4)


def test_bad_labels_and_arguments():
    x, w, _, labels, _ = inputs(6, lead=(20,), v=50)
    labels[5] = 50
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 50\); got 50"):
        linear_log_probs(x, w, labels)
    lp = jax.jit(lambda x, w, y: linear_log_probs(x, w, y, implementation="xla"))(x, w, labels)
    assert np.isnan(lp[5]) and np.isfinite(np.delete(np.asarray(lp), 5)).all()
    with pytest.raises(ValueError, match=r"`temperature` must be in \(0.0, inf\)"):
        linear_log_probs(x, w, labels, temperature=0.0)
    with pytest.raises(TypeError, match="`return_entropy` must be a bool"):
        linear_log_probs(x, w, labels, return_entropy=1)


def test_empty_batch_gives_empty_outputs_and_zero_gradients():
    w = jnp.ones((16, 40))
    f = lambda w: jnp.sum(
        sum(linear_log_probs(jnp.zeros((2, 1, 16)), w, jnp.zeros((2, 1), jnp.int32), shift=1,
                             return_entropy=True))
    )  # fmt: skip
    lp, ent = linear_log_probs(
        jnp.zeros((0, 16)), w, jnp.zeros((0,), jnp.int32), return_entropy=True
    )
    assert lp.shape == ent.shape == (0,)
    g = jax.grad(f)(w)
    assert g.shape == w.shape and not np.any(np.asarray(g))


def test_package_exports():
    assert fusedloss.linear_log_probs is linear_log_probs


def test_memory_log_probs_and_entropy_llama3_8b_head():
    """``jax.grad`` of sum(log-probs) + 0.01 * sum(entropy) at Llama-3-8B's head
    (N=8192, D=4096, V=128256, f32): no [N, V] buffer, <= 300 MiB of temporaries."""
    s = jax.ShapeDtypeStruct
    n, d, v = 8192, 4096, 128256

    def f(x, w, y):
        lp, ent = linear_log_probs(x, w, y, return_entropy=True, temperature=0.9)
        return jnp.sum(lp) + 0.01 * jnp.sum(ent)

    args = (s((n, d), jnp.float32), s((d, v), jnp.float32), s((n,), jnp.int32))
    temp = jax.jit(jax.grad(f, (0, 1))).lower(*args).compile().memory_analysis()
    assert temp.temp_size_in_bytes <= 300 * 2**20, temp.temp_size_in_bytes / 2**20
