"""Tests for fusedloss.regression: optax parity, a float64 NumPy oracle, gradients,
masks, dtypes and errors."""

import functools
import inspect

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax.losses
import pytest
from jax.test_util import check_grads

from fusedloss import regression

ELEMENTWISE = ["squared_error", "l2_loss", "absolute_error", "huber_loss", "log_cosh"]
WITH_OPTAX = ["squared_error", "l2_loss", "huber_loss", "log_cosh"]
COSINE = ["cosine_similarity", "cosine_distance"]


def call_optax(name, *args, **kwargs):
    # optax mixes dtypes internally in places; strict promotion is our tests' rule only.
    with jax.numpy_dtype_promotion("standard"):
        return getattr(optax.losses, name)(*args, **kwargs)


def value_and_grads(fn, *args, **kwargs):
    """fn(*args) and the gradient of its sum with respect to every positional arg.

    Jitted: one compilation per call instead of one per primitive keeps the suite fast.
    """
    argnums = tuple(range(len(args)))

    def run(*a):
        return fn(*a, **kwargs), jax.grad(lambda *b: jnp.sum(fn(*b, **kwargs)), argnums)(*a)

    return jax.jit(run)(*args)


def assert_matches_optax(names, args, kwargs, *, atol=None):
    """Values and gradients of ours and optax's `names` on `args`, in one compilation."""

    def run(*a):
        return [
            (
                value_and_grads(getattr(regression, n), *a, **kwargs),
                value_and_grads(functools.partial(call_optax, n), *a, **kwargs),
            )
            for n in names
        ]

    results = jax.jit(run)(*args)
    for name, ((ours, ours_g), (theirs, theirs_g)) in zip(names, results, strict=True):
        assert ours.shape == theirs.shape, name
        assert ours.dtype == theirs.dtype, name
        np.testing.assert_allclose(
            ours, theirs, rtol=1e-5, atol=(atol or {}).get(name, 0.0), err_msg=name
        )
        for g, h in zip(ours_g, theirs_g, strict=True):
            np.testing.assert_allclose(g, h, rtol=1e-5, atol=2e-7, err_msg=name)
    return [ours for (ours, _), _ in results]


def oracle_elementwise(name, e, delta=1.0):
    """Float64 NumPy definitions of the elementwise losses of the error e."""
    e = np.asarray(e, np.float64)
    a = np.abs(e)
    if name == "squared_error":
        return e**2
    if name == "l2_loss":
        return 0.5 * e**2
    if name == "absolute_error":
        return a
    if name == "huber_loss":
        return np.where(a <= delta, 0.5 * e**2, 0.5 * delta**2 + delta * (a - delta))
    if name == "log_cosh":
        return np.log(np.cosh(e))
    raise AssertionError(name)


def oracle_cosine(a, b, axis, mask, epsilon=0.0):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mask = np.ones(a.shape, bool) if mask is None else np.asarray(mask)
    a = np.where(mask, a, 0.0)
    b = np.where(mask, b, 0.0)
    na = np.sqrt(np.maximum((a * a).sum(axis), epsilon))
    nb = np.sqrt(np.maximum((b * b).sum(axis), epsilon))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(axis) / (na * nb)
    return np.where(mask.any(axis), cos, 0.0)


def mask_without_empty_groups(rng, shape, axis, p=0.7):
    """Random mask with at least one True in every group reduced over `axis`."""
    while True:
        mask = rng.random(shape) < p
        if np.all(mask.any(axis)):
            return mask


# ------------------------------------------------------------------ signatures


@pytest.mark.parametrize("name", WITH_OPTAX + COSINE)
def test_signature_matches_optax(name):
    ours = inspect.signature(getattr(regression, name)).parameters
    theirs = inspect.signature(getattr(optax.losses, name)).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]


def test_absolute_error_signature_follows_squared_error():
    ours = inspect.signature(regression.absolute_error).parameters
    ref = inspect.signature(regression.squared_error).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in ref.values()
    ]


