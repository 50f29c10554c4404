"""The fused softmax_cross_entropy_with_integer_labels."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from fusedloss import softmax_cross_entropy_with_integer_labels as ce


def optax_ce(*args, **kw):
    return optax.losses.softmax_cross_entropy_with_integer_labels(*args, **kw)


def oracle(logits, labels, *, label_smoothing=0.0, z_loss=0.0, softcap=None, ignore_index=None):
    """Float64 NumPy definition, class axis last."""
    z = np.asarray(logits, np.float64)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    v = z.shape[-1]
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    onehot = labels[..., None] == np.arange(v)
    target = (1 - label_smoothing) * onehot + label_smoothing / v
    loss = lse - (target * z).sum(-1) + z_loss * lse**2
    if ignore_index is not None:
        loss = np.where(labels == ignore_index, 0.0, loss)
    return loss


def rand(seed, shape, v):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(*shape, v)) * 3, jnp.float32),
        jnp.asarray(rng.integers(0, v, size=shape), jnp.int32),
    )


def ours_and_optax(logits, labels, **kw):
    """((loss, grad of its sum) of ours, the same of optax), from one jitted program:
    run op by op, each side took seconds."""

    def both(z):
        return [
            (f(z, labels, **kw), jax.grad(lambda z, f=f: f(z, labels, **kw).sum())(z))
            for f in (ce, optax_ce)
        ]

    return jax.jit(both)(logits)


@pytest.mark.parametrize("shape,v", [((7,), 5), ((3, 4), 11), ((2, 3, 5), 130)])
def test_matches_optax_values_and_grads(shape, v):
    logits, labels = rand(sum(shape) + v, shape, v)
    (got, g), (want, g_ref) = ours_and_optax(logits, labels)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("axis", [0, 1, -2, (1, 2), (0, 2), (2, 0), (-1, -2)])
def test_matches_optax_axis(axis):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    axes = (axis,) if isinstance(axis, int) else axis
    axes = tuple(a % 3 for a in axes)
    batch = tuple(s for i, s in enumerate(logits.shape) if i not in axes)
    v = int(np.prod([logits.shape[a] for a in axes]))
    labels = jnp.asarray(rng.integers(0, v, size=batch), jnp.int32)
    (got, g), (want, g_ref) = ours_and_optax(logits, labels, axis=axis)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("per_element", [False, True])
def test_matches_optax_where(per_element):
    logits, labels = rand(5, (6, 4), 9)
    rng = np.random.default_rng(6)
    where = rng.random(logits.shape if per_element else labels.shape) > 0.3
    where[0] = False  # a fully masked row
    where = jnp.asarray(where)
    (got, g), (want, g_ref) = ours_and_optax(logits, labels, where=where)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(got[0].sum()) == 0.0
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(g[0]))


@pytest.mark.parametrize(
    "kw",
    [
        {"label_smoothing": 0.1},
        {"z_loss": 1e-2},
        {"softcap": 2.5},
        {"ignore_index": -100},
        {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0, "ignore_index": -100},
    ],
)
def test_extra_features_match_float64_oracle(kw):
    logits, labels = rand(9, (5, 6), 33)
    if "ignore_index" in kw:
        labels = labels.at[1, 2].set(-100).at[4, 0].set(-100)
    api_kw = {("logit_softcap" if k == "softcap" else k): v for k, v in kw.items()}
    got = jax.jit(functools.partial(ce, **api_kw))(logits, labels)
    np.testing.assert_allclose(got, oracle(logits, np.asarray(labels), **kw), rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        z64 = jnp.asarray(logits, jnp.float64)
        check_grads(jax.jit(lambda z: ce(z, labels, **api_kw)), (z64,), order=1, atol=1e-6)


@pytest.mark.parametrize("where_kind", [None, "per_row", "per_element"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reverse_mode_keeps_only_the_logits_and_per_row_values(dtype, where_kind):
    # Between forward and backward, reverse mode keeps the logits (in their own dtype,
    # no float32 copy) and O(rows) values; no softmax or logit gradient the size of
    # the logits. A per-element `where` is the caller's mask and is kept too.
    rows, v = (8, 16), 1000
    n = rows[0] * rows[1]
    logits, labels = rand(1, rows, v)
    logits = logits.astype(dtype)
    rng = np.random.default_rng(2)
    where = None
    if where_kind is not None:
        where = jnp.asarray(rng.random(labels.shape if where_kind == "per_row" else logits.shape))
        where = (where < 0.8).at[..., 3].set(True)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 30.0}
    _, vjp_fn = jax.vjp(lambda z: ce(z, labels, where=where, **kw), logits)
    leaves = jax.tree.leaves(vjp_fn)
    big = [leaf for leaf in leaves if leaf.size > n]
    kept = [leaf for leaf in big if leaf.dtype != jnp.bool_]
    assert [(leaf.shape, leaf.dtype) for leaf in kept] == [(logits.shape, logits.dtype)]
    np.testing.assert_array_equal(np.asarray(kept[0], np.float32), np.asarray(logits, np.float32))
    assert len(big) - len(kept) == (where_kind == "per_element")
    assert sum(leaf.size for leaf in leaves if leaf.size <= n) <= 8 * n
    # The backward recomputes the softmax from what it kept: the float64 gradient.
    (g,) = vjp_fn(jnp.ones(labels.shape, dtype))
    assert g.dtype == dtype
    with jax.enable_x64(True):
        z64 = jnp.asarray(np.asarray(logits, np.float64))
        elem = None if where is None else jnp.broadcast_to(where.reshape(*rows, -1), z64.shape)
        row = True if elem is None else jnp.any(elem, axis=-1)
        oracle_kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 30.0, "where": elem}
        want = jax.grad(lambda z: jnp.where(row, jnp_oracle(z, labels, **oracle_kw), 0.0).sum())
        want = want(z64)
    # float32 internals; bf16 rounds only the returned gradient (2**-8 relative).
    tol = {jnp.float32: 1e-6, jnp.bfloat16: 2**-8}[dtype] * float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(want), rtol=0, atol=tol)


def test_bf16_uses_float32_internals():
    logits, labels = rand(2, (16,), 300)
    lb = logits.astype(jnp.bfloat16)
    out = ce(lb, labels)
    assert out.dtype == jnp.bfloat16
    want = oracle(np.asarray(lb, np.float64), np.asarray(labels))
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2**-7)
    g = jax.grad(lambda z: ce(z, labels).astype(jnp.float32).sum())(lb)
    assert g.dtype == jnp.bfloat16
    g_ref = jax.grad(lambda z: optax_ce(z, labels).sum())(jnp.asarray(lb, jnp.float32))
    np.testing.assert_allclose(np.asarray(g, np.float32), g_ref, atol=2**-8)


@pytest.mark.parametrize("dtype,big", [(jnp.float32, 1e4), (jnp.bfloat16, 3e4)])
def test_extreme_logits_are_finite_and_correct(dtype, big):
    logits = jnp.array([[big, -big, 0.0], [-big, -big, big], [big, big, -big]], dtype)
    labels = jnp.array([1, 2, 0])
    out = ce(logits, labels, z_loss=1e-4, label_smoothing=0.1)
    want = oracle(
        np.asarray(logits, np.float64), np.asarray(labels), z_loss=1e-4, label_smoothing=0.1
    )
    # float32 statistics of exactly representable inputs; bf16 output rounding (2**-7).
    rtol = {jnp.float32: 1e-6, jnp.bfloat16: 2**-7}[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=rtol)
    g = jax.grad(lambda z: ce(z, labels).astype(jnp.float32).sum())(logits)
    assert np.isfinite(np.asarray(g, np.float32)).all()
    np.testing.assert_allclose(np.asarray(g, np.float32)[0], [1.0, -1.0, 0.0], atol=1e-6)


def test_bad_input():
    logits, labels = rand(0, (4,), 5)
    with pytest.raises(TypeError, match="`logits` must have a floating dtype"):
        ce(labels, labels)
    with pytest.raises(TypeError, match="`labels` must have an integer dtype"):
        ce(logits, logits[:, 0])
    with pytest.raises(ValueError, match=r"`labels` must have shape \(4,\)"):
        ce(logits, labels[:3])
    with pytest.raises(ValueError, match=r"`label_smoothing` must be in \[0.0, 1.0\), got 1.5"):
        ce(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"`where` must have shape \(4,\) or \(4, 5\)"):
        ce(logits, labels, where=jnp.ones((5,), bool))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 5\); got 7 at index \(2,\)"):
        ce(logits, labels.at[2].set(7))
    with pytest.raises(ValueError, match="`axis`=3 is out of range"):
        ce(logits, labels, axis=3)


def test_out_of_range_label_is_nan_under_jit_and_ignored_label_is_not():
    logits, labels = rand(0, (4,), 5)
    out = np.asarray(jax.jit(ce)(logits, labels.at[1].set(5).at[2].set(-1)))
    assert np.isnan(out[1]) and np.isnan(out[2]) and np.isfinite(out[[0, 3]]).all()
    out = jax.jit(functools.partial(ce, ignore_index=-1))(logits, labels.at[2].set(-1))
    assert float(out[2]) == 0.0


def test_nan_propagates():
    logits, labels = rand(0, (4,), 5)
    out = np.asarray(ce(logits.at[1, 3].set(jnp.nan), labels))
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2, 3]]).all()


def test_vmap_and_no_retrace():
    logits, labels = rand(4, (3, 6), 7)
    np.testing.assert_allclose(jax.vmap(ce)(logits, labels), ce(logits, labels), rtol=1e-6)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(z, y):
        return ce(z, y, label_smoothing=0.1)

    for _ in range(3):
        f(logits, labels)


# Shape classes (one row, one of several classes, unaligned sizes): the jitted loss
# compiles once per class, so examples cost milliseconds and their number is the
# hypothesis profile's (tests/conftest.py). Values and masks vary freely.
_ce_where_jit = jax.jit(functools.partial(ce, label_smoothing=0.1, z_loss=1e-3))


@given(
    shape=st.sampled_from([(1, 2), (6, 2), (5, 7), (3, 40)]),
    seed=st.integers(0, 2**16),
    mask_p=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
)
def test_property_masked_equals_subset(shape, seed, mask_p):
    logits, labels = rand(seed, shape[:1], shape[1])
    where = np.random.default_rng(seed).random(shape[0]) < mask_p
    full = np.asarray(_ce_where_jit(logits, labels, where=jnp.asarray(where)))
    np.testing.assert_array_equal(full[~where], 0.0)
    # The included rows are the loss of those rows alone (float64 oracle).
    want = oracle(logits[where], np.asarray(labels)[where], label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(full[where], want, rtol=1e-5, atol=1e-6)


def jnp_oracle(z, labels, *, label_smoothing=0.0, z_loss=0.0, softcap=None, where=None):
    """Plain-JAX definition (differentiable by ordinary autodiff), class axis last."""
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    include = jnp.ones(z.shape, bool) if where is None else where
    lse = jax.nn.logsumexp(jnp.where(include, z, -jnp.inf), axis=-1)
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    count = jnp.sum(include, axis=-1, keepdims=True, dtype=z.dtype)
    target = (1 - label_smoothing) * onehot + jnp.where(include, label_smoothing / count, 0.0)
    return lse - jnp.sum(target * z, axis=-1) + z_loss * lse**2


HYPER = {"label_smoothing": 0.2, "z_loss": 0.05, "logit_softcap": 2.5}
FORWARD_CASES = [{}, HYPER, {**HYPER, "per_element_where": True}]


@pytest.mark.parametrize("kw", FORWARD_CASES)
def test_forward_mode_matches_float64_oracle(kw):
    kw = dict(kw)
    rng = np.random.default_rng(11)
    where = None
    if kw.pop("per_element_where", False):
        where = jnp.asarray(rng.random((3, 6)) > 0.3).at[:, 0].set(True)
    api_kw = dict(kw, where=where)
    oracle_kw = {("softcap" if k == "logit_softcap" else k): v for k, v in kw.items()}
    labels = jnp.asarray([0, 3, 5])
    with jax.enable_x64(True):
        z = jnp.asarray(rng.normal(size=(3, 6)) * 2, jnp.float64)
        dz = jnp.asarray(rng.normal(size=(3, 6)), jnp.float64)

        def f(x):
            return ce(x, labels, **api_kw)

        def g(x):
            return jnp_oracle(x, labels, **oracle_kw, where=where)

        # float64 throughout: agreement to ~1e-10 is expected, 1e-9 leaves margin.
        tol = {"rtol": 1e-9, "atol": 1e-9}
        for transform in (
            lambda h: jax.jit(lambda x: jax.jvp(h, (x,), (dz,))[1]),
            jax.jacfwd,
            lambda h: jax.hessian(lambda x: h(x).sum()),
        ):
            np.testing.assert_allclose(jax.jit(transform(f))(z), jax.jit(transform(g))(z), **tol)
        check_grads(jax.jit(f), (z,), order=2)  # default modes: ("fwd", "rev")


def test_forward_mode_in_float32_and_bf16():
    logits, labels = rand(12, (4,), 9)
    dz = jnp.asarray(np.random.default_rng(13).normal(size=logits.shape), jnp.float32)
    want = jax.jvp(lambda x: optax_ce(x, labels), (logits,), (dz,))[1]
    got = jax.jvp(lambda x: ce(x, labels), (logits,), (dz,))[1]
    # float32 vs float32 with a different summation order: a few ulp of the row sums.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    lb, db = logits.astype(jnp.bfloat16), dz.astype(jnp.bfloat16)
    out, out_dot = jax.jvp(lambda x: ce(x, labels), (lb,), (db,))
    assert out.dtype == out_dot.dtype == jnp.bfloat16
    want = jax.jvp(
        lambda x: optax_ce(x, labels), (lb.astype(jnp.float32),), (db.astype(jnp.float32),)
    )
    # computed in float32 from bf16 inputs; only the final cast to bf16 rounds (2**-8).
    np.testing.assert_allclose(np.asarray(out_dot, np.float32), want[1], rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("name", sorted(HYPER))
@pytest.mark.parametrize("per_element_where", [False, True])
def test_hyperparameter_gradients_match_finite_differences(name, per_element_where):
    rng = np.random.default_rng(14)
    where = jnp.asarray(rng.random((5, 7)) > 0.3).at[:, 2].set(True) if per_element_where else None
    labels = jnp.asarray([2, 0, 6, 2, 1])
    with jax.enable_x64(True):
        z = jnp.asarray(rng.normal(size=(5, 7)) * 3, jnp.float64)

        def total(h):
            return ce(z, labels, where=where, **{**HYPER, name: h}).sum()

        h, eps = HYPER[name], 1e-5
        value = jax.jit(total)
        fd = (value(h + eps) - value(h - eps)) / (2 * eps)
        grad = jax.jit(jax.grad(total))(h)
        # Central differences in float64 with eps=1e-5: error ~eps**2 * f''' + 1e-16 / eps.
        np.testing.assert_allclose(grad, fd, rtol=1e-7)
        assert abs(float(fd)) > 1e-3  # the derivative checked is not trivially zero
        # Forward mode agrees too.
        tangent = jax.jit(lambda h: jax.jvp(total, (h,), (jnp.ones_like(h),))[1])(h)
        np.testing.assert_allclose(tangent, grad, rtol=1e-12)
