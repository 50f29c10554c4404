"""``linear_cross_entropy``'s class weights (PyTorch's semantics) and DFT token scaling,
against a float64 oracle written from the definitions (materialized logits)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedloss
from fusedloss import PallasGpuConfig, XlaConfig

N, D, V = 29, 12, 53  # unaligned with every chunk below

IMPLS = {
    "reference": ("reference", None),
    "xla": ("xla", XlaConfig(strategy="recompute", token_chunk=8, vocab_chunk=16)),
    "pallas_gpu": (
        "pallas_gpu",
        PallasGpuConfig(
            block_tokens=16, block_vocab=16, block_d=16, chunk_bytes=2048, interpret=True
        ),
    ),
}


def oracle(
    x, w, bias, labels, *, where, weights, class_weights, a, z, scaling, reduction, tied, cap
):
    """float64, materialized: PyTorch's CrossEntropyLoss(weight, label_smoothing) per
    token, plus z * lse**2 (not class-weighted, mean over tokens), times the detached
    label probability with ``scaling``."""
    w = w.T if tied else w
    logits = x @ w if bias is None else x @ w + bias[None, :]
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    lse = jax.scipy.special.logsumexp(logits, axis=-1)
    logp = logits - lse[:, None]
    c = jnp.ones((V,), x.dtype) if class_weights is None else class_weights
    safe = jnp.where(where, labels, 0)
    logp_y = jnp.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
    c_y = c[safe]
    ce = -c_y * (1 - a) * logp_y - (a / V) * jnp.sum(c[None, :] * logp, axis=-1)
    zl = z * lse**2
    if scaling:
        p_y = jax.lax.stop_gradient(jnp.exp(logp_y))
        ce, zl = ce * p_y, zl * p_y
    t = jnp.where(where, weights, 0.0)
    if reduction == "none":
        return jnp.where(where, t * (ce + zl), 0.0)
    if reduction == "sum":
        return jnp.sum(jnp.where(where, t * (ce + zl), 0.0))
    return jnp.sum(jnp.where(where, t * ce, 0.0)) / jnp.sum(t * c_y) + jnp.sum(
        jnp.where(where, t * zl, 0.0)
    ) / jnp.sum(t)


def make(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, V, N).astype(np.int32)
    where = rng.random(N) < 0.8
    return dict(
        x=rng.normal(size=(N, D)),
        w=rng.normal(size=(D, V)) / 3,
        bias=rng.normal(size=V) / 2,
        labels=labels,
        where=where,
        weights=rng.uniform(0.3, 2.0, N),
        class_weights=rng.uniform(0.1, 3.0, V),
        r=rng.normal(size=N),
    )


CASES = {
    "cw": dict(cw=True, a=0.0, z=0.0, scaling=False, reduction="mean", bias=False, tied=False),
    "cw_smooth_z": dict(cw=True, a=0.2, z=1e-2, scaling=False, reduction="mean", bias=True,
                        tied=False),
    "cw_smooth_tied_sum": dict(cw=True, a=0.1, z=0.0, scaling=False, reduction="sum",
                               bias=False, tied=True),
    "dft": dict(cw=False, a=0.0, z=1e-2, scaling=True, reduction="mean", bias=True, tied=False),
    "dft_cw_smooth_none": dict(cw=True, a=0.1, z=1e-3, scaling=True, reduction="none",
                               bias=True, tied=True),
    "dft_smooth_softcap_sum": dict(cw=False, a=0.1, z=0.0, scaling=True, reduction="sum",
                                   bias=False, tied=False, softcap=2.0),
}  # fmt: skip


def run(impl, case, d, dtype):
    name, cfg = IMPLS[impl]
    spec = CASES[case]
    cast = lambda a: jnp.asarray(a, dtype)
    w = cast(d["w"].T if spec["tied"] else d["w"])

    def loss(x, w, b):
        out = fusedloss.linear_cross_entropy(
            x,
            fusedloss.Transposed(w) if spec["tied"] else w,
            jnp.asarray(d["labels"]),
            bias=b,
            where=jnp.asarray(d["where"]),
            weights=cast(d["weights"]),
            class_weights=cast(d["class_weights"]) if spec["cw"] else None,
            label_smoothing=spec["a"],
            z_loss=spec["z"],
            logit_softcap=spec.get("softcap"),
            token_scaling=spec["scaling"],
            reduction=spec["reduction"],
            implementation=name,
            config=cfg,
        )
        return jnp.sum(out * cast(d["r"])) if spec["reduction"] == "none" else out

    args = (cast(d["x"]), w, cast(d["bias"]) if spec["bias"] else None)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2) if spec["bias"] else (0, 1)))(*args)


def expected(case, d):
    spec = CASES[case]
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)

        def loss(x, w, b):
            out = oracle(
                x, w, b, jnp.asarray(d["labels"]), where=jnp.asarray(d["where"]),
                weights=f64(d["weights"]),
                class_weights=f64(d["class_weights"]) if spec["cw"] else None,
                a=spec["a"], z=spec["z"], scaling=spec["scaling"],
                reduction=spec["reduction"], tied=spec["tied"], cap=spec.get("softcap"),
            )  # fmt: skip
            return jnp.sum(out * f64(d["r"])) if spec["reduction"] == "none" else out

        w = f64(d["w"].T if spec["tied"] else d["w"])
        argnums = (0, 1, 2) if spec["bias"] else (0, 1)
        bias = f64(d["bias"]) if spec["bias"] else None
        value, grads = jax.value_and_grad(loss, argnums)(f64(d["x"]), w, bias)
        return float(value), [np.asarray(g) for g in grads]


TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_matches_float64_oracle(impl, case):
    d = make(hash(case) % 1000)
    value, grads = run(impl, case, d, jnp.float32)
    want, want_grads = expected(case, d)
    np.testing.assert_allclose(float(value), want, rtol=TOL[jnp.float32])
    for g, h in zip(grads, want_grads, strict=True):
        scale = float(np.max(np.abs(h)))
        np.testing.assert_allclose(np.asarray(g), h, rtol=1e-4, atol=1e-5 * scale)


def test_pallas_kernel_and_bf16():
    """The kernel (interpret mode) computes the statistics; bf16 inputs (w's class
    weights read through two bf16 parts) stay within bf16's rounding of the inputs."""
    d = make(7)
    for case in ("cw_smooth_z", "dft_cw_smooth_none"):
        value, grads = run("pallas_gpu", case, d, jnp.float32)
        want, want_grads = expected(case, d)
        np.testing.assert_allclose(float(value), want, rtol=TOL[jnp.float32])
        for g, h in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g), h, rtol=1e-4, atol=1e-5 * np.abs(h).max())
    # bf16: the oracle sees the same rounded inputs.
    rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) if v.dtype.kind == "f"
               else v for k, v in d.items()}  # fmt: skip
    value, grads = run("xla", "cw_smooth_z", d, jnp.bfloat16)
    want, want_grads = expected("cw_smooth_z", rounded)
    np.testing.assert_allclose(float(value), want, rtol=TOL[jnp.bfloat16])
    for g, h in zip(grads, want_grads, strict=True):
        g = np.asarray(jnp.asarray(g, jnp.float32))
        np.testing.assert_allclose(g, h, rtol=0, atol=2e-2 * np.abs(h).max())