# ------------------------------------------------------------- elementwise losses


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)])
def test_elementwise_matches_optax(shape):
    rng = np.random.default_rng(0)
    p = jnp.asarray(2.0 * rng.normal(size=shape), jnp.float32)
    t = jnp.asarray(rng.normal(size=shape), jnp.float32)
    # optax's log_cosh, logaddexp(e, -e) - log(2), has an absolute error of about
    # ulp(log 2) for small errors; ours is accurate there (see the oracle test).
    atol = {"log_cosh": 1e-7}
    with_targets = assert_matches_optax(WITH_OPTAX, (p, t), {}, atol=atol)
    without_targets = assert_matches_optax(WITH_OPTAX, (p,), {}, atol=atol)
    for value in with_targets + without_targets:
        assert value.shape == shape and value.dtype == jnp.float32


@pytest.mark.parametrize("delta", [0.3, 2.0])
def test_huber_delta_matches_optax(delta):
    rng = np.random.default_rng(1)
    p = jnp.asarray(3.0 * rng.normal(size=(4, 6)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    assert_matches_optax(["huber_loss"], (p, t), {"delta": delta})
    # The gradient is the error clipped to [-delta, delta].
    _, (gp, _) = value_and_grads(functools.partial(regression.huber_loss, delta=delta), p, t)
    np.testing.assert_allclose(gp, np.clip(p - t, -delta, delta), rtol=1e-6)


def all_elementwise(*args):
    """Every elementwise loss on the same arguments, in one compilation."""
    return jax.jit(lambda *a: {n: getattr(regression, n)(*a) for n in ELEMENTWISE})(*args)


def test_elementwise_match_float64_oracle():
    p = np.array([0.0, 1e-4, -3e-3, 0.5, -0.999, 1.5, 7.0, -40.0, 100.0, -300.0])
    t = np.array([0.0, 0.0, 0.0, 0.25, 0.0, -1.0, 2.0, 0.0, 0.0, 0.0])
    got = all_elementwise(jnp.asarray(p, jnp.float32), jnp.asarray(t, jnp.float32))
    e = p.astype(np.float32).astype(np.float64) - t.astype(np.float32).astype(np.float64)
    for name in ELEMENTWISE:
        want = oracle_elementwise(name, e)
        np.testing.assert_allclose(got[name], want, rtol=2e-6, atol=1e-30, err_msg=name)


def test_elementwise_targets_none_means_zeros():
    p = jnp.asarray([[-2.0, 0.5, 3.0]], jnp.float32)
    without = all_elementwise(p)
    with_zeros = all_elementwise(p, jnp.zeros_like(p))
    for name in ELEMENTWISE:
        np.testing.assert_array_equal(without[name], with_zeros[name], err_msg=name)
        np.testing.assert_allclose(without[name], oracle_elementwise(name, p), rtol=1e-6)


def test_integer_targets_are_accepted_like_optax():
    p = jnp.asarray([0.5, -1.0, 4.0], jnp.float32)
    t = jnp.asarray([1, 0, 2], jnp.int32)
    got = regression.squared_error(p, t)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, [0.25, 1.0, 4.0])
    np.testing.assert_allclose(got, call_optax("squared_error", p, t))


def test_elementwise_gradients_numerically():
    # Errors at least 0.05 away from the kinks of absolute_error (0) and huber (|e| = 1).
    e = np.array([-2.3, -1.2, -0.6, -0.2, 0.1, 0.4, 0.8, 1.3, 5.0])
    t = np.linspace(-1.0, 1.0, e.size)
    with jax.enable_x64(True):
        fn = jax.jit(lambda p, t: [getattr(regression, n)(p, t) for n in ELEMENTWISE])
        check_grads(fn, (t + e, t), order=1)


def test_nan_propagates_elementwise():
    p = jnp.asarray([1.0, jnp.nan, -2.0], jnp.float32)
    t = jnp.asarray([0.0, 0.0, jnp.nan], jnp.float32)
    for name, got in all_elementwise(p, t).items():
        np.testing.assert_array_equal(np.isnan(got), [False, True, True], err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_low_precision_out(dtype):
    rng = np.random.default_rng(2)
    p32 = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32).astype(dtype).astype(jnp.float32)
    t32 = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32).astype(dtype).astype(jnp.float32)

    @jax.jit
    def run(p, t):
        return {n: getattr(regression, n)(p, t) for n in ELEMENTWISE + COSINE}

    got = run(p32.astype(dtype), t32.astype(dtype))
    want = run(p32, t32)
    for name in ELEMENTWISE + COSINE:
        assert got[name].dtype == dtype, name
        # Computed in float32 from the same (rounded) inputs: only the last rounding differs.
        np.testing.assert_allclose(
            got[name].astype(jnp.float32),
            want[name],
            rtol=jnp.finfo(dtype).eps,
            atol=1e-3,
            err_msg=name,
        )


