"""Tests for fusedloss.regularization.l2_regularization."""

import collections

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fusedloss.regularization import l2_regularization

Pair = collections.namedtuple("Pair", ["kernel", "bias"])


def make_params(rng):
    """A mixed pytree: nested dicts/lists/namedtuples, low precision, ints, bools, None."""
    return {
        "dense": Pair(
            kernel=jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            bias=jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16),
        ),
        "blocks": [
            {"scale": jnp.asarray(rng.normal(size=(2,)), jnp.float16), "step": jnp.int32(7)},
            {"w": 1.5, "flag": jnp.asarray([True, False]), "unused": None},
        ],
        "count": 3,
    }


def oracle(params, select=lambda path: True):
    """0.5 * sum of squares over floating leaves, in float64 NumPy."""
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == jnp.bfloat16:
            if select(jax.tree_util.keystr(path)):
                total += float(np.sum(np.square(arr.astype(np.float64))))
    return 0.5 * total


def test_matches_float64_oracle_and_skips_non_floating_leaves():
    params = make_params(np.random.default_rng(0))
    got = jax.jit(l2_regularization)(params)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, oracle(params), rtol=1e-6)
    # Integer, boolean and None leaves contribute nothing.
    floats_only = jax.tree.map(
        lambda x: x if jnp.issubdtype(jnp.result_type(x), jnp.floating) else None, params
    )
    assert jax.jit(l2_regularization)(floats_only) == got


def test_scale_and_gradient():
    params = {"a": jnp.asarray([[1.0, -2.0]], jnp.float32), "b": [jnp.asarray([3.0], jnp.float32)]}
    value, grads = jax.jit(jax.value_and_grad(lambda p: l2_regularization(p, scale=0.1)))(params)
    np.testing.assert_allclose(value, 0.1 * 0.5 * 14.0, rtol=1e-6)
    np.testing.assert_allclose(grads["a"], [[0.1, -0.2]], rtol=1e-6)
    np.testing.assert_allclose(grads["b"][0], [0.3], rtol=1e-6)


def test_low_precision_leaves_accumulate_in_float32():
    # 4096 bf16 values 1.5**2 = 2.25: a bfloat16 sum would stall near 512 (8-bit mantissa).
    params = [jnp.full((4096,), 1.5, jnp.bfloat16), jnp.full((8,), 0.5, jnp.float16)]
    value, grads = jax.jit(jax.value_and_grad(l2_regularization))(params)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, 0.5 * (4096 * 2.25 + 8 * 0.25), rtol=1e-7)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float16
    np.testing.assert_array_equal(grads[0].astype(jnp.float32), 1.5)


def test_float64_leaf_gives_float64_result():
    with jax.enable_x64(True):
        params = {"x": jnp.asarray([1e-10, 1.0], jnp.float64), "y": jnp.ones(2, jnp.float32)}
        got = l2_regularization(params)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, 0.5 * (1e-20 + 1.0 + 2.0), rtol=1e-15)


def test_gradients_numerically():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": [jnp.asarray(rng.normal(size=3))]}
        check_grads(jax.jit(lambda p: l2_regularization(p, scale=0.3)), (params,), 1, ["rev"])


def test_empty_or_non_floating_pytree_is_zero():
    for params in [{}, [], None, {"step": 3, "mask": jnp.ones(3, bool)}]:
        got = l2_regularization(params)
        assert got.dtype == jnp.float32 and float(got) == 0.0


def test_nan_propagates():
    got = l2_regularization({"a": jnp.asarray([1.0, jnp.nan], jnp.float32)})
    assert np.isnan(got)


def test_mask_prefix_and_callable():
    params = make_params(np.random.default_rng(2))
    prefix = {"dense": Pair(kernel=True, bias=False), "blocks": False, "count": True}
    got = l2_regularization(params, mask=prefix)
    np.testing.assert_allclose(got, oracle(params, lambda path: "kernel" in path), rtol=1e-6)

    def no_bias(p):
        return jax.tree_util.tree_map_with_path(lambda path, _: "bias" not in str(path), p)

    got = l2_regularization(params, mask=no_bias, scale=2.0)
    want = 2.0 * oracle(params, lambda path: "bias" not in path)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_jit_without_retracing_matches_eager():
    params = make_params(np.random.default_rng(3))
    fn = jax.jit(chex.assert_max_traces(l2_regularization, n=1))
    for seed in range(3):
        other = make_params(np.random.default_rng(seed))
        np.testing.assert_allclose(fn(other), oracle(other), rtol=1e-6)
    np.testing.assert_allclose(fn(params), oracle(params), rtol=1e-6)
    # vmap over a stacked batch of parameter sets.
    stacked = {"w": jnp.asarray(np.arange(6.0).reshape(3, 2), jnp.float32)}
    np.testing.assert_allclose(jax.vmap(l2_regularization)(stacked), [0.5, 6.5, 20.5])


def test_rejects_bad_input():
    with pytest.raises(TypeError, match=r"leaf \['z'\] has complex dtype complex64"):
        l2_regularization({"a": jnp.ones(2), "z": jnp.ones(2, jnp.complex64)})
    with pytest.raises(TypeError, match=r"leaf \['s'\] is not an array: str"):
        l2_regularization({"s": "hello"})
    with pytest.raises(ValueError, match=r"`scale` must be in \[0.0, inf\), got -1.0"):
        l2_regularization({"a": jnp.ones(2)}, scale=-1.0)
    with pytest.raises(ValueError, match=r"`scale` must be a scalar, got shape \(2,\)"):
        l2_regularization({"a": jnp.ones(2)}, scale=jnp.ones(2))
    with pytest.raises(TypeError, match=r"`mask` leaves must be Python bools, got int 1"):
        l2_regularization({"a": jnp.ones(2)}, mask={"a": 1})
    with pytest.raises(ValueError, match=r"`mask` must be a pytree of bools with the structure"):
        l2_regularization({"a": jnp.ones(2)}, mask={"b": True})


@st.composite
def float_pytrees(draw):
    leaf = hnp.arrays(
        st.sampled_from([np.float32, np.float16]),
        hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
        elements=st.floats(-100, 100, width=16),
    )
    return draw(
        st.recursive(
            leaf | st.integers(-5, 5),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.sampled_from("abc"), children, max_size=3)
            ),
            max_leaves=6,
        )
    )


# Mostly milliseconds an example (up to ~0.4 s when a new leaf shape compiles); the
# number of examples is the hypothesis profile's (tests/conftest.py).
@hypothesis.given(float_pytrees(), st.floats(0.0, 4.0))
def test_property_matches_oracle(params, scale):
    got = l2_regularization(params, scale=scale)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, scale * oracle(params), rtol=1e-6, atol=1e-30)
    assert float(got) >= 0.0
