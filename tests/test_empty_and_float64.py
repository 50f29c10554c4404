"""Degenerate batches (no tokens at all) and float64 inputs, single-device and sharded.

An empty batch gives 0 for "mean"/"sum", an empty array for "none" and zero
gradients of the primals' shapes, under jit, vmap and grad. With x64 enabled (and
the suite's strict dtype promotion) float64 inputs are computed in float64 and equal
a float64 oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_sharded import CASES, evaluate, make_data, mesh_of, oracle, oracle_of, to_jax
from test_sharded import assert_matches as assert_matches_oracle

import fusedloss
from fusedloss import objectives
from fusedloss.heads.sharded import (
    sharded_linear_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

D, V = 16, 41  # V = 41: padded to 44 columns on a model axis of 4


def empty_args(batch_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(*batch_shape, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
    labels = jnp.zeros(batch_shape, jnp.int32)
    return x, w, bias, labels


def assert_empty_result(loss, reduction, token_shape):
    if reduction == "none":
        assert loss.shape == token_shape and loss.dtype == jnp.float32
        assert np.asarray(loss).size == 0
    else:
        assert loss.shape == () and loss.dtype == jnp.float32
        assert float(loss) == 0.0


def assert_zero_grads(grads, primals):
    for g, p in zip(grads, primals, strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype
        np.testing.assert_array_equal(np.asarray(g), 0.0)


# (x's batch shape, shift, the shifted token shape): no tokens, or none left after
# the shift.
EMPTY = [((8, 0), 0, (8, 0)), ((8, 1), 1, (8, 0)), ((8, 3), 3, (8, 0))]
EMPTY_IDS = ["T0", "T1_shift1", "T3_shift3"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("batch", "shift", "token_shape"), EMPTY, ids=EMPTY_IDS)
def test_sharded_empty_batch(batch, shift, token_shape, reduction):
    """Global N = 0 on a 2x4 mesh (the batch axis split over "data"): value, aux
    counts and zero gradients (x, w, bias) under jit, and the eager call."""
    x, w, bias, labels = empty_args(batch)
    mesh = mesh_of((2, 4))
    kw = dict(mesh=mesh, reduction=reduction, shift=shift, label_smoothing=0.1, z_loss=1e-3)

    def fn(x, w, b):
        return sharded_linear_cross_entropy(x, w, labels, bias=b, return_aux=True, **kw)

    loss, aux = jax.jit(fn)(x, w, bias)
    assert_empty_result(loss, reduction, token_shape)
    assert int(aux.num_tokens) == 0 and float(aux.weight_sum) == 0.0
    assert aux.lse.shape == aux.correct.shape == token_shape
    assert_empty_result(fn(x, w, bias)[0], reduction, token_shape)

    def objective(x, w, b):
        return jnp.sum(fn(x, w, b)[0])

    value, grads = jax.jit(jax.value_and_grad(objective, (0, 1, 2)))(x, w, bias)
    assert float(value) == 0.0
    assert_zero_grads(grads, (x, w, bias))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sharded_empty_batch_under_vmap(reduction):
    """vmap over a leading axis of empty batches (each [8, 0, D] on a 2x4 mesh)."""
    x, w, _, labels = empty_args((3, 8, 0))
    mesh = mesh_of((2, 4))

    def fn(x, labels, w):
        return jnp.sum(sharded_linear_cross_entropy(x, w, labels, mesh=mesh, reduction=reduction))

    values, dw = jax.jit(jax.vmap(jax.value_and_grad(fn, 2), (0, 0, None)))(x, labels, w)
    np.testing.assert_array_equal(values, np.zeros(3, np.float32))
    assert_zero_grads([dw], [jnp.zeros((3, D, V))])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_in_shard_empty_batch(reduction):
    """vocab_parallel_linear_cross_entropy in a user's shard_map, no tokens anywhere."""
    x, w, bias, labels = empty_args((8, 0))
    w, bias = jnp.pad(w, ((0, 0), (0, 3))), jnp.pad(bias, (0, 3))
    specs = (P("data"), P(None, "model"), P("model"), P("data"))

    def loss(x, w, b, labels):
        out = vocab_parallel_linear_cross_entropy(
            x, w, labels, bias=b, data_axis="data", vocab_size=V, reduction=reduction
        )
        return jnp.sum(out)

    fn = jax.shard_map(loss, mesh=mesh_of((2, 4)), in_specs=specs, out_specs=P())
    value, grads = jax.jit(jax.value_and_grad(fn, (0, 1, 2)))(x, w, bias, labels)
    assert float(value) == 0.0
    assert_zero_grads(grads, (x, w, bias))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_device_empty_token_axis_under_vmap(reduction):
    """vmap over 3 sequences of 0 tokens each: per-sequence 0 (or [0]) and zero grads."""
    x, w, bias, labels = empty_args((3, 0))

    def fn(x, labels, w, b):
        return fusedloss.linear_cross_entropy(x, w, labels, bias=b, reduction=reduction)

    out = jax.jit(jax.vmap(fn, (0, 0, None, None)))(x, labels, w, bias)
    assert out.shape == ((3, 0) if reduction == "none" else (3,))
    np.testing.assert_array_equal(out, np.zeros(out.shape, np.float32))

    def objective(x, w, b):
        return jnp.sum(jax.vmap(fn, (0, 0, None, None))(x, labels, w, b))

    grads = jax.jit(jax.grad(objective, (0, 1, 2)))(x, w, bias)
    assert_zero_grads(grads, (x, w, bias))


