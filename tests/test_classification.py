"""Tests for fusedloss.classification.

Parity with optax (values and gradients), float64 NumPy oracles written here, gradient
checks by finite differences, jit/vmap, input validation, masking, NaN and low
precision.

Speed: XLA compiles every eager op separately, so numeric checks run through one
``jax.jit`` per case (one compilation), inputs are built in NumPy, and the eager
tests share a few shapes so their per-op compilations are cached.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from fusedloss import classification as cls

RTOL = 1e-5
ATOL = 1e-6
OL = optax.losses


# ----------------------------------------------------------------------------------
# Inputs and helpers.
# ----------------------------------------------------------------------------------


def _normal(rng, shape, scale=2.0, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def _probs(rng, shape, axis=-1, dtype=jnp.float32):
    p = rng.gamma(1.0, size=shape)
    return jnp.asarray(p / p.sum(axis=axis, keepdims=True), dtype)


def _uniform(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.random(size=shape), dtype)


def _bits(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.integers(0, 2, size=shape), dtype)


def _signs(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.choice([-1.0, 1.0], size=shape), dtype)


def _classes(rng, shape, num_classes):
    return jnp.asarray(rng.integers(0, num_classes, size=shape), jnp.int32)


def _mask(rng, shape, p=0.7):
    return jnp.asarray(rng.random(size=shape) < p)


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol
    )


def _sum_of(fn, **kwargs):
    return lambda *args: jnp.sum(fn(*args, **kwargs))


def _assert_optax_parity(
    ours, theirs, args, kwargs=None, argnums=(0,), theirs_kwargs=None, excluded=None
):
    """Values and gradients (of the sum, w.r.t. ``argnums``) equal optax's.

    Both sides are traced into one jitted function (one compilation per case).
    optax mixes dtypes internally, which the strict promotion of conftest.py rejects,
    so only optax's part is traced under standard promotion. ``excluded`` (a mask of
    the first argument's shape) marks entries that take no part in the loss: there
    our gradients must be exactly 0, whatever optax's (it gives NaN label gradients
    at masked-out classes). Returns our gradients.
    """
    kwargs = kwargs or {}
    theirs_kwargs = kwargs if theirs_kwargs is None else theirs_kwargs

    def both(*a):
        value = ours(*a, **kwargs)
        grads = jax.grad(_sum_of(ours, **kwargs), argnums=argnums)(*a)
        with jax.numpy_dtype_promotion("standard"):
            expected = theirs(*a, **theirs_kwargs)
            expected_grads = jax.grad(_sum_of(theirs, **theirs_kwargs), argnums=argnums)(*a)
        return value, grads, expected, expected_grads

    value, grads, expected, expected_grads = jax.jit(both)(*args)
    assert value.shape == expected.shape
    assert value.dtype == args[0].dtype
    _close(value, expected)
    for i, grad, expected_grad in zip(argnums, grads, expected_grads, strict=True):
        assert grad.shape == args[i].shape
        if excluded is not None:
            assert (np.asarray(grad)[excluded] == 0).all()
            grad = np.where(excluded, 0.0, grad)
            expected_grad = np.where(excluded, 0.0, expected_grad)
        _close(grad, expected_grad)
    return grads


# ----------------------------------------------------------------------------------
# float64 NumPy oracles (independent of the code under test).
# ----------------------------------------------------------------------------------


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_bce(x, y):
    return -y * np_log_sigmoid(x) - (1.0 - y) * np_log_sigmoid(-x)


def np_focal(x, y, alpha=None, gamma=2.0):
    p = 1.0 / (1.0 + np.exp(-x))
    p_t = y * p + (1.0 - y) * (1.0 - p)
    loss = (1.0 - p_t) ** gamma * np_bce(x, y)
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return loss


def np_softmax_ce(x, y, axes, mask, epsilon=None):
    """Soft-label CE over ``axes`` restricted to ``mask`` (+ poly term); empty rows: 0."""
    xm = np.where(mask, x, -np.inf)
    m = np.max(xm, axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        lse = m + np.log(np.sum(np.exp(xm - m), axis=axes, keepdims=True))
    log_p = np.where(mask, x - lse, 0.0)
    ce = -np.sum(np.where(mask, y * log_p, 0.0), axis=axes)
    if epsilon is None:
        return ce
    p = np.where(mask, np.exp(log_p), 0.0)
    return ce + epsilon * np.sum(np.where(mask, y * (1.0 - p), 0.0), axis=axes)


def np_safe_ce(x, y):
    m = x.max(-1, keepdims=True)
    log_p = x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))
    return -np.sum(np.where(y != 0, y * np.where(y != 0, log_p, 0.0), 0.0), axis=-1)


def np_sparsemax(z):
    out = np.zeros_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        u = np.sort(z[idx])[::-1]
        css = np.cumsum(u)
        k = max(j for j in range(1, len(u) + 1) if 1.0 + j * u[j - 1] > css[j - 1])
        out[idx] = np.maximum(z[idx] - (css[k - 1] - 1.0) / k, 0.0)
    return out


def np_sparse_plus(x):
    return np.where(x <= -1, 0.0, np.where(x >= 1, x, (x + 1.0) ** 2 / 4.0))


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


# ----------------------------------------------------------------------------------
# Parity with optax.
# ----------------------------------------------------------------------------------

_EXTREME_LOGITS = np.array([100.0, -100.0, 75.0, -75.0, 50.0, -50.0])
_EXTREME_LABELS = np.array([0.9, 0.1, 0.8, 0.2, 1.0, 0.0])

# (name, ours, optax, make(rng) -> args, kwargs, argnums)
ELEMENTWISE_CASES = [
    (
        "bce_soft",
        cls.sigmoid_binary_cross_entropy,
        OL.sigmoid_binary_cross_entropy,
        lambda r: (_normal(r, (2, 3, 4)), _uniform(r, (2, 3, 4))),
        {},
        (0, 1),
    ),
    (
        "focal_default",
        cls.sigmoid_focal_loss,
        OL.sigmoid_focal_loss,
        lambda r: (_normal(r, (3, 4)), _bits(r, (3, 4))),
        {},
        (0,),
    ),
    (
        "focal_alpha_gamma",
        cls.sigmoid_focal_loss,
        OL.sigmoid_focal_loss,
        lambda r: (_normal(r, (5,)), _bits(r, (5,))),
        {"alpha": 0.25, "gamma": 0.5},
        (0, 1),
    ),
    (
        "focal_soft",
        cls.sigmoid_focal_loss,
        OL.sigmoid_focal_loss,
        lambda r: (_normal(r, (2, 3, 4)), _uniform(r, (2, 3, 4))),
        {"alpha": 0.7, "gamma": 1.5},
        (0, 1),
    ),
    (
        # Saturated logits with gamma < 1: finite values and gradients (log-space).
        "focal_extreme_logits",
        cls.sigmoid_focal_loss,
        OL.sigmoid_focal_loss,
        lambda r: (jnp.asarray(_EXTREME_LOGITS, jnp.float32), jnp.asarray(_EXTREME_LABELS)),
        {"gamma": 0.5},
        (0,),
    ),
    (
        "hinge",
        cls.hinge_loss,
        OL.hinge_loss,
        lambda r: (_normal(r, (3, 4)), _signs(r, (3, 4))),
        {},
        (0, 1),
    ),
    (
        "perceptron",
        cls.perceptron_loss,
        OL.perceptron_loss,
        lambda r: (_normal(r, (2, 3, 4)), _signs(r, (2, 3, 4))),
        {},
        (0, 1),
    ),
    (
        "sparsemax",
        cls.sparsemax_loss,
        OL.sparsemax_loss,
        lambda r: (_normal(r, (3, 4), scale=1.5), _classes(r, (3, 4), 2)),
        {},
        (0,),
    ),
]


@pytest.mark.parametrize(
    ("ours", "theirs", "make", "kwargs", "argnums"),
    [case[1:] for case in ELEMENTWISE_CASES],
    ids=[case[0] for case in ELEMENTWISE_CASES],
)
def test_elementwise_parity_with_optax(ours, theirs, make, kwargs, argnums):
    args = make(np.random.default_rng(0))
    grads = _assert_optax_parity(ours, theirs, args, kwargs, argnums)
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("ours", "theirs", "shape"),
    [
        (cls.multiclass_hinge_loss, OL.multiclass_hinge_loss, (2, 3, 4)),
        (cls.multiclass_perceptron_loss, OL.multiclass_perceptron_loss, (6, 5)),
        (cls.multiclass_sparsemax_loss, OL.multiclass_sparsemax_loss, (2, 3, 4)),
    ],
    ids=["hinge", "perceptron", "sparsemax"],
)
def test_multiclass_parity_with_optax(ours, theirs, shape):
    rng = np.random.default_rng(1)
    scores = _normal(rng, shape, scale=1.0)
    labels = _classes(rng, shape[:-1], shape[-1])

    # optax's multiclass_sparsemax_loss only takes [batch, classes]: compare on the
    # flattened batch (ours takes any leading axes).
    def theirs_flat(s, y):
        return theirs(s.reshape(-1, s.shape[-1]), y.reshape(-1)).reshape(y.shape)

    _assert_optax_parity(ours, theirs_flat, (scores, labels))


def test_integer_scores_give_optax_values_in_float32():
    scores = jnp.array([[2, -1, 0], [0, 3, 1]], jnp.int32)
    targets = jnp.array([[1, -1, 1], [-1, 1, 1]], jnp.int32)
    labels = jnp.array([0, 2])

    def both(s, t, y):
        ours = (cls.hinge_loss(s, t), cls.perceptron_loss(s, t), cls.multiclass_hinge_loss(s, y))
        with jax.numpy_dtype_promotion("standard"):
            theirs = (OL.hinge_loss(s, t), OL.perceptron_loss(s, t), OL.multiclass_hinge_loss(s, y))
        return ours, theirs

    ours, theirs = jax.jit(both)(scores, targets, labels)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == jnp.float32
        _close(a, b)
    _close(ours[0], [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))


def _batch_shape(shape, axis):
    axes = _axes(axis, len(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _softmax_inputs(seed, shape, axis, where_kind):
    rng = np.random.default_rng(seed)
    logits = _normal(rng, shape)
    labels = _probs(rng, shape, axis=_axes(axis, len(shape)))
    if where_kind is None:
        where = None
    elif where_kind == "batch":
        where = _mask(rng, _batch_shape(shape, axis))
    else:
        where = _mask(rng, shape)
    return logits, labels, where


def _full_mask(where, shape, axis):
    if where is None:
        return np.ones(shape, bool)
    where = np.asarray(where)
    if where.shape == shape:
        return where
    return np.broadcast_to(np.expand_dims(where, _axes(axis, len(shape))), shape)


def _excluded(where, shape, axis):
    return None if where is None else ~_full_mask(where, shape, axis)


# (shape, axis, where kind); "batch" = per example (logits without `axis`).
SOFTMAX_CASES = [
    ((4, 6), -1, None),
    ((4, 6), -1, "batch"),
    ((4, 6), 0, "batch"),
    ((2, 3, 5), 1, "full"),
    ((2, 3, 5), (1, 2), "batch"),
    ((2, 3, 5), None, "full"),
]


@pytest.mark.parametrize(("shape", "axis", "where_kind"), SOFTMAX_CASES, ids=str)
def test_softmax_cross_entropy_parity_with_optax(shape, axis, where_kind):
    logits, labels, where = _softmax_inputs(2, shape, axis, where_kind)
    _assert_optax_parity(
        cls.softmax_cross_entropy,
        OL.softmax_cross_entropy,
        (logits, labels),
        {"axis": axis, "where": where},
        (0, 1),
        excluded=_excluded(where, shape, axis),
    )


@pytest.mark.parametrize(
    ("shape", "axis", "where_kind", "epsilon"),
    [
        ((4, 6), -1, None, 2.0),
        ((4, 6), -1, "full", -1.0),
        ((4, 6), 0, "batch", 0.5),
        ((2, 3, 5), None, "full", 0.5),
    ],
    ids=str,
)
def test_poly_loss_parity_with_optax(shape, axis, where_kind, epsilon):
    logits, labels, where = _softmax_inputs(3, shape, axis, where_kind)
    kwargs = {"epsilon": epsilon, "axis": axis, "where": where}
    # optax takes a per-element mask only; ours also takes a per-example one.
    full = None if where is None else jnp.asarray(_full_mask(where, shape, axis))
    _assert_optax_parity(
        cls.poly_loss_cross_entropy,
        OL.poly_loss_cross_entropy,
        (logits, labels),
        kwargs,
        (0, 1),
        dict(kwargs, where=full),
        excluded=_excluded(where, shape, axis),
    )


def test_safe_softmax_cross_entropy_parity_with_optax():
    rng = np.random.default_rng(4)
    args = (_normal(rng, (2, 3, 5)), _probs(rng, (2, 3, 5)))
    _assert_optax_parity(
        cls.safe_softmax_cross_entropy, OL.safe_softmax_cross_entropy, args, {}, (0, 1)
    )


def test_safe_softmax_cross_entropy_minus_inf_logits_parity():
    logits = jnp.array([[-jnp.inf, 1.0, 2.0], [0.5, -jnp.inf, -jnp.inf]])
    labels = jnp.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    grads = _assert_optax_parity(
        cls.safe_softmax_cross_entropy, OL.safe_softmax_cross_entropy, (logits, labels), {}, (0, 1)
    )
    assert np.isfinite(grads[0]).all()  # logits gradient (the labels one is inf at -inf)
    both = jax.jit(
        lambda x, y: (cls.safe_softmax_cross_entropy(x, y), cls.softmax_cross_entropy(x, y))
    )
    safe, unsafe = both(logits, labels)
    _close(safe, [-0.5 * np.log(0.2689414213699951) - 0.5 * np.log(0.7310585786300049), 0.0])
    assert np.isnan(unsafe).all()  # 0 * log(0), as in optax


def _first_per_row(shape, axis):
    """A mask with True at the first class of every row (rows: labels without axis)."""
    idx = np.indices(shape)
    first = np.ones(shape, bool)
    for a in _axes(axis, len(shape)):
        first &= idx[a] == 0
    return first


@pytest.mark.parametrize(
    ("shape", "axis", "masked"),
    [((4, 6), -1, False), ((4, 6), 0, True), ((2, 3, 5), (1, 2), True), ((2, 3, 5), None, False)],
    ids=str,
)
def test_smooth_labels_parity_with_optax(shape, axis, masked):
    rng = np.random.default_rng(5)
    labels = _probs(rng, shape, axis=_axes(axis, len(shape)))
    where = None
    if masked:  # at least one class per row: optax divides by the count
        where = jnp.asarray((rng.random(shape) < 0.6) | _first_per_row(shape, axis))
    kwargs = {"axis": axis, "where": where}
    args = (labels, jnp.float32(0.15))
    _assert_optax_parity(cls.smooth_labels, OL.smooth_labels, args, kwargs, (0, 1))


def test_nll_of_log_softmax_equals_optax_integer_cross_entropy():
    rng = np.random.default_rng(6)
    logits, labels = _normal(rng, (2, 3, 4, 5)), _classes(rng, (2, 3), 20)

    def both(x, y):
        log_probs = jax.nn.log_softmax(x, axis=(2, 3))
        ours = [cls.nll_loss(log_probs, y, axis=ax) for ax in [(2, 3), (3, 2)]]
        with jax.numpy_dtype_promotion("standard"):
            theirs = [
                OL.softmax_cross_entropy_with_integer_labels(x, y, axis=ax)
                for ax in [(2, 3), (3, 2)]
            ]
        return ours, theirs

    ours, theirs = jax.jit(both)(logits, labels)
    # A tuple axis takes the class axes in the order given, as optax does.
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    assert not np.allclose(ours[0], ours[1])


# ----------------------------------------------------------------------------------
# Values against float64 NumPy oracles.
# ----------------------------------------------------------------------------------


def test_binary_losses_match_numpy_oracle():
    rng = np.random.default_rng(7)
    x, soft, hard, t = (
        _normal(rng, (3, 4)),
        _uniform(rng, (3, 4)),
        _bits(rng, (3, 4)),
        _signs(rng, (3, 4)),
    )

    @jax.jit
    def run(x, soft, hard, t):
        return (
            cls.sigmoid_binary_cross_entropy(x, soft),
            cls.sigmoid_focal_loss(x, hard),
            cls.sigmoid_focal_loss(x, soft, alpha=0.3, gamma=0.7),
            cls.hinge_loss(x, t),
            cls.perceptron_loss(x, t),
            cls.sparsemax_loss(x, hard),
        )

    out = run(x, soft, hard, t)
    xs, ys, yh, ts = _f64(x, soft, hard, t)
    expected = (
        np_bce(xs, ys),
        np_focal(xs, yh),
        np_focal(xs, ys, 0.3, 0.7),
        np.maximum(0.0, 1.0 - xs * ts),
        np.maximum(0.0, -xs * ts),
        np_sparse_plus(np.where(yh != 0, -xs, xs)),
    )
    for a, b in zip(out, expected, strict=True):
        _close(a, b, rtol=2e-5)


def test_multiclass_losses_match_numpy_oracle():
    rng = np.random.default_rng(8)
    s, y = _normal(rng, (2, 3, 6), scale=1.0), _classes(rng, (2, 3), 6)

    @jax.jit
    def run(s, y):
        return (
            cls.multiclass_hinge_loss(s, y),
            cls.multiclass_perceptron_loss(s, y),
            cls.multiclass_sparsemax_loss(s, y),
            jax.grad(_sum_of(cls.multiclass_sparsemax_loss))(s, y),
        )

    hinge, perceptron, sparsemax, grad = run(s, y)
    (s64,) = _f64(s)
    one_hot = np.eye(6)[np.asarray(y)]
    s_y = np.sum(s64 * one_hot, -1)
    p = np_sparsemax(s64)
    _close(hinge, np.max(s64 + 1.0 - one_hot, -1) - s_y, 2e-5)
    _close(perceptron, np.max(s64, -1) - s_y, 2e-5)
    _close(sparsemax, np.sum(p * s64, -1) - s_y + 0.5 * (1.0 - np.sum(p * p, -1)), 2e-5)
    # Fenchel-Young gradient: sparsemax(scores) - one_hot(labels).
    _close(grad, p - one_hot, 2e-5)


def test_softmax_family_matches_numpy_oracle():
    cases = [((4, 6), -1, "batch"), ((4, 6), 0, "full"), ((2, 3, 5), (1, 2), "full")]
    inputs = [_softmax_inputs(9, *case) for case in cases]

    @jax.jit
    def run(inputs):
        return [
            (
                cls.softmax_cross_entropy(x, y, axis, w),
                cls.poly_loss_cross_entropy(x, y, epsilon=1.5, axis=axis, where=w),
            )
            for (x, y, w), (_, axis, _) in zip(inputs, cases, strict=True)
        ]

    for (ce, poly), (x, y, w), (shape, axis, _) in zip(run(inputs), inputs, cases, strict=True):
        x64, y64 = _f64(x, y)
        axes, full = _axes(axis, len(shape)), _full_mask(w, shape, axis)
        _close(ce, np_softmax_ce(x64, y64, axes, full))
        _close(poly, np_softmax_ce(x64, y64, axes, full, epsilon=1.5))


def test_safe_softmax_cross_entropy_matches_numpy_oracle():
    rng = np.random.default_rng(10)
    logits = np.array(_normal(rng, (3, 5)))
    logits[0, 1] = -np.inf
    labels = np.array(_probs(rng, (3, 5)))
    labels[0] = [0.5, 0.0, 0.5, 0.0, 0.0]
    out = jax.jit(cls.safe_softmax_cross_entropy)(logits, labels)
    _close(out, np_safe_ce(*_f64(logits, labels)))


def test_nll_loss_matches_numpy_oracle():
    rng = np.random.default_rng(11)
    log_probs = np.asarray(_normal(rng, (4, 6)), np.float32)
    labels = np.array([2, -100, 5, 9], np.int32)  # ignored at 1, masked out at 3
    where = np.array([True, True, True, False])
    cols = np.array([3, 0, 1, 2, 3, 0], np.int32)

    @jax.jit
    def run(lp, y, w, c):
        return cls.nll_loss(lp, y, where=w, ignore_index=-100), cls.nll_loss(lp, c, axis=0)

    out, out_axis0 = run(log_probs, labels, where, cols)
    lp = log_probs.astype(np.float64)
    _close(out, [-lp[0, 2], 0.0, -lp[2, 5], 0.0])
    _close(out_axis0, -lp[cols, np.arange(6)])


def test_perplexity_matches_numpy_oracle():
    rng = np.random.default_rng(12)
    losses = rng.random((3, 5)).astype(np.float32) * 3.0
    where = rng.random((3, 5)) < 0.7
    where[0, 0] = True
    weights = (rng.random((3, 5)) + 0.5).astype(np.float32)

    @jax.jit
    def run(lo, m, w):
        return cls.perplexity(lo), cls.perplexity(lo, m), cls.perplexity(lo, m, weights=w)

    plain, masked, weighted = run(losses, where, weights)
    lo, w = _f64(losses, weights)
    assert plain.shape == () and plain.dtype == jnp.float32
    _close(plain, np.exp(lo.mean()))
    _close(masked, np.exp(lo[where].mean()))
    _close(weighted, np.exp(np.sum(w * lo * where) / np.sum(w * where)))


def test_smooth_labels_matches_numpy_oracle():
    rng = np.random.default_rng(13)
    labels = np.asarray(_probs(rng, (3, 5)))
    where = np.array([[True] * 5, [True, False, True, False, False], [False] * 5])
    alpha = np.array([[0.0], [0.5], [1.0]], np.float32)  # per row: class axis of size 1

    @jax.jit
    def run(y, w, a):
        return (
            cls.smooth_labels(y, 0.2),
            cls.smooth_labels(y, 0.2, where=w),
            cls.smooth_labels(y, a),
        )

    plain, masked, per_row = run(labels, where, alpha)
    y = labels.astype(np.float64)
    _close(plain, 0.8 * y + 0.2 / 5)
    count = where.sum(-1, keepdims=True)
    _close(masked, np.where(count > 0, 0.8 * y + 0.2 / np.maximum(count, 1), 0.0))
    _close(per_row, (1 - alpha) * y + alpha / 5)


# ----------------------------------------------------------------------------------
# Finite-difference gradient checks (float64), grouped to share compilations.
# ----------------------------------------------------------------------------------


def _away_from_kinks(rng, shape, levels):
    """Values near a few fixed levels, so finite differences never cross a kink."""
    return rng.choice(levels, size=shape) + rng.uniform(-0.05, 0.05, size=shape)


def _grad_group(name):
    """(f, float64 args); integer labels and masks are closed over."""
    rng = np.random.default_rng(14)
    if name == "binary":
        t = rng.choice([-1.0, 1.0], size=(3, 4))
        # x * t stays away from 0 and 1 (hinge/perceptron kinks), |x| away from 1
        # (sparsemax kinks).
        x = t * _away_from_kinks(rng, (3, 4), [-1.5, -0.5, 0.4, 2.0])
        soft = rng.uniform(0.1, 0.9, size=(3, 4))
        bits = jnp.asarray(rng.integers(0, 2, size=(3, 4)))

        def f(x, soft, t):
            return jnp.stack(
                [
                    cls.sigmoid_binary_cross_entropy(x, soft),
                    cls.sigmoid_focal_loss(x, soft, alpha=0.3, gamma=1.5),
                    cls.hinge_loss(x, t),
                    cls.perceptron_loss(x, t),
                    cls.sparsemax_loss(x, bits),
                ]
            )

        return f, (x, soft, t)
    if name == "multiclass":
        labels = jnp.asarray(rng.integers(0, 5, size=(4,)))

        def f(s):
            return jnp.stack(
                [
                    cls.multiclass_hinge_loss(s, labels),
                    cls.multiclass_perceptron_loss(s, labels),
                    cls.multiclass_sparsemax_loss(s, labels),
                ]
            )

        return f, (rng.normal(size=(4, 5)),)
    elem_mask = rng.random((4, 5)) < 0.7
    elem_mask[2] = False
    elem_mask[0, 0] = True
    elem_mask = jnp.asarray(elem_mask)
    logits, probs = rng.normal(size=(4, 5)) * 2.0, rng.dirichlet(np.ones(5), size=4)
    if name == "softmax":
        cols = jnp.array([True, False, True, True, False])

        def f(x, y):
            return jnp.concatenate(
                [
                    cls.softmax_cross_entropy(x, y, where=elem_mask),
                    cls.softmax_cross_entropy(x, y, axis=0, where=cols),
                    cls.safe_softmax_cross_entropy(x, y),
                    cls.poly_loss_cross_entropy(x, y, epsilon=1.5, where=elem_mask),
                ]
            )

        return f, (logits, probs)
    labels = jnp.array([1, 4, 0, -100])
    rows = jnp.array([True, False, True, True])
    token_mask = jnp.asarray(rng.random((3, 4)) < 0.7)

    def f(lp, y, alpha, losses, weights):
        return jnp.concatenate(
            [
                cls.nll_loss(lp, labels, where=rows, ignore_index=-100),
                cls.smooth_labels(y, alpha, where=elem_mask).ravel(),
                cls.perplexity(losses, token_mask)[None],
                cls.perplexity(losses, token_mask, weights=weights)[None],
            ]
        )

    losses, weights = rng.random((3, 4)) * 2.0, rng.random((3, 4)) + 0.5
    return f, (logits, probs, np.float64(0.1), losses, weights)


@pytest.mark.parametrize("name", ["binary", "multiclass", "softmax", "nll_smooth_perplexity"])
def test_check_grads_float64(name):
    with jax.enable_x64(True):
        fn, args = _grad_group(name)
        args = tuple(jnp.asarray(a, jnp.float64) for a in args)
        jitted = jax.jit(fn)
        out = jitted(*args)
        assert out.dtype == jnp.float64 and np.isfinite(out).all() and (out != 0).any()
        check_grads(jitted, args, order=1)


@pytest.mark.parametrize(
    "name", ["softmax_cross_entropy", "poly_loss_cross_entropy", "safe_softmax_cross_entropy"]
)
def test_empty_class_axis_matches_optax(name):
    logits = jnp.zeros((2, 0), jnp.float32)
    want = np.asarray(getattr(optax.losses, name)(logits, logits))
    np.testing.assert_array_equal(want, [0.0, 0.0])
    np.testing.assert_array_equal(getattr(cls, name)(logits, logits), want)
    np.testing.assert_array_equal(jax.jit(getattr(cls, name))(logits, logits), want)
    if name != "safe_softmax_cross_entropy":
        where = jnp.zeros((2, 0), bool)
        np.testing.assert_array_equal(getattr(cls, name)(logits, logits, where=where), want)


# ----------------------------------------------------------------------------------
# jit / vmap / tracing, bf16, NaN: one standard call per public function.
# ----------------------------------------------------------------------------------


def _calls(rng, dtype=jnp.float32):
    """name -> (fn(*arrays), arrays); every array has a leading batch axis of 3."""
    x = _normal(rng, (3, 4), dtype=dtype)
    logits_np = rng.normal(size=(3, 5)) * 2.0
    logits = jnp.asarray(logits_np, dtype)
    probs = _probs(rng, (3, 5), dtype=dtype)
    mask_np = rng.random((3, 5)) < 0.7
    mask_np[:, 0] = True
    mask = jnp.asarray(mask_np)
    labels = _classes(rng, (3,), 5)
    return {
        "sigmoid_binary_cross_entropy": (
            cls.sigmoid_binary_cross_entropy,
            [x, _uniform(rng, (3, 4), dtype)],
        ),
        "sigmoid_focal_loss": (
            lambda a, b: cls.sigmoid_focal_loss(a, b, alpha=0.25, gamma=1.5),
            [x, _bits(rng, (3, 4), dtype)],
        ),
        "hinge_loss": (cls.hinge_loss, [x, _signs(rng, (3, 4), dtype)]),
        "perceptron_loss": (cls.perceptron_loss, [x, _signs(rng, (3, 4), dtype)]),
        "sparsemax_loss": (cls.sparsemax_loss, [x, _classes(rng, (3, 4), 2)]),
        "multiclass_hinge_loss": (cls.multiclass_hinge_loss, [logits, labels]),
        "multiclass_perceptron_loss": (cls.multiclass_perceptron_loss, [logits, labels]),
        "multiclass_sparsemax_loss": (cls.multiclass_sparsemax_loss, [logits, labels]),
        "softmax_cross_entropy": (
            lambda a, b, w: cls.softmax_cross_entropy(a, b, -1, w),
            [logits, probs, mask],
        ),
        "safe_softmax_cross_entropy": (cls.safe_softmax_cross_entropy, [logits, probs]),
        "poly_loss_cross_entropy": (
            lambda a, b, w: cls.poly_loss_cross_entropy(a, b, epsilon=1.5, where=w),
            [logits, probs, mask],
        ),
        "nll_loss": (
            lambda a, b: cls.nll_loss(a, b, ignore_index=-100),
            [jnp.asarray(_np_log_softmax(logits_np), dtype), labels],
        ),
        "smooth_labels": (lambda a, w: cls.smooth_labels(a, 0.1, where=w), [probs, mask]),
        "perplexity": (
            lambda a, w: cls.perplexity(a, weights=w),
            [jnp.abs(x), _uniform(rng, (3, 4), dtype)],
        ),
    }


CALL_NAMES = list(_calls(np.random.default_rng(0)))


def test_every_public_function_is_covered():
    # The integer-label CE is re-exported from _softmax_ce.py and tested there.
    assert set(cls.__all__) - {"softmax_cross_entropy_with_integer_labels"} == set(CALL_NAMES)
    assert all(callable(getattr(cls, name)) for name in cls.__all__)


@pytest.mark.parametrize("name", CALL_NAMES)
def test_jit_and_vmap_match_eager_without_retracing(name):
    chex.clear_trace_counter()
    fn, arrays = _calls(np.random.default_rng(15))[name]

    def call(*args):
        return fn(*args), jax.vmap(fn)(*args)

    jitted = jax.jit(chex.assert_max_traces(call, n=1))
    eager = fn(*arrays)
    assert np.isfinite(eager).all()
    out, batched = jitted(*arrays)
    _close(out, eager)
    if name == "perplexity":  # not row-wise (one scalar per call): per row under vmap
        losses, weights = _f64(*arrays)
        expected = np.exp((weights * losses).sum(-1) / weights.sum(-1))
    else:
        expected = eager
    _close(batched, expected)
    _, other = _calls(np.random.default_rng(16))[name]
    eager_other = fn(*other)
    assert not np.allclose(eager_other, eager)
    _close(jitted(*other)[0], eager_other)  # same shapes, new values: no second trace


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", CALL_NAMES)
def test_low_precision_in_low_precision_out(name, dtype):
    fn, arrays = _calls(np.random.default_rng(17), dtype=dtype)[name]
    out = fn(*arrays)
    assert out.dtype == dtype
    upcast = [a.astype(jnp.float32) if a.dtype == dtype else a for a in arrays]
    reference = fn(*upcast)
    assert reference.dtype == jnp.float32
    # float32 internals: only the final rounding to `dtype` separates the two.
    eps = float(jnp.finfo(dtype).eps)
    _close(out, reference, rtol=eps, atol=eps)


@pytest.mark.parametrize("name", CALL_NAMES)
def test_nan_input_propagates(name):
    fn, arrays = _calls(np.random.default_rng(18))[name]
    arrays = [jnp.ones_like(a) if a.dtype == bool else a for a in arrays]  # all included
    first = np.array(arrays[0])
    first[0] = np.nan
    out = np.asarray(fn(jnp.asarray(first), *arrays[1:]))
    if out.ndim:
        assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()
    else:  # perplexity: one scalar
        assert np.isnan(out)


# ----------------------------------------------------------------------------------
# Masks: excluded elements are not read; fully masked rows give 0 and zero gradient.
# ----------------------------------------------------------------------------------


def test_masking_equals_dropping_examples():
    rng = np.random.default_rng(19)
    logits, labels = _normal(rng, (6, 5)), _probs(rng, (6, 5))
    keep = np.array([True, False, True, True, False, True])

    @jax.jit
    def run(x, y):
        out = []
        for fn in (cls.softmax_cross_entropy, cls.poly_loss_cross_entropy):
            out.append((fn(x, y, where=jnp.asarray(keep)), fn(x[keep], y[keep])))
        return out

    for masked, dropped in run(logits, labels):
        _close(masked[keep], dropped)
        assert (masked[~keep] == 0).all() and (dropped > 0).all()


def _fully_masked_inputs():
    rng = np.random.default_rng(20)
    # NaN inputs in excluded positions must not leak either: excluded = not read.
    logits = np.array(_normal(rng, (3, 4)))
    labels = np.array(_probs(rng, (3, 4)))
    logits[1] = np.nan
    labels[1] = np.nan
    return jnp.asarray(logits), jnp.asarray(labels)


_FULL = jnp.array([[True, False, True, True], [False] * 4, [True] * 4])
_ROW = jnp.array([True, False, True])
FULLY_MASKED = {
    "softmax_per_example": (lambda x, y: cls.softmax_cross_entropy(x, y, where=_ROW), (0, 1)),
    "softmax_per_element": (lambda x, y: cls.softmax_cross_entropy(x, y, where=_FULL), (0, 1)),
    "poly_per_element": (lambda x, y: cls.poly_loss_cross_entropy(x, y, where=_FULL), (0, 1)),
    "nll": (lambda x, y: cls.nll_loss(x, jnp.array([0, 7, 3]), where=_ROW), (0,)),
    "smooth_labels": (lambda x, y: cls.smooth_labels(y, 0.1, where=_FULL), (1,)),
}


@pytest.mark.parametrize("name", FULLY_MASKED)
def test_fully_masked_rows_give_zero_and_zero_gradient(name):
    fn, argnums = FULLY_MASKED[name]
    value, grads = jax.jit(lambda x, y: (fn(x, y), jax.grad(_sum_of(fn), argnums=argnums)(x, y)))(
        *_fully_masked_inputs()
    )
    assert (value[1] == 0).all()
    assert np.isfinite(value).all() and (np.abs(value[0]) > 0).any()
    for grad in grads:
        assert (grad[1] == 0).all()
        assert np.isfinite(grad).all() and (grad[0] != 0).any()


def test_perplexity_with_nothing_included_is_one_with_zero_gradient():
    losses = jnp.array([1.0, jnp.nan, 2.0])
    value_and_grad = jax.jit(jax.value_and_grad(cls.perplexity))
    value, grad = value_and_grad(losses, jnp.zeros(3, bool))
    assert value == 1.0
    np.testing.assert_array_equal(grad, np.zeros(3))
    # Included tokens: d exp(mean) / d l_i = exp(mean) / n; the NaN is excluded.
    value, grad = value_and_grad(losses, jnp.array([True, False, True]))
    _close(value, np.exp(1.5))
    _close(grad, [np.exp(1.5) / 2, 0.0, np.exp(1.5) / 2])


def test_nll_ignore_index_and_masked_out_of_range_labels_are_not_errors():
    log_probs = jnp.log(jnp.full((3, 4), 0.25))
    labels = jnp.array([-100, 9, 2])
    out = cls.nll_loss(log_probs, labels, where=jnp.array([True, False, True]), ignore_index=-100)
    _close(out, [0.0, 0.0, np.log(4.0)])
    out_jit = jax.jit(lambda lp, y: cls.nll_loss(lp, y, ignore_index=-100))(log_probs, labels)
    assert out_jit[0] == 0 and np.isnan(out_jit[1])
    _close(out_jit[2], np.log(4.0))


# ----------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------

INT_LABEL_FNS = {
    "multiclass_hinge_loss": cls.multiclass_hinge_loss,
    "multiclass_perceptron_loss": cls.multiclass_perceptron_loss,
    "multiclass_sparsemax_loss": cls.multiclass_sparsemax_loss,
    "nll_loss": cls.nll_loss,
}


@pytest.mark.parametrize("name", INT_LABEL_FNS)
def test_out_of_range_labels_raise_eagerly_and_give_nan_under_jit(name):
    fn = INT_LABEL_FNS[name]
    scores = jnp.asarray(_np_log_softmax(np.random.default_rng(21).normal(size=(4, 5))))
    bad = jnp.array([1, 5, -1, 4])
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 5\); got 5 at index \(1,\)"):
        fn(scores, bad)
    with pytest.raises(ValueError, match=r"got -1 at index \(0,\) \(1 out-of-range"):
        fn(scores, jnp.array([-1, 0, 0, 0]))
    jitted = jax.jit(fn)
    out, good = jitted(scores, bad), jitted(scores, jnp.array([1, 0, 0, 4]))
    # -1 is not wrapped to the last class, 5 is not clipped to it: both are NaN.
    assert np.isnan(out[1]) and np.isnan(out[2])
    assert np.isfinite(good).all()
    _close(out[np.array([0, 3])], good[np.array([0, 3])])


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: cls.sigmoid_binary_cross_entropy(jnp.array([1, 2]), jnp.array([0, 1])), "logits"),
        (lambda: cls.sigmoid_focal_loss(jnp.array([1, 2]), jnp.array([0, 1])), "logits"),
        (lambda: cls.softmax_cross_entropy(jnp.ones((2, 3), int), jnp.ones((2, 3))), "logits"),
        (lambda: cls.safe_softmax_cross_entropy(jnp.ones((2, 3), int), jnp.ones((2, 3))), "logits"),
        (lambda: cls.poly_loss_cross_entropy(jnp.ones((2, 3), int), jnp.ones((2, 3))), "logits"),
        (lambda: cls.poly_loss_cross_entropy(jnp.ones((2, 3)), jnp.ones((2, 3), int)), "labels"),
        (lambda: cls.nll_loss(jnp.ones((2, 3), int), jnp.array([0, 1])), "log_probs"),
        (lambda: cls.smooth_labels(jnp.ones((2, 3), int), 0.1), "labels"),
        (lambda: cls.perplexity(jnp.array([1, 2])), "losses"),
    ],
)
def test_integer_where_floating_is_required_raises_type_error(call, name):
    with pytest.raises(TypeError, match=f"`{name}` must have a floating dtype, got int32"):
        call()


@pytest.mark.parametrize("name", INT_LABEL_FNS)
def test_float_labels_for_integer_label_functions_raise_type_error(name):
    with pytest.raises(TypeError, match="`labels` must have an integer dtype, got float32"):
        INT_LABEL_FNS[name](jnp.ones((2, 3)), jnp.array([0.0, 1.0]))


def test_other_bad_dtypes_raise_type_error():
    with pytest.raises(TypeError, match="`predictor_outputs` must have a floating or integer"):
        cls.hinge_loss(jnp.array([True]), jnp.array([1.0]))
    with pytest.raises(TypeError, match="`labels` must have a real"):
        cls.sigmoid_binary_cross_entropy(jnp.ones(2), jnp.ones(2, jnp.complex64))
    with pytest.raises(TypeError, match="`where` must be a boolean array"):
        cls.softmax_cross_entropy(jnp.ones((2, 3)), jnp.ones((2, 3)), where=jnp.ones(2))
    with pytest.raises(TypeError, match="`ignore_index` must be an int"):
        cls.nll_loss(jnp.ones((2, 3)), jnp.array([0, 1]), ignore_index=-1.0)
    with pytest.raises(TypeError, match="`weights` must have a floating dtype"):
        cls.perplexity(jnp.ones(3), weights=jnp.ones(3, int))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: cls.sigmoid_binary_cross_entropy(jnp.ones((3, 4)), jnp.ones((3, 1))),
            r"`logits` and `labels` must have the same shape, got \(3, 4\) and \(3, 1\)",
        ),
        (
            lambda: cls.hinge_loss(jnp.ones((3,)), jnp.ones(())),
            r"`predictor_outputs` and `targets` must have the same shape, got \(3,\) and \(\)",
        ),
        (
            lambda: cls.sparsemax_loss(jnp.ones((3,)), jnp.ones((4,), int)),
            r"`logits` and `labels` must have the same shape",
        ),
        (
            lambda: cls.softmax_cross_entropy(jnp.ones((2, 3)), jnp.ones((3,))),
            r"`logits` and `labels` must have the same shape, got \(2, 3\) and \(3,\)",
        ),
        (
            lambda: cls.safe_softmax_cross_entropy(jnp.ones((2, 3)), jnp.ones((2, 1))),
            r"`logits` and `labels` must have the same shape, got \(2, 3\) and \(2, 1\)",
        ),
        (
            lambda: cls.softmax_cross_entropy(
                jnp.ones((2, 3)), jnp.ones((2, 3)), where=jnp.ones((3,), bool)
            ),
            r"`where` must have shape \(2, 3\) or \(2,\), got \(3,\)",
        ),
        (
            lambda: cls.poly_loss_cross_entropy(
                jnp.ones((2, 3)), jnp.ones((2, 3)), where=jnp.ones((2, 1), bool)
            ),
            r"`where` must have shape \(2, 3\) or \(2,\), got \(2, 1\)",
        ),
        (
            lambda: cls.multiclass_hinge_loss(jnp.ones((2, 3)), jnp.array([[0], [1]])),
            r"`labels` must have shape \(2,\) \(the shape of `scores` without its last",
        ),
        (
            lambda: cls.nll_loss(jnp.ones((2, 3)), jnp.array([0, 1, 2])),
            r"`labels` must have shape \(2,\)",
        ),
        (
            lambda: cls.nll_loss(jnp.ones((2, 3)), jnp.array([0, 1]), where=jnp.ones((2, 3), bool)),
            r"`where` must have shape \(2,\), got \(2, 3\)",
        ),
        (
            lambda: cls.sigmoid_focal_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), alpha=jnp.ones(3)),
            r"`alpha` must be a scalar or have shape \(2, 3\), got \(3,\)",
        ),
        (
            lambda: cls.poly_loss_cross_entropy(
                jnp.ones((2, 3)), jnp.ones((2, 3)), epsilon=jnp.ones(3)
            ),
            r"`epsilon` must be a scalar or have shape \(2,\), got \(3,\)",
        ),
        (
            lambda: cls.smooth_labels(jnp.ones((2, 3)), 0.1, where=jnp.ones((2,), bool)),
            r"`where` must have shape \(2, 3\), got \(2,\)",
        ),
        (
            lambda: cls.softmax_cross_entropy(jnp.ones((2, 3)), jnp.ones((2, 3)), axis=2),
            r"`axis`=2 is out of range for an array of rank 2",
        ),
        (
            lambda: cls.perplexity(jnp.ones(3), where=jnp.ones(2, bool)),
            r"`where` must have shape \(3,\)",
        ),
        (
            lambda: cls.multiclass_sparsemax_loss(jnp.ones(()), jnp.array(0)),
            r"`scores` must have at least 1 dimension",
        ),
    ],
)
def test_mismatched_shapes_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------
# Property test.
# ----------------------------------------------------------------------------------


@jax.jit
def _property_run(logits, labels, where, ints):
    grad = jax.grad(_sum_of(cls.softmax_cross_entropy, where=where))(logits, labels)
    ce = cls.softmax_cross_entropy(logits, labels, where=where)
    one_hot = jax.nn.one_hot(ints, logits.shape[-1], dtype=logits.dtype)
    nll = cls.nll_loss(jax.nn.log_softmax(logits), ints)
    return ce, grad, nll, cls.softmax_cross_entropy(logits, one_hot)


# A few fixed shapes keep compilations bounded (at most four of the jitted run);
# values and masks vary freely, and each further example costs about a millisecond
# (the number of examples is the hypothesis profile's, tests/conftest.py).
@given(
    shape=st.sampled_from([(3, 1), (2, 3, 4)]),
    per_element=st.booleans(),
    p_include=st.sampled_from([0.0, 0.4, 0.8, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_softmax_family_masks_and_shapes(shape, per_element, p_include, seed):
    rng = np.random.default_rng(seed)
    logits, labels = _normal(rng, shape), _probs(rng, shape)
    where = _mask(rng, shape if per_element else shape[:-1], p=p_include)
    ints = _classes(rng, shape[:-1], shape[-1])
    ce, grad, nll, ce_one_hot = _property_run(logits, labels, where, ints)
    full = _full_mask(where, shape, -1)
    x, y = _f64(logits, labels)
    assert ce.shape == shape[:-1] and ce.dtype == jnp.float32
    _close(ce, np_softmax_ce(x, y, (len(shape) - 1,), full), rtol=2e-5)
    # Rows with nothing included are exactly 0 with zero gradient; no NaN anywhere.
    empty = ~full.any(-1)
    assert (np.asarray(ce)[empty] == 0).all()
    assert np.isfinite(grad).all() and (np.asarray(grad)[empty] == 0).all()
    assert (np.asarray(grad)[~full] == 0).all()
    # Integer labels: nll of log-softmax agrees with the one-hot cross-entropy.
    _close(nll, ce_one_hot, rtol=2e-5)