# ------------------------------------------------------------------- cosine


COSINE_CASES = [
    ((5, 6), -1, False),
    ((5, 6), -1, True),
    ((5, 6), 0, True),
    ((2, 3, 4), (0, 2), True),
    ((2, 3, 4), 1, False),
    ((3, 4), None, True),
]


@pytest.mark.parametrize(("shape", "axis", "use_where"), COSINE_CASES)
def test_cosine_matches_optax(shape, axis, use_where):
    rng = np.random.default_rng(3)
    p = jnp.asarray(rng.normal(size=shape), jnp.float32)
    t = jnp.asarray(rng.normal(size=shape), jnp.float32)
    where = jnp.asarray(mask_without_empty_groups(rng, shape, axis)) if use_where else None
    kwargs = dict(axis=axis, where=where, epsilon=2.0)
    sim, dist = assert_matches_optax(COSINE, (p, t), kwargs, atol={n: 2e-7 for n in COSINE})
    cos = oracle_cosine(p, t, axis, where, epsilon=2.0)
    np.testing.assert_allclose(sim, cos, atol=1e-6)
    np.testing.assert_allclose(dist, 1 - cos, atol=1e-6)


def test_cosine_defaults_and_epsilon_match_optax():
    rng = np.random.default_rng(4)
    p = np.concatenate([rng.normal(size=(3, 7)), [[0.1] + [0.0] * 6], np.zeros((1, 7))])
    t = np.concatenate([rng.normal(size=(3, 7)), [[1.0] + [0.0] * 6], np.ones((1, 7))])

    @jax.jit
    def run(p, t):
        return {
            f"{name}/{lib}/{eps}": fn(p, t) if eps is None else fn(p, t, epsilon=eps)
            for name in COSINE
            for lib, fn in [
                ("ours", getattr(regression, name)),
                ("optax", functools.partial(call_optax, name)),
            ]
            for eps in [None, 0.25]
        }

    out = run(jnp.asarray(p, jnp.float32), jnp.asarray(t, jnp.float32))
    for name in COSINE:
        for eps in [None, 0.25]:
            ours, theirs = out[f"{name}/ours/{eps}"], out[f"{name}/optax/{eps}"]
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7, err_msg=name)
    sim = out["cosine_similarity/ours/0.25"]
    # epsilon bounds the squared norm: sqrt(max(0.1**2, 0.25)) = 0.5, so 0.1 / 0.5.
    np.testing.assert_allclose(sim[3], 0.2, rtol=1e-6)
    # A zero vector gives NaN without epsilon (0 / 0, like optax) and 0 with it.
    assert np.isnan(out["cosine_similarity/ours/None"][4])
    assert sim[4] == 0.0


