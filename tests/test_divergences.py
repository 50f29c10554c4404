"""Tests for fusedloss.divergences: optax parity, float64 oracles (SciPy), gradients,
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
import scipy.spatial.distance
import scipy.special
from jax.test_util import check_grads

from fusedloss import divergences

WITH_OPTAX = ["kl_divergence", "kl_divergence_with_log_targets", "generalized_kl_divergence"]
ALL = [*WITH_OPTAX, "jensen_shannon_divergence"]
LOG2 = float(np.log(2.0))


def call_optax(name, *args, **kwargs):
    # optax mixes dtypes internally in places; strict promotion is our tests' rule only.
    with jax.numpy_dtype_promotion("standard"):
        return getattr(optax.losses, name)(*args, **kwargs)


def second_arg(name, targets):
    """The second argument of `name` for target probabilities `targets`."""
    if name != "kl_divergence_with_log_targets":
        return targets
    if isinstance(targets, np.ndarray):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(targets)
    return jnp.log(targets)


def value_and_grads(fn, *args):
    return fn(*args), jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1))(*args)


def random_problem(rng, shape, axis=-1):
    """Log-probabilities and strictly positive probabilities, normalized over `axis`."""
    # NumPy-side: eager jnp ops on new shapes cost a compilation each.
    lp = scipy.special.log_softmax(rng.normal(size=shape), axis=axis)
    q = scipy.special.softmax(rng.normal(size=shape), axis=axis)
    return jnp.asarray(lp, jnp.float32), jnp.asarray(q, jnp.float32)


def oracle(name, log_p, q, axis=-1, mask=None):
    """Float64 definitions, via scipy.special where it has them."""
    log_p = np.asarray(log_p, np.float64)
    q = np.asarray(q, np.float64)
    p = np.exp(log_p)
    if name == "kl_divergence":
        terms = scipy.special.rel_entr(q, p)
    elif name == "kl_divergence_with_log_targets":
        terms = scipy.special.rel_entr(np.exp(q), p)
    elif name == "generalized_kl_divergence":
        terms = scipy.special.kl_div(q, p)  # q log(q / p) - q + p
    elif name == "jensen_shannon_divergence":
        m = 0.5 * (p + q)
        terms = 0.5 * (scipy.special.rel_entr(p, m) + scipy.special.rel_entr(q, m))
    else:
        raise AssertionError(name)
    if mask is not None:
        terms = np.where(mask, terms, 0.0)
    return terms.sum(axis)


def mask_without_empty_groups(rng, shape, axis, p=0.7):
    while True:
        mask = rng.random(shape) < p
        if np.all(mask.any(axis)):
            return mask


# ------------------------------------------------------------------ signatures


@pytest.mark.parametrize("name", WITH_OPTAX)
def test_signature_matches_optax(name):
    ours = inspect.signature(getattr(divergences, name)).parameters
    theirs = inspect.signature(getattr(optax.losses, name)).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]


def test_jensen_shannon_signature_follows_kl_divergence():
    ours = inspect.signature(divergences.jensen_shannon_divergence).parameters
    ref = inspect.signature(divergences.kl_divergence).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in ref.values()
    ]


# --------------------------------------------------------------------- parity

CASES = [
    ((4, 6), -1, False),
    ((4, 6), 0, True),
    ((2, 3, 4), (1, 2), True),
    ((3, 5), None, False),
]


@pytest.mark.parametrize(("shape", "axis", "use_where"), CASES)
def test_matches_optax_and_oracle(shape, axis, use_where):
    rng = np.random.default_rng(0)
    norm_axis = -1 if axis is None else axis
    lp, q = random_problem(rng, shape, norm_axis)
    # Unnormalized predictions too: generalized KL is meant for them, the others accept them.
    lp = jnp.asarray(np.asarray(lp) + rng.uniform(-0.5, 0.5, size=shape), jnp.float32)
    where = jnp.asarray(mask_without_empty_groups(rng, shape, axis)) if use_where else None

    @jax.jit
    def run(lp, q):
        out = {}
        for name in ALL:
            t = second_arg(name, q)
            ours = functools.partial(getattr(divergences, name), axis=axis, where=where)
            out[name] = value_and_grads(ours, lp, t)
            if name in WITH_OPTAX:
                theirs = functools.partial(call_optax, name, axis=axis, where=where)
                out["optax_" + name] = value_and_grads(theirs, lp, t)
        return out

    out = run(lp, q)
    for name in ALL:
        value, grads = out[name]
        want = oracle(name, lp, second_arg(name, np.asarray(q)), axis, where)
        assert value.shape == np.shape(want) and value.dtype == jnp.float32, name
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=name)
        if name in WITH_OPTAX:
            theirs, theirs_grads = out["optax_" + name]
            np.testing.assert_allclose(value, theirs, rtol=1e-5, atol=1e-7, err_msg=name)
            for g, h in zip(grads, theirs_grads, strict=True):
                np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7, err_msg=name)


def test_positional_axis_and_where_like_optax():
    lp, q = random_problem(np.random.default_rng(1), (3, 4), axis=0)
    where = jnp.asarray([[True, False, True, True]] * 3)
    got, theirs = jax.jit(
        lambda lp, q: (
            divergences.kl_divergence(lp, q, 0, where),
            call_optax("kl_divergence", lp, q, 0, where),
        )
    )(lp, q)
    np.testing.assert_allclose(got, theirs, rtol=1e-6)
    np.testing.assert_allclose(got, oracle("kl_divergence", lp, q, 0, where), rtol=1e-5)


def test_kl_zero_targets_follow_optax_convention_with_finite_gradients():
    lp = jnp.asarray(np.log([[0.2, 0.3, 0.5]]), jnp.float32)
    q = jnp.asarray([[0.0, 0.4, 0.6]], jnp.float32)
    run = jax.jit(
        lambda lp, q: (
            value_and_grads(divergences.kl_divergence, lp, q),
            call_optax("kl_divergence", lp, q),
        )
    )
    (value, (g_lp, g_q)), theirs = run(lp, q)
    np.testing.assert_allclose(value, theirs, rtol=1e-6)
    np.testing.assert_allclose(value, oracle("kl_divergence", lp, q), rtol=1e-6)
    np.testing.assert_allclose(g_lp, -q)
    # d/dq of q log q - q lp: log q + 1 - lp, and -lp where q == 0 (0 log 0 := 0).
    q, lp = np.asarray(q), np.asarray(lp)
    want_g_q = np.where(q == 0, 0.0, np.log(np.where(q == 0, 1.0, q)) + 1.0) - lp
    np.testing.assert_allclose(g_q, want_g_q, rtol=1e-6)


# ------------------------------------------------------------------ masking


def test_fully_masked_row_is_zero_with_zero_gradient():
    lp = jnp.asarray([[-1.0, -0.5, -2.0], [jnp.nan, -jnp.inf, 0.0]], jnp.float32)
    q = jnp.asarray([[0.2, 0.3, 0.5], [jnp.nan, 0.0, -1.0]], jnp.float32)
    where = jnp.asarray([[True, True, False], [False, False, False]])

    @jax.jit
    def run(lp, q):
        out = {}
        for name in ALL:
            fn = functools.partial(getattr(divergences, name), where=where)
            out[name] = value_and_grads(fn, lp, second_arg(name, q))
        return out

    for name, (value, grads) in run(lp, q).items():
        want = oracle(name, lp[:1, :2], second_arg(name, np.asarray(q))[:1, :2])
        np.testing.assert_allclose(value, [want[0], 0.0], rtol=1e-5, err_msg=name)
        for g in grads:
            assert np.all(np.isfinite(g)), name
            np.testing.assert_array_equal(g[1], 0.0, err_msg=name)
            assert g[0, 2] == 0.0, name


def test_where_equals_dropping_elements():
    rng = np.random.default_rng(2)
    lp, q = random_problem(rng, (9,))
    m = rng.random(9) < 0.5
    m[0] = True
    run = jax.jit(
        lambda lp, q, w: {n: getattr(divergences, n)(lp, second_arg(n, q), where=w) for n in ALL}
    )
    got = run(lp, q, jnp.asarray(m))
    want = run(lp[m], q[m], None)
    for name in ALL:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_nan_propagates_within_row_only():
    lp = np.full((2, 3), np.log(1 / 3), np.float32)
    lp[0, 1] = np.nan
    q = np.full((2, 3), 1 / 3, np.float32)
    q[1, 2] = np.nan
    run = jax.jit(lambda lp, q: {n: getattr(divergences, n)(lp, second_arg(n, q)) for n in ALL})
    for name, got in run(lp, q).items():
        np.testing.assert_array_equal(np.isnan(got), [True, True], err_msg=name)
    q_ok = np.full((2, 3), 1 / 3, np.float32)
    for name, got in run(lp, q_ok).items():
        np.testing.assert_array_equal(np.isnan(got), [True, False], err_msg=name)
        np.testing.assert_allclose(got[1], 0.0, atol=1e-6, err_msg=name)


# ----------------------------------------------------------- Jensen-Shannon


def test_jensen_shannon_matches_scipy_and_is_symmetric():
    rng = np.random.default_rng(3)
    lp, q = random_problem(rng, (5, 7))
    js = jax.jit(divergences.jensen_shannon_divergence)
    got = js(lp, q)
    # scipy's jensenshannon is the JS *distance*, sqrt of the divergence (in nats).
    want = scipy.spatial.distance.jensenshannon(np.exp(np.float64(lp)), np.float64(q), axis=-1)
    np.testing.assert_allclose(got, want**2, rtol=1e-5)
    swapped = js(jnp.asarray(np.log(q)), jnp.asarray(np.exp(lp)))
    np.testing.assert_allclose(swapped, got, rtol=1e-5)
    assert np.all((np.asarray(got) > 0) & (np.asarray(got) < LOG2))


def test_jensen_shannon_handles_zero_probabilities():
    # Disjoint supports: the maximum, log(2); identical: 0. No NaN in value or gradient.
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.25, 0.75]], np.float32)
    q = np.array([[0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], np.float32)
    with np.errstate(divide="ignore"):
        lp = np.log(p)
    value, (g_lp, g_q) = jax.jit(
        functools.partial(value_and_grads, divergences.jensen_shannon_divergence)
    )(lp, q)
    want = oracle("jensen_shannon_divergence", lp, q)
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(value[:2], [LOG2, 0.0], atol=1e-7)
    assert np.all(np.isfinite(g_lp)) and np.all(np.isfinite(g_q))
    # d JS / d lp_i = 0.5 * p_i * log(p_i / m_i): 0 where p_i = 0, log(2) / 2 when q_i = 0.
    np.testing.assert_allclose(g_lp[0], [0.5 * LOG2, 0.0, 0.0], atol=1e-7)


# ---------------------------------------------------------------- gradients


def test_gradients_numerically():
    rng = np.random.default_rng(4)
    lp = scipy.special.log_softmax(rng.normal(size=(3, 5)), axis=-1)
    q = scipy.special.softmax(rng.normal(size=(3, 5)), axis=-1)
    where = rng.random((3, 5)) < 0.7
    where[:, 0] = True
    where[1] = False  # a fully masked row

    def all_divergences(lp, q):
        return [getattr(divergences, n)(lp, second_arg(n, q), where=where) for n in ALL]

    with jax.enable_x64(True):
        check_grads(jax.jit(all_divergences), (lp, q), order=1)


# ------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_low_precision_out(dtype):
    lp, q = random_problem(np.random.default_rng(5), (4, 16))
    run = jax.jit(lambda lp, q: {n: getattr(divergences, n)(lp, second_arg(n, q)) for n in ALL})
    got = run(lp.astype(dtype), q.astype(dtype))
    # The float32 result on the same rounded inputs.
    want = run(lp.astype(dtype).astype(jnp.float32), q.astype(dtype).astype(jnp.float32))
    for name in ALL:
        assert got[name].dtype == dtype, name
        # float32 inside: only the final rounding (and log of rounded targets) differ.
        np.testing.assert_allclose(
            got[name].astype(jnp.float32),
            want[name],
            rtol=2 * jnp.finfo(dtype).eps,
            atol=1e-3,
            err_msg=name,
        )


# ---------------------------------------------------------- jit / vmap / traces


def test_jit_and_vmap_match_oracle_without_retracing():
    rng = np.random.default_rng(6)
    lp, q = random_problem(rng, (4, 3, 5))
    mask = rng.random((4, 3, 5)) < 0.8
    where = jnp.asarray(mask)

    def both(lp, q, where):
        return (
            divergences.generalized_kl_divergence(lp, q, -1, where),
            divergences.jensen_shannon_divergence(lp, q, where=where),
        )

    jitted = jax.jit(chex.assert_max_traces(both, n=1))
    for _ in range(3):
        out = jitted(lp, q, where)
    batched = jax.jit(jax.vmap(both))(lp, q, where)
    names = ["generalized_kl_divergence", "jensen_shannon_divergence"]
    for name, j, b in zip(names, out, batched, strict=True):
        want = oracle(name, lp, q, -1, mask)
        assert j.shape == b.shape == (4, 3)
        np.testing.assert_allclose(j, want, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(b, j, rtol=1e-6, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ALL)
def test_rejects_bad_input(name):
    fn = getattr(divergences, name)
    tname = "log_targets" if name == "kl_divergence_with_log_targets" else "targets"
    x = jnp.zeros((2, 3))
    with pytest.raises(TypeError, match=r"`log_predictions` must have a floating dtype, got int"):
        fn(jnp.zeros((2, 3), jnp.int32), x)
    with pytest.raises(TypeError, match=rf"`{tname}` must have a floating dtype, got int32"):
        fn(x, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(
        ValueError,
        match=rf"`log_predictions` and `{tname}` must have the same shape, got \(2, 3\) and \(3,\)",
    ):
        fn(x, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`where` must have shape \(2, 3\), got \(3,\)"):
        fn(x, x, where=jnp.ones(3, bool))
    with pytest.raises(TypeError, match=r"`where` must be a boolean array"):
        fn(x, x, where=jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"`axis`=\(0, -2\) names the same axis twice"):
        fn(x, x, axis=(0, -2))


# ---------------------------------------------------------------- properties


# Shape classes with sides of 1 and of several, in one to three dimensions: the jitted
# losses compile once per shape, axis and mask kind, so examples mostly reuse a compile.
PROPERTY_SHAPES = [(1,), (3,), (2, 1), (1, 3), (3, 2), (3, 1, 2), (2, 3, 2)]


@functools.partial(jax.jit, static_argnames="axis")
def _property_run(lp, q, where, axis):
    return [
        divergences.kl_divergence(lp, q, axis, where),
        divergences.jensen_shannon_divergence(lp, q, axis, where),
    ]


@st.composite
def masked_problems(draw):
    shape = draw(st.sampled_from(PROPERTY_SHAPES))
    axis = draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    mask = draw(st.one_of(st.none(), hnp.arrays(np.bool_, shape)))
    zeros = draw(hnp.arrays(np.bool_, shape))  # where the target probability is 0
    return shape, axis, mask, zeros, draw(st.integers(0, 2**16))


# Milliseconds an example, 0.2-0.6 s when a new shape, axis and mask kind compiles
# (the number of examples is the hypothesis profile's, tests/conftest.py).
@hypothesis.given(masked_problems())
def test_kl_and_jensen_shannon_property(problem):
    shape, axis, mask, zeros, seed = problem
    rng = np.random.default_rng(seed)
    lp = rng.normal(size=shape).astype(np.float32) - 1.0
    q = np.where(zeros, 0.0, rng.uniform(0.1, 1.0, size=shape)).astype(np.float32)
    where = None if mask is None else jnp.asarray(mask)
    names = ["kl_divergence", "jensen_shannon_divergence"]
    got_all = _property_run(jnp.asarray(lp), jnp.asarray(q), where, axis=axis)
    for name, got in zip(names, got_all, strict=True):
        want = oracle(name, lp, q, axis, mask)
        assert got.shape == np.shape(want), name
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)
