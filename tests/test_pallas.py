"""Kernel-specific tests of the Pallas implementations (``pallas_gpu``, ``pallas_tpu``).

On CPU the kernels run in Pallas interpret mode, and the tests first prove that the
flag really reaches every ``pallas_call`` (so nothing silently runs another path).
The shared feature matrix lives in ``test_linear_cross_entropy.py`` (via
``_lce_impls.IMPL_CASES``); here: the statistics core's custom-VJP contract against
autodiff of the materialized reference (vocabulary offset, labels outside the
shard), unaligned shapes with tiny tiles so that every kind of partial tile occurs,
NaN in excluded rows, many tiles on every grid axis of each TPU kernel, Llama-3's
vocabulary (128256 columns, the GPU backward's last chunk clamped) at a small hidden
size, low-precision gradients within their rounding budget, the TPU-faithful
interpreter (padding reads as NaN), that the
kernels lower for their real targets (Triton / Mosaic) without the hardware, and,
on a GPU/TPU only, the compiled kernels at a real shape.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu
from jax.extend import core as jex_core

import fusedloss
from fusedloss.heads import _engine, _registry, pallas_gpu, pallas_tpu, reference
from fusedloss.heads._targets import Target
from fusedloss.heads.pallas_gpu import (
    PallasGpuConfig,
    _default_tiles,
    pallas_gpu_stats,
)
from fusedloss.heads.pallas_tpu import PallasTpuConfig, pallas_tpu_stats

# Tiles far smaller than the shapes: several tiles per axis, a partial last tile on
# every axis (37 = 2*16 + 5 rows, 24 = 16 + 8 hidden, 123 = 3*32 + 27 columns), two
# vocabulary splits and backward chunks of 64 columns for 37 float32 tokens (the last
# chunk is shifted back to overlap its predecessor).
GPU = PallasGpuConfig(
    block_tokens=16,
    block_vocab=32,
    block_d=16,
    vocab_splits=2,
    chunk_bytes=64 * 37 * 4,
    interpret=True,
)
TPU = PallasTpuConfig(block_tokens=16, block_vocab=32, interpret=True)
BACKENDS = {"pallas_gpu": (GPU, pallas_gpu_stats), "pallas_tpu": (TPU, pallas_tpu_stats)}
STATS_CASES = {
    "gpu-dlogits": (GPU, pallas_gpu_stats),
    "tpu": (TPU, pallas_tpu_stats),
}
PLANS = {PallasGpuConfig: pallas_gpu.plan, PallasTpuConfig: pallas_tpu.plan}


def _plan(config, n, d, v, dtype, target=None):
    problem = _engine.Problem(n, d, v, dtype, False, True)
    return PLANS[type(config)](config, problem, target or Target("cpu"))


def _assert_close(got, want, name, rtol=2e-5, scaled_atol=4e-6):
    """float32 comparison; the absolute tolerance scales with the largest entry, since
    entries much smaller than it are sums of cancelling terms of its size."""
    want = np.asarray(want, np.float32)
    atol = scaled_atol * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(
        np.asarray(got, np.float32), want, rtol=rtol, atol=atol, err_msg=name
    )


def _inputs(n, d, v, dtype=jnp.float32, seed=0):
    # numpy's generator: jax.random would compile a handful of kernels first.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), np.float32)
    w = rng.standard_normal((d, v), np.float32) * np.float32(3 / np.sqrt(d))
    bias = rng.standard_normal((v,), np.float32)
    labels = rng.integers(0, v, (n,), np.int32)
    where = rng.random(n) < 0.8
    return (
        jnp.asarray(x, dtype),
        jnp.asarray(w, dtype),
        jnp.asarray(bias),
        jnp.asarray(labels),
        jnp.asarray(where),
    )


def _pallas_calls(closed_jaxpr) -> list:
    """Every pallas_call equation in a jaxpr, nested jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jex_core.Jaxpr):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