def test_aux_and_weight_sum_with_class_weights():
    d = make(3)
    kw = dict(where=jnp.asarray(d["where"]), weights=jnp.asarray(d["weights"], jnp.float32))
    x, w = jnp.asarray(d["x"], jnp.float32), jnp.asarray(d["w"], jnp.float32)
    labels = jnp.asarray(d["labels"])
    cw = jnp.asarray(d["class_weights"], jnp.float32)
    _, aux = fusedloss.linear_cross_entropy(
        x, w, labels, class_weights=cw, token_scaling=True, return_aux=True, **kw
    )
    _, plain = fusedloss.linear_cross_entropy(x, w, labels, return_aux=True, **kw)
    for name in ("lse", "label_logit", "token_weights", "weight_sum"):
        np.testing.assert_allclose(getattr(aux, name), getattr(plain, name), rtol=1e-6)
    np.testing.assert_array_equal(aux.predicted, plain.predicted)
    assert int(aux.num_tokens) == int(d["where"].sum())


def test_bad_arguments():
    d = make(0)
    x, w = jnp.asarray(d["x"], jnp.float32), jnp.asarray(d["w"], jnp.float32)
    labels = jnp.asarray(d["labels"])
    f = functools.partial(fusedloss.linear_cross_entropy, x, w, labels)
    with pytest.raises(ValueError, match=r"`class_weights` must have shape \(53,\).*got \(52,\)"):
        f(class_weights=jnp.ones(V - 1))
    with pytest.raises(TypeError, match=r"`class_weights` must have a floating dtype, got int32"):
        f(class_weights=jnp.ones(V, jnp.int32))
    with pytest.raises(TypeError, match=r"`token_scaling` must be a bool, got 1"):
        f(token_scaling=1)
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 and logit_softcap=3.0"):
        f(class_weights=jnp.ones(V), label_smoothing=0.1, logit_softcap=3.0)