def toy_model(vocab=V, dtype=jnp.float32):
    rng = np.random.default_rng(5)
    params = {
        "embed": jnp.asarray(rng.normal(size=(vocab, D)) * 0.3, dtype),
        "w": jnp.asarray(rng.normal(size=(D, D)) * 0.3, dtype),
    }

    def hidden(params, tokens):
        return jnp.tanh(params["embed"][tokens] @ params["w"])

    return params, hidden


@pytest.mark.parametrize(
    "batch",
    [
        # padding only
        {"tokens": jnp.ones((2, 5), jnp.int32), "mask": jnp.zeros((2, 5), jnp.int32)},
        # one real token per row: it has no target
        {"tokens": jnp.ones((2, 5), jnp.int32), "mask": jnp.arange(5)[None].repeat(2, 0) == 0},
        # every target ignored
        {"tokens": jnp.full((2, 5), -100, jnp.int32)},
    ],
    ids=["all_padding", "no_targets", "all_ignored"],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_causal_lm_objective_without_targets(batch, reduction):
    params, hidden = toy_model()
    loss_fn = objectives.causal_lm_objective(
        lambda p, t: hidden(p, jnp.maximum(t, 0)),  # -100 ids: any input will do
        head=lambda p: fusedloss.Transposed(p["embed"]),
        ignore_index=-100,
        label_smoothing=0.1,
        z_loss=1e-3,
        reduction=reduction,
    )
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
    assert float(loss) == 0.0
    assert int(aux.num_tokens) == 0
    metrics = aux.metrics()
    assert float(metrics["loss"]) == 0.0 and float(metrics["nll"]) == 0.0
    assert float(metrics["perplexity"]) == 1.0 and float(metrics["accuracy"]) == 0.0
    assert_zero_grads(jax.tree.leaves(grads), jax.tree.leaves(params))


# --------------------------------------------------------------------------------------
# float64
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4), (1, 8)])
def test_float64_matches_oracle(shape):
    """With x64 and strict promotion: float64 throughout (the 1x8 mesh has an empty
    vocabulary shard for V = 41), equal to the oracle to float64 precision."""
    names = ["all_mean_v41", "none"]
    data = make_data(4)
    mesh = mesh_of(shape)
    with jax.enable_x64(True):

        def lce(*a, **k):
            loss = sharded_linear_cross_entropy(*a, mesh=mesh, **k)
            assert (loss[0] if isinstance(loss, tuple) else loss).dtype == jnp.float64
            return loss

        outs = jax.jit(lambda d: [evaluate(lce, d, CASES[n]) for n in names])(
            to_jax(data, jnp.float64)
        )
        outs = jax.tree.map(np.asarray, outs)
    for name, out in zip(names, outs, strict=True):
        spec = CASES[name]
        assert_matches_oracle(out, oracle_of(data, spec), jnp.float64, aux=spec["aux"])


def test_float64_sharded_with_float32_weights():
    """float64 x and w, float32 per-token weights: the weights follow x's dtype."""
    data = make_data(6)
    kw = dict(reduction="mean", ignore_index=-100, shift=1)
    with jax.enable_x64(True):
        jx = to_jax(data, jnp.float64)
        wts = jnp.asarray(data["weights"], jnp.float32)

        def fn(x, w):
            return sharded_linear_cross_entropy(
                x, w, jx["labels"], weights=wts, mesh=mesh_of((2, 4)), **kw
            )

        loss, (dx, dw) = jax.jit(jax.value_and_grad(fn, (0, 1)))(jx["x"], jx["w41"])
        assert loss.dtype == jnp.float64
        loss, dx, dw = np.asarray(loss), np.asarray(dx), np.asarray(dw)
    weights32 = np.asarray(np.float32(data["weights"]), np.float64)
    want = oracle(data["x"], data["w41"], data["labels"], weights=weights32, **kw)
    for got, name in ((loss, "loss"), (dx, "dx"), (dw, "dw")):
        np.testing.assert_allclose(got, want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_float64_causal_lm_objective():
    """causal_lm_objective on float64 hidden states: loss and aux in float64 precision."""
    with jax.enable_x64(True):
        params, hidden = toy_model(dtype=jnp.float64)
        tokens = jnp.asarray(np.random.default_rng(7).integers(0, V, (2, 6)), jnp.int32)
        weights = jnp.asarray(np.random.default_rng(8).random((2, 6)), jnp.float64)
        batch = {"tokens": tokens, "weights": weights}
        loss_fn = objectives.causal_lm_objective(
            hidden, head=lambda p: fusedloss.Transposed(p["embed"]), z_loss=1e-3
        )
        loss, aux = jax.jit(loss_fn)(params, batch)
        assert loss.dtype == jnp.float64
        h = np.asarray(hidden(params, tokens))
        emb = np.asarray(params["embed"])
        loss, lse_sum = float(loss), float(aux.lse_sum)
    want_all = oracle(
        h, emb.T, np.asarray(tokens), weights=np.asarray(weights), z_loss=1e-3, shift=1
    )
    np.testing.assert_allclose(loss, want_all["loss"], rtol=1e-10)
    wts = np.asarray(weights)[:, 1:]
    np.testing.assert_allclose(lse_sum, np.sum(wts * want_all["lse"]), rtol=1e-10)