def test_cosine_fully_masked_row_matches_optax_with_zero_gradient():
    p = np.array([[1.0, 2.0, 3.0], [np.nan, 0.0, 5.0], [0.0, 0.0, 0.0]], np.float32)
    t = np.array([[2.0, 2.0, 1.0], [1.0, np.inf, 0.0], [1.0, 1.0, 1.0]], np.float32)
    where = np.array([[True, False, True], [False, False, False], [False, False, False]])
    run = jax.jit(
        lambda p, t, w: {
            n: value_and_grads(functools.partial(getattr(regression, n), where=w), p, t)
            for n in COSINE
        }
    )
    cos = 5.0 / np.sqrt(10.0) / np.sqrt(5.0)
    for name, (value, (gp, gt)) in run(p, t, where).items():
        # A row with nothing included: similarity 0 and distance 1, as in optax.
        want = [cos, 0, 0] if name == "cosine_similarity" else [1 - cos, 1, 1]
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=name)
        optax_fn = getattr(optax.losses, name)
        np.testing.assert_allclose(value[1:], optax_fn(p, t, where=where)[1:], err_msg=name)
        np.testing.assert_array_equal(gp[1:], 0.0)
        np.testing.assert_array_equal(gt[1:], 0.0)
        assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gt))
        # Excluded elements of a partly masked row get exactly zero gradient too.
        assert gp[0, 1] == 0.0 and gt[0, 1] == 0.0


@pytest.mark.parametrize("name", COSINE)
def test_cosine_of_empty_vectors_matches_optax(name):
    p = jnp.zeros((3, 0), jnp.float32)
    fn = getattr(regression, name)
    want = np.asarray(getattr(optax.losses, name)(p, p))
    np.testing.assert_array_equal(want, 0.0 if name == "cosine_similarity" else 1.0)
    np.testing.assert_array_equal(fn(p, p), want)
    np.testing.assert_array_equal(jax.jit(fn)(p, p), want)


def test_cosine_where_equals_dropping_elements():
    rng = np.random.default_rng(5)
    p = rng.normal(size=9).astype(np.float32)
    t = rng.normal(size=9).astype(np.float32)
    m = rng.random(9) < 0.5
    m[0] = True
    run = jax.jit(lambda p, t, w: regression.cosine_similarity(p, t, where=w))
    np.testing.assert_allclose(run(p, t, m), run(p[m], t[m], None), rtol=1e-6)
    np.testing.assert_allclose(run(p, t, m), oracle_cosine(p, t, -1, m), rtol=1e-6)


def test_cosine_nan_propagates_within_row_only():
    p = np.array([[1.0, np.nan], [1.0, 2.0]], np.float32)
    t = np.ones((2, 2), np.float32)
    got = np.asarray(jax.jit(regression.cosine_distance)(p, t))
    assert np.isnan(got[0])
    np.testing.assert_allclose(got[1], 1 - 3 / np.sqrt(10), rtol=1e-5)


def test_cosine_gradients_numerically():
    rng = np.random.default_rng(6)
    p = rng.normal(size=(3, 4))
    t = rng.normal(size=(3, 4))
    where = rng.random((3, 4)) < 0.7
    where[:, 0] = True
    where[2] = False  # a fully masked row
    with jax.enable_x64(True):
        fn = jax.jit(
            lambda p, t: [getattr(regression, n)(p, t, where=where, epsilon=0.5) for n in COSINE]
        )
        check_grads(fn, (p, t), order=1)


# ------------------------------------------------------------ jit / vmap / traces


def test_jit_and_vmap_match_oracle_without_retracing():
    rng = np.random.default_rng(7)
    p = rng.normal(size=(4, 3, 5)).astype(np.float32)
    t = rng.normal(size=(4, 3, 5)).astype(np.float32)
    where = rng.random((4, 3, 5)) < 0.8

    def both(p, t, where):
        return (
            regression.huber_loss(p, t, delta=0.5),
            regression.cosine_distance(p, t, where=where, epsilon=0.1),
        )

    jitted = jax.jit(chex.assert_max_traces(both, n=1))
    for _ in range(3):
        huber, dist = jitted(p, t, where)
    np.testing.assert_allclose(huber, oracle_elementwise("huber_loss", p - t, 0.5), rtol=1e-6)
    np.testing.assert_allclose(dist, 1 - oracle_cosine(p, t, -1, where, 0.1), atol=1e-6)
    batched = jax.jit(jax.vmap(both))(p, t, where)
    np.testing.assert_allclose(batched[0], huber, rtol=1e-6)
    np.testing.assert_allclose(batched[1], dist, rtol=1e-6, atol=1e-7)