# --------------------------------------------------------------------------------------
# interpret mode really is what runs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "impl, config, kernels",
    [
        ("pallas_gpu", GPU, ["fwd", "bwd_dlogits"]),
        ("pallas_tpu", TPU, ["fwd", "bwd_dx", "bwd_dw"]),
        (
            "pallas_tpu",
            PallasTpuConfig(interpret=pltpu.InterpretParams()),
            ["fwd", "bwd_dx", "bwd_dw"],
        ),
    ],
    ids=["gpu-dlogits", "tpu", "tpu-InterpretParams"],
)
def test_interpret_flag_reaches_every_pallas_call(impl, config, kernels):
    x, w, bias, labels, _ = _inputs(37, 24, 123)

    def loss(x, w, bias):
        return fusedloss.linear_cross_entropy(
            x, w, labels, bias=bias, implementation=impl, config=config
        )

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2)))(x, w, bias)
    calls = _pallas_calls(jaxpr)
    names = sorted(eqn.params["name"] for eqn in calls)
    assert names == sorted(f"fusedloss_lce_{k}" for k in kernels)
    for eqn in calls:
        assert eqn.params["interpret"] == config.interpret


@pytest.mark.parametrize(
    "impl, config",
    [("pallas_gpu", GPU), ("pallas_tpu", TPU)],
    ids=["gpu-dlogits", "tpu"],
)
def test_tied_embedding_reaches_every_kernel_as_stored(impl, config):
    """``w = Transposed(embedding)``: each kernel reads the [V, D] embedding itself (a
    [D, V] operand there would be a transposed copy made by XLA before the call)."""
    x, w, bias, labels, _ = _inputs(37, 24, 123)
    emb = jnp.asarray(np.asarray(w).T)

    def loss(x, e, bias):
        return fusedloss.linear_cross_entropy(
            x, fusedloss.Transposed(e), labels, bias=bias, implementation=impl, config=config
        )

    calls = _pallas_calls(jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2)))(x, emb, bias))
    assert calls
    for eqn in calls:
        shapes = [v.aval.shape for v in eqn.invars]
        assert (123, 24) in shapes and (24, 123) not in shapes, (eqn.params["name"], shapes)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_without_interpret_off_backend_raises_or_falls_back(impl):
    x, w, _, labels, _ = _inputs(8, 16, 40)
    config = dataclasses.replace(BACKENDS[impl][0], interpret=False)
    backend = "GPU" if impl == "pallas_gpu" else "TPU"
    if jax.default_backend() == backend.lower():
        pytest.skip(f"this machine has a {backend}")
    run = functools.partial(fusedloss.linear_cross_entropy, config=config, return_aux=True)
    # Eager: the arrays' device is the target.
    with pytest.raises(NotImplementedError, match=f"{impl} compiles for {backend}s, not for 'cpu'"):
        run(x, w, labels, implementation=impl)
    loss, aux = run(x, w, labels, implementation=(impl, "reference"))
    assert aux.implementation == "reference"
    want = fusedloss.linear_cross_entropy(x, w, labels, implementation="reference")
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    # Under jit the platform is decided at compile time: the CPU branch falls back.
    jitted = jax.jit(run, static_argnames="implementation")
    loss, aux = jitted(x, w, labels, implementation=(impl, "reference"))
    assert aux.implementation == "reference" or "cpu=reference" in aux.implementation
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match=r"block_vocab must be a power of 2 >= 16.*got 100"):
        PallasGpuConfig(block_vocab=100)
    with pytest.raises(ValueError, match="num_warps must be a positive int"):
        PallasGpuConfig(num_warps=0)
    with pytest.raises(TypeError, match=r"interpret must be a bool or a pltpu\.InterpretParams"):
        PallasTpuConfig(interpret="yes")
    with pytest.raises(ValueError, match="block_vocab must be a multiple of 128"):
        _plan(PallasTpuConfig(block_vocab=96), 64, 32, 1000, jnp.float32, Target("tpu"))
    x, w, _, labels, _ = _inputs(8, 16, 40)
    with pytest.raises(TypeError, match=r"must be a PallasGpuConfig for .*, got PallasTpuConfig"):
        fusedloss.linear_cross_entropy(x, w, labels, implementation="pallas_gpu", config=TPU)