def test_traced_delta():
    p = jnp.asarray([0.5, 3.0], jnp.float32)
    fn = jax.jit(jax.value_and_grad(lambda d: regression.huber_loss(p, delta=d).sum()))
    value, grad_delta = fn(jnp.float32(1.0))
    np.testing.assert_allclose(value, 0.125 + 2.5)
    np.testing.assert_allclose(grad_delta, 2.0)  # d/dd of (d * |e| - d**2 / 2) at |e| = 3


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_rejects_bad_input(name):
    fn = getattr(regression, name)
    with pytest.raises(TypeError, match=r"`predictions` must have a floating dtype, got int32"):
        fn(jnp.arange(3), jnp.zeros(3))
    with pytest.raises(
        ValueError, match=r"`predictions` and `targets` must have the same shape, got \(3,\) and"
    ):
        fn(jnp.zeros(3), jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(3,\)"):
        fn(jnp.zeros((2, 3)), jnp.zeros(3))  # optax's huber_loss would broadcast this
    with pytest.raises(TypeError, match=r"`targets` must have a real .* got complex64"):
        fn(jnp.zeros(3), jnp.zeros(3, jnp.complex64))


def test_huber_rejects_bad_delta():
    with pytest.raises(ValueError, match=r"`delta` must be in \(0.0, inf\), got -1.0"):
        regression.huber_loss(jnp.zeros(3), delta=-1.0)
    with pytest.raises(ValueError, match=r"`delta` must be a scalar, got shape \(3,\)"):
        regression.huber_loss(jnp.zeros(3), delta=jnp.ones(3))


@pytest.mark.parametrize("name", COSINE)
def test_cosine_rejects_bad_input(name):
    fn = getattr(regression, name)
    x = jnp.zeros((2, 3))
    with pytest.raises(TypeError, match=r"`targets` must have a floating dtype, got int32"):
        fn(x, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(TypeError, match=r"`predictions` must have a floating dtype"):
        fn(jnp.zeros((2, 3), jnp.int32), x)
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(2, 1\)"):
        fn(x, jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"`where` must have shape \(2, 3\), got \(2, 1\)"):
        fn(x, x, where=jnp.ones((2, 1), bool))
    with pytest.raises(TypeError, match=r"`where` must be a boolean array"):
        fn(x, x, where=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"`axis`=2 is out of range for an array of rank 2"):
        fn(x, x, axis=2)
    with pytest.raises(ValueError, match=r"`epsilon` must be in \[0.0, inf\), got -0.5"):
        fn(x, x, epsilon=-0.5)


# -------------------------------------------------------------- property tests


# Shape classes with sides of 1 and of several, in one to three dimensions: the jitted
# loss compiles once per shape, axis and mask kind, so examples mostly reuse a compile.
PROPERTY_SHAPES = [(1,), (3,), (2, 1), (1, 3), (3, 2), (3, 1, 2), (2, 3, 2)]
_cosine_jit = jax.jit(regression.cosine_similarity, static_argnames="axis")


@st.composite
def cosine_problems(draw):
    shape = draw(st.sampled_from(PROPERTY_SHAPES))
    ndim = len(shape)
    axis = draw(
        st.one_of(
            st.none(),
            st.integers(-ndim, ndim - 1),
            st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple),
        )
    )
    seed = draw(st.integers(0, 2**16))
    mask = draw(st.one_of(st.none(), hnp.arrays(np.bool_, shape)))
    return shape, axis, seed, mask


# Milliseconds an example, 0.1-0.3 s when a new shape, axis and mask kind compiles
# (the number of examples is the hypothesis profile's, tests/conftest.py).
@hypothesis.given(cosine_problems())
def test_cosine_similarity_property(problem):
    shape, axis, seed, mask = problem
    rng = np.random.default_rng(seed)
    p = rng.normal(size=shape).astype(np.float32)
    t = rng.normal(size=shape).astype(np.float32)
    where = None if mask is None else jnp.asarray(mask)
    got = _cosine_jit(p, t, axis=axis, where=where)
    want = oracle_cosine(p, t, axis, mask, epsilon=1e-12)
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(np.asarray(got)) <= 1.0 + 1e-6)