@pytest.mark.parametrize(
    "kind, vmem",
    [("TPU v4", 16), ("TPU v5 lite", 128), ("TPU v5", 64), ("TPU v6 lite", 128), (None, 16)],
)
def test_tpu_tiles_fit_the_chips_vmem(kind, vmem):
    # Llama-3-8B's head in bf16. The estimate may use 3/4 of the chip's VMEM (48 MiB
    # at most); a chip tracing cannot see gets v4's 16 MiB, the smallest. That these
    # tiles compile on each chip is proven by tests/targets (compile-only TPUs).
    plan = _plan(PallasTpuConfig(), 8192, 4096, 128256, jnp.bfloat16, Target("tpu", kind))
    est = pallas_tpu._vmem_estimate(plan.bt, plan.bv, 4096, 2)
    assert est <= min(48, vmem * 3 // 4) * 2**20
    assert est <= plan.vmem_limit_bytes <= vmem * 2**20
    # The largest tiles that fit: doubling either would not.
    assert pallas_tpu._vmem_estimate(plan.bt, 2 * plan.bv, 4096, 2) > min(48, vmem * 3 // 4) * 2**20
    if vmem >= 64:
        assert (plan.bt, plan.bv) == (256, 512)


@pytest.mark.parametrize("platform, kernel", [("gpu", "pallas_gpu"), ("tpu", "pallas_tpu")])
@pytest.mark.parametrize("kind", [None, "chip"])
def test_default_computes_small_logits_at_once(platform, kernel, kind):
    """``implementation=None`` on a GPU/TPU: a problem whose float32 logits fit one
    ``xla`` block (128 MiB) is computed at once (a kernel's fixed buffers would exceed
    them: tests/targets measures both); a larger one gets the kernel. A kernel config
    keeps the kernel."""
    target = Target(platform, kind and f"{platform} chip")
    bf16 = jnp.bfloat16

    def chosen(n, config=None):
        problem = _engine.Problem(n, 4096, 128256, bf16, False, False)
        return _registry.choose_for(None, False, config, problem, target).name

    # 4 * 261 * 128256 bytes = 127.7 MiB fits the block; 262 tokens do not.
    assert chosen(1) == chosen(261) == "xla"
    assert chosen(262) == chosen(8192) == kernel
    kernel_config = PallasGpuConfig() if kernel == "pallas_gpu" else PallasTpuConfig()
    assert chosen(1, kernel_config) == kernel


# --------------------------------------------------------------------------------------
# the statistics core: custom VJP vs autodiff of the materialized reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("w_vd", [False, True], ids=["w_dv", "w_vd"])
@pytest.mark.parametrize("case", list(STATS_CASES))
def test_stats_core_matches_reference_autodiff(case, w_vd):
    # A vocabulary shard: w holds ids [500, 500 + 2049); about half of the labels lie
    # outside it (label logit 0 there), and the shard boundary falls mid-tile.
    n, d, v, offset = 37, 24, 2049, 500
    config, stats_fn = STATS_CASES[case]
    x, w, bias, _, valid = _inputs(n, d, v, seed=1)
    # An excluded row of NaN: its statistics are NaN, but no gradient may see it.
    x, valid = x.at[5].set(jnp.nan), valid.at[5].set(False)
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 2 * v, (n,), np.int32))
    hp = _engine.Hyper(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    plan = _plan(config, n, d, v, x.dtype)
    cts = jnp.asarray(np.random.default_rng(3).standard_normal((3, n), np.float32))

    def fused(x, w, bias):
        if w_vd:  # the kernels read the [V, D] array (tied embeddings) and return its grad
            stats = stats_fn(
                x, w.T, bias, labels, valid, jnp.int32(offset), hp, plan._replace(w_vd=True)
            )
        else:
            stats = stats_fn(x, w, bias, labels, valid, jnp.int32(offset), hp, plan)
        total = stats.lse @ cts[0] + stats.label_logit @ cts[1] + stats.sum_logits @ cts[2]
        return total, stats

    def oracle(x, w, bias):
        # Excluded rows get no gradient: zeroed inputs and cotangents there.
        x = jnp.where(valid[:, None], x, 0.0)
        stats = reference.reference_stats_core(
            x, w, bias, labels, jnp.ones_like(valid), offset, hp, reference.ReferencePlan(False)
        )
        c = jnp.where(valid, cts, 0.0)
        return stats.lse @ c[0] + stats.label_logit @ c[1] + stats.sum_logits @ c[2], stats

    run = lambda f: jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(x, w, bias)
    (_, got_stats), got = run(fused)
    (_, want_stats), want = run(oracle)
    keep = np.asarray(valid)
    for name in ("lse", "label_logit", "sum_logits", "max_logit", "argmax"):
        got_v, want_v = getattr(got_stats, name), getattr(want_stats, name)
        _assert_close(np.asarray(got_v)[keep], np.asarray(want_v)[keep], name)
    assert bool(jnp.isnan(got_stats.lse[5]))
    outside = (labels < offset) | (labels >= offset + v)
    assert bool(jnp.all(jnp.where(outside, got_stats.label_logit == 0, True)))
    assert 0 < int(jnp.sum(outside)) < n
    for name, g, r in zip(("dx", "dw", "dbias"), got, want, strict=True):
        _assert_close(g, r, name)


# --------------------------------------------------------------------------------------
# through the public API: features, masks and reductions
# --------------------------------------------------------------------------------------

# Everything the public API adds on top of the statistics core, at once.
ALL_FEATURES = dict(
    use_bias=True,
    logit_softcap=3.0,
    label_smoothing=0.2,
    z_loss=1e-3,
    ignore_index=-100,
    reduction="none",
)


def _api_value_and_grad(impl, config, x, w, bias, labels, where, feats):
    feats = dict(feats)
    use_bias = feats.pop("use_bias")
    reduction = feats["reduction"]
    weights = jnp.linspace(0.5, 1.5, labels.shape[0], dtype=jnp.float32)
    ct = jnp.asarray(np.random.default_rng(7).standard_normal(labels.shape, np.float32))

    def loss(x, w, bias):
        out, aux = fusedloss.linear_cross_entropy(
            x,
            w,
            labels,
            bias=bias if use_bias else None,
            where=where,
            weights=weights if reduction == "none" else None,
            implementation=impl,
            config=config,
            return_aux=True,
            **feats,
        )
        scalar = out.astype(jnp.float32) @ ct if reduction == "none" else out
        return scalar, (out, aux)

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(x, w, bias)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_public_api_matches_reference(impl):
    x, w, bias, labels, where = _inputs(37, 24, 123, seed=4)
    feats = ALL_FEATURES
    labels = labels.at[::5].set(feats["ignore_index"])
    # An excluded row full of NaN must not reach the loss or any gradient.
    x = x.at[3].set(jnp.nan)
    where = where.at[3].set(False)
    config = BACKENDS[impl][0]
    (_, (out, aux)), grads = _api_value_and_grad(impl, config, x, w, bias, labels, where, feats)
    (_, (ref, ref_aux)), ref_grads = _api_value_and_grad(
        "reference", None, x, w, bias, labels, where, feats
    )
    assert aux.implementation == impl
    _assert_close(out, ref, "loss")
    included = np.asarray(ref_aux.num_tokens)
    assert 0 < included < labels.shape[0]
    np.testing.assert_array_equal(aux.correct, ref_aux.correct)
    keep = np.asarray(where & (labels != feats["ignore_index"]))
    _assert_close(np.asarray(aux.lse)[keep], np.asarray(ref_aux.lse)[keep], "lse")
    for name, g, r in zip(("dx", "dw", "dbias"), grads, ref_grads, strict=True):
        assert bool(jnp.all(jnp.isfinite(g))), name
        _assert_close(g, r, name)


# Unit roundoff u of each input dtype: rounding a value to the dtype moves it by at
# most u times its magnitude.
UNIT_ROUNDOFF = {
    # bfloat16 keeps 8 significant bits (7 stored): u = 2^-8 ~ 3.9e-3.
    jnp.dtype(jnp.bfloat16): 2.0**-8,
    # float16 keeps 11 significant bits (10 stored): u = 2^-11 ~ 4.9e-4.
    jnp.dtype(jnp.float16): 2.0**-11,
    # float32 keeps 24 significant bits: u = 2^-24 ~ 6e-8 (its accumulation, the 1e-5
    # below, dominates).
    jnp.dtype(jnp.float32): 2.0**-24,
}


def _check_low_precision(impl, dtype, seed, shape=(37, 24, 123), config=None):
    """Loss and gradients against a float64 oracle on the same (rounded) inputs, within
    the error of the kernels' two roundings to ``dtype`` (the README's budget)."""
    cap = 5.0
    x, w, bias, labels, where = _inputs(*shape, dtype=dtype, seed=seed)
    feats = dict(use_bias=True, logit_softcap=cap, reduction="sum")
    config = BACKENDS[impl][0] if config is None else config
    (loss, _), grads = _api_value_and_grad(impl, config, x, w, bias, labels, where, feats)
    xs, ws = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, w))
    keep, rows, lab = np.asarray(where), np.arange(x.shape[0]), np.asarray(labels)
    t = np.tanh((xs @ ws + np.asarray(bias, np.float64)) / cap)
    s = cap * t
    m = s.max(1)
    lse = m + np.log(np.exp(s - m[:, None]).sum(1))
    dl = np.exp(s - lse[:, None])
    dl[rows, lab] -= 1.0
    dl *= (1.0 - t * t) * keep[:, None]  # d loss / d (x @ w + bias), float64
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, np.sum(np.where(keep, lse - s[rows, lab], 0.0)), rtol=1e-5)
    u = UNIT_ROUNDOFF[jnp.dtype(dtype)]
    # The kernels round the float32 logits gradient to the input dtype before their
    # matmuls (each product term moves by at most u |dl| |w|: u * (|dl| @ |w|.T) in
    # all for dx) and round the float32 result once more (u |dx|); float32 logits and
    # accumulation add under 1e-5 of the same sums. dbias (float32) has only those.
    sums = {
        "dx": (dl @ ws.T, np.abs(dl) @ np.abs(ws).T),
        "dw": (xs.T @ dl, np.abs(xs).T @ np.abs(dl)),
    }
    for name, g in zip(("dx", "dw"), grads[:2], strict=True):
        assert g.dtype == dtype, name
        want, size = sums[name]
        err = np.abs(np.asarray(g.astype(jnp.float32), np.float64) - want)
        bound = u * np.abs(want) + (u + 1e-5) * size
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert np.all(err <= bound), (name, worst, err[worst], bound[worst])
    assert grads[2].dtype == jnp.float32
    err = np.abs(np.asarray(grads[2], np.float64) - dl.sum(0))
    assert np.all(err <= 1e-5 * np.abs(dl).sum(0) + 1e-30), ("dbias", err.max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_low_precision_inputs_accumulate_in_f32(impl, dtype):
    _check_low_precision(impl, dtype, seed=5)


# Many tiles on every grid axis of each TPU kernel: 197 rows = 12 token tiles of 16 and
# a partial one, 647 columns = 20 vocabulary tiles of 32 and a partial one. The forward
# (loss) and dx kernels walk 13 x 21 tiles, the dw kernel (dw, dbias) 21 x 13; in bf16
# the gradients are held to the rounding budget.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tpu_kernels_with_many_tiles_match_float64_oracle(dtype):
    config = PallasTpuConfig(block_tokens=16, block_vocab=32, interpret=True)
    plan = _plan(config, 197, 8, 647, dtype)
    assert (-(-197 // plan.bt), -(-647 // plan.bv)) == (13, 21)
    _check_low_precision("pallas_tpu", dtype, seed=10, shape=(197, 8, 647), config=config)


# Llama-3's vocabulary, scaled down in D and N so that it runs in seconds: 128256 =
# 41 backward chunks of 3072 columns and 2304 more, so the GPU kernel's last chunk is
# clamped back to end at V (its first 768 columns were its predecessor's); the TPU
# kernels' 512-column tiles leave a partial last tile (250.5 tiles).
LLAMA3_V = 128256
LLAMA3_CASES = {
    "pallas_gpu": PallasGpuConfig(
        block_tokens=16, block_vocab=128, block_d=16, chunk_bytes=3072 * 16 * 4, interpret=True
    ),
    "pallas_tpu": PallasTpuConfig(block_tokens=16, block_vocab=512, interpret=True),
}


@pytest.mark.parametrize("impl", list(LLAMA3_CASES))
def test_llama3_vocabulary_clamped_last_chunk_matches_float64_oracle(impl):
    config = LLAMA3_CASES[impl]
    plan = _plan(config, 16, 16, LLAMA3_V, jnp.bfloat16)
    if impl == "pallas_gpu":
        assert plan.chunk == 3072 and LLAMA3_V % plan.chunk == 2304
    else:
        assert plan.bv == 512 and LLAMA3_V % plan.bv == 256
    _check_low_precision(impl, jnp.bfloat16, seed=11, shape=(16, 16, LLAMA3_V), config=config)


def test_tpu_interpreter_reads_padding_as_nan():
    # The TPU-faithful interpreter fills what an edge block reads past the array end
    # with NaN: any unmasked use of it would show up in the loss or the gradients.
    x, w, bias, labels, where = _inputs(37, 24, 300, seed=6)
    config = PallasTpuConfig(
        block_tokens=16,
        block_vocab=128,
        interpret=pltpu.InterpretParams(out_of_bounds_reads="uninitialized"),
    )
    feats = dict(use_bias=True, label_smoothing=0.1, reduction="mean")
    (loss, _), grads = _api_value_and_grad("pallas_tpu", config, x, w, bias, labels, where, feats)
    (ref, _), ref_grads = _api_value_and_grad("reference", None, x, w, bias, labels, where, feats)
    _assert_close(loss, ref, "loss")
    for name, g, r in zip(("dx", "dw", "dbias"), grads, ref_grads, strict=True):
        _assert_close(g, r, name)


# --------------------------------------------------------------------------------------
# tile, split, group and chunk layouts of a real head, in miniature
# --------------------------------------------------------------------------------------


def _mean_ce_f64(x, w, bias, labels):
    """float64 mean cross-entropy of ``x @ w + bias`` and its (dx, dw, dbias)."""
    xs, ws = np.asarray(x, np.float64), np.asarray(w, np.float64)
    z = xs @ ws + np.asarray(bias, np.float64)
    m = z.max(1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(1))
    rows, lab = np.arange(z.shape[0]), np.asarray(labels)
    dz = np.exp(z - lse[:, None])
    dz[rows, lab] -= 1.0
    dz /= z.shape[0]
    return np.mean(lse - z[rows, lab]), dz @ ws.T, xs.T @ dz, dz.sum(0)


# Small tiles (D = 16, V of a few hundred) in the layouts of Llama-3's head, whose
# 128256 columns are a multiple of the 128-column tile but not of the backward chunk
# (3072 columns at N = 8192 in bf16) nor of the TPU's 512-column tile.
LAYOUTS = {
    # 80 rows = 5 token tiles of 16, more than the backward's group of 2 (groups of
    # 2, 2, 1); 160 columns = 10 vocabulary tiles of 16 over 3 forward splits of 4
    # tiles (the last split's 2 tiles past V are masked); backward chunks of 48
    # columns (3 tiles): 0, 48, 96, then the last clamped back to 112 (its first 32
    # columns were its predecessor's).
    "gpu-chunks-clamped": (
        80,
        160,
        PallasGpuConfig(
            block_tokens=16,
            block_vocab=16,
            block_d=16,
            vocab_splits=3,
            group_tokens=2,
            chunk_bytes=48 * 80 * 4,
            interpret=True,
        ),
    ),
    # 5 token tiles of 8; 160 columns = exactly 5 vocabulary tiles of 32.
    "tpu-tile-multiple": (40, 160, PallasTpuConfig(block_tokens=8, block_vocab=32, interpret=True)),
    # 176 columns = 5.5 tiles of 32 (as 128256 = 250.5 tiles of 512): a partial last
    # tile, read past the end as NaN by the TPU-faithful interpreter.
    "tpu-partial-last-tile": (
        40,
        176,
        PallasTpuConfig(
            block_tokens=8,
            block_vocab=32,
            interpret=pltpu.InterpretParams(out_of_bounds_reads="uninitialized"),
        ),
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_head_layouts_match_float64_oracle(layout):
    n, v, config = LAYOUTS[layout]
    impl = "pallas_gpu" if isinstance(config, PallasGpuConfig) else "pallas_tpu"
    x, w, bias, labels, _ = _inputs(n, 16, v, seed=9)
    labels = labels.at[:2].set(jnp.asarray([0, v - 1], jnp.int32))  # the first and last column

    def loss(x, w, bias):
        return fusedloss.linear_cross_entropy(
            x, w, labels, bias=bias, implementation=impl, config=config
        )

    got = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(x, w, bias)
    want = _mean_ce_f64(x, w, bias, labels)
    for name, g, r in zip(("loss", "dx", "dw", "dbias"), jax.tree.leaves(got), want, strict=True):
        _assert_close(g, r, name)


# --------------------------------------------------------------------------------------
# the kernels lower for their real targets (no GPU/TPU needed)
# --------------------------------------------------------------------------------------


def _export_for(monkeypatch, platform, impl, config, dtype, n=300, d=256, v=1000, tied=False):
    """Lowers value_and_grad for ``platform`` (Triton / Mosaic lowering runs here);
    with ``tied``, ``w`` is passed as ``embedding.T``."""

    # An explicit kernel whose target tracing cannot see is planned for its own platform.
    def loss(x, w, bias, labels):
        return fusedloss.linear_cross_entropy(
            x,
            fusedloss.Transposed(w) if tied else w,
            labels,
            bias=bias,
            implementation=impl,
            config=config,
            label_smoothing=0.1,
            logit_softcap=30.0,
            z_loss=1e-4,
        )

    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((v, d) if tied else (d, v), dtype),
        jax.ShapeDtypeStruct((v,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    checks = [
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
        export.DisabledSafetyCheck.custom_call("tpu_custom_call"),
    ]
    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    return export.export(fn, platforms=[platform], disabled_checks=checks)(*args).mlir_module()


@pytest.mark.parametrize("tied", [False, True], ids=["w", "embedding_T"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_gpu_kernels_lower_to_triton_with_h100_tiles(monkeypatch, dtype, tied):
    bt, bv, bd, warps, stages = _default_tiles("NVIDIA H100 80GB HBM3", jnp.dtype(dtype).itemsize)
    config = PallasGpuConfig(
        block_tokens=bt,
        block_vocab=bv,
        block_d=bd,
        num_warps=warps,
        num_stages=stages,
    )
    text = _export_for(monkeypatch, "cuda", "pallas_gpu", config, dtype, tied=tied)
    for k in ("fwd", "bwd_dlogits"):
        launch = (
            f'name = "fusedloss_lce_{k}", num_stages = {stages} : i32, num_warps = {warps} : i32'
        )
        assert launch in text


@pytest.mark.parametrize("tied", [False, True], ids=["w", "embedding_T"])
def test_tpu_kernels_lower_to_mosaic(monkeypatch, tied):
    config = PallasTpuConfig()
    text = _export_for(monkeypatch, "tpu", "pallas_tpu", config, jnp.bfloat16, tied=tied)
    assert text.count("tpu_custom_call") >= 3


# --------------------------------------------------------------------------------------
# compiled kernels on real hardware
# --------------------------------------------------------------------------------------


def _error_budget_check(impl, n, d, v, dtype, softcap=None):
    """The fused result is no further from a float32-HIGHEST oracle than the plain
    materialized computation in ``dtype`` is (Apple CCE's error-budget criterion)."""
    x, w, _, labels, _ = _inputs(n, d, v, dtype=dtype, seed=8)
    kw = dict(logit_softcap=softcap)

    def loss(impl, x, w):
        return fusedloss.linear_cross_entropy(x, w, labels, implementation=impl, **kw)

    fused = jax.jit(jax.value_and_grad(functools.partial(loss, impl), (0, 1)))(x, w)
    naive = jax.jit(jax.value_and_grad(functools.partial(loss, "reference"), (0, 1)))(x, w)
    with jax.default_matmul_precision("highest"):
        x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
        oracle = jax.jit(jax.value_and_grad(functools.partial(loss, "reference"), (0, 1)))(x32, w32)

    def err(a):
        return [
            float(jnp.max(jnp.abs(p.astype(jnp.float32) - q)))
            for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(oracle), strict=True)
        ]

    for e_fused, e_naive in zip(err(fused), err(naive), strict=True):
        assert e_fused <= 2 * e_naive + 1e-6, (err(fused), err(naive))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_gpu_compiled_matches_reference_within_error_budget(dtype):
    _error_budget_check("pallas_gpu", 1024, 2048, 32003, dtype, softcap=30.0)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_tpu_compiled_matches_reference_within_error_budget(dtype):
    _error_budget_check("pallas_tpu", 1024, 2048, 32003, dtype, softcap=30.0)
