"""Every public standard loss under every transformation: float64 values, forward mode
(``jvp``, ``jacfwd``), second derivatives, and derivatives w.r.t. traced hyperparameters.

The reference is optax's function of the same name where there is one, else a plain
JAX definition written here; both are differentiated by ordinary JAX autodiff, in
float64.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fusedloss as fl

# Public functions that are not standard losses (fused heads, objectives, ...).
NOT_STANDARD = {
    "LinearCrossEntropyAux",
    "LinearDistillationAux",
    "XlaConfig",
    "PallasGpuConfig",
    "PallasTpuConfig",
    "Transposed",
    "accumulate_gradients",
    "causal_lm_objective",
    "classification_objective",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "linear_topk_distillation_loss",
    "objectives",
    "sharded_linear_cross_entropy",
    "sharded_linear_distillation_loss",
    "sharded_linear_log_probs",
    "sharded_linear_topk_distillation_loss",
    "vocab_parallel_linear_cross_entropy",
    # The post-training objectives (tests/test_post_training.py checks their gradients).
    "post_training",
    *fl.post_training.__all__,
}
STANDARD = sorted(set(fl.__all__) - NOT_STANDARD)


def _cases():
    """name -> (ours, reference, float64 args); integer labels and masks closed over."""
    rng = np.random.default_rng(21)
    x = rng.choice([-1.6, -0.4, 0.3, 2.2], size=(3, 4)) + rng.uniform(-0.05, 0.05, (3, 4))
    signs = rng.choice([-1.0, 1.0], size=(3, 4))
    soft = rng.uniform(0.1, 0.9, size=(3, 4))
    bits = jnp.asarray(rng.integers(0, 2, size=(3, 4)))
    scores = rng.normal(size=(3, 5)) * 2.0
    labels = jnp.asarray([0, 3, 4])
    probs = rng.dirichlet(np.ones(5), size=3)
    log_probs = np.log(rng.dirichlet(np.ones(5), size=3))
    where = jnp.asarray(rng.random((3, 5)) < 0.7).at[:, 1].set(True)
    targets = rng.normal(size=(3, 4))
    o = optax.losses

    def pair(name, **kw):
        return functools.partial(getattr(fl, name), **kw), functools.partial(getattr(o, name), **kw)

    def l2_ref(params):
        return 0.5 * sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(params))

    def js_ref(lp, q):
        p = jnp.exp(lp)
        m = 0.5 * (p + q)
        return 0.5 * jnp.sum(p * (lp - jnp.log(m)) + q * (jnp.log(q) - jnp.log(m)), axis=-1)

    return {
        "sigmoid_binary_cross_entropy": (*pair("sigmoid_binary_cross_entropy"), (x, soft)),
        "sigmoid_focal_loss": (*pair("sigmoid_focal_loss", alpha=0.3, gamma=1.5), (x, soft)),
        "hinge_loss": (*pair("hinge_loss"), (x * signs, signs)),
        "perceptron_loss": (*pair("perceptron_loss"), (x * signs, signs)),
        "sparsemax_loss": (*pair("sparsemax_loss", labels=bits), (x,)),
        "multiclass_hinge_loss": (*pair("multiclass_hinge_loss", labels=labels), (scores,)),
        "multiclass_perceptron_loss": (
            *pair("multiclass_perceptron_loss", labels=labels),
            (scores,),
        ),
        "multiclass_sparsemax_loss": (
            *pair("multiclass_sparsemax_loss", labels=labels),
            (scores,),
        ),
        "softmax_cross_entropy": (*pair("softmax_cross_entropy", where=where), (scores, probs)),
        "safe_softmax_cross_entropy": (*pair("safe_softmax_cross_entropy"), (scores, probs)),
        "softmax_cross_entropy_with_integer_labels": (
            *pair("softmax_cross_entropy_with_integer_labels", labels=labels, where=where),
            (scores,),
        ),
        "poly_loss_cross_entropy": (
            *pair("poly_loss_cross_entropy", epsilon=1.5, where=where),
            (scores, probs),
        ),
        "nll_loss": (
            functools.partial(fl.nll_loss, labels=labels),
            lambda lp: -jnp.take_along_axis(lp, labels[:, None], axis=-1)[:, 0],
            (log_probs,),
        ),
        "smooth_labels": (*pair("smooth_labels", alpha=0.1), (probs,)),
        "perplexity": (fl.perplexity, lambda v: jnp.exp(jnp.mean(v)), (soft,)),
        "kl_divergence": (*pair("kl_divergence"), (log_probs, probs)),
        "kl_divergence_with_log_targets": (
            *pair("kl_divergence_with_log_targets"),
            (log_probs, np.log(probs)),
        ),
        "generalized_kl_divergence": (*pair("generalized_kl_divergence"), (log_probs, probs)),
        "jensen_shannon_divergence": (fl.jensen_shannon_divergence, js_ref, (log_probs, probs)),
        "squared_error": (*pair("squared_error"), (x, targets)),
        "l2_loss": (*pair("l2_loss"), (x, targets)),
        "absolute_error": (fl.absolute_error, lambda a, b: jnp.abs(a - b), (x, targets)),
        "huber_loss": (*pair("huber_loss", delta=0.7), (x, targets)),
        "log_cosh": (*pair("log_cosh"), (x, targets)),
        "cosine_similarity": (*pair("cosine_similarity"), (x, targets)),
        "cosine_distance": (*pair("cosine_distance"), (x, targets)),
        "l2_regularization": (fl.l2_regularization, l2_ref, ({"w": x, "b": soft[0]},)),
        "reduce_loss": (
            functools.partial(fl.reduce_loss, reduction="mean", weights=soft),
            lambda v: jnp.sum(soft * v) / jnp.sum(soft),
            (x,),
        ),
    }


def test_every_standard_loss_is_covered():
    assert sorted(_cases()) == STANDARD


def _in_float64(name):
    ours, ref, args = _cases()[name]

    def reference(*a):
        # Some optax functions rely on implicit promotion (int64 * float64), which the
        # test-wide strict setting refuses; only the reference gets standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            return ref(*a)

    return ours, reference, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), args)


def _sum(fn):
    return lambda *a: jnp.sum(fn(*a))


# Both sides are float64 evaluations of the same function by different formulas: they
# agree to a few hundred ulp (~1e-13) at these well-conditioned points; 1e-10 leaves room.
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


def _transforms(fn, args, tangents, *, full):
    """The value, a jvp and the Hessian w.r.t. the first argument (forward over
    reverse); with ``full`` also both Jacobians and the reverse-over-reverse Hessian.
    One jitted program per loss and side: the compile, not the arithmetic, is what
    these tiny shapes cost."""
    out = {
        "value": fn(*args),
        "jvp": jax.jvp(fn, args, tangents)[1],
        "hessian": jax.hessian(_sum(fn))(*args),
    }
    if full:
        argnums = tuple(range(len(args)))
        out["jacfwd"] = jax.jacfwd(fn, argnums)(*args)
        out["jacrev"] = jax.jacrev(fn, argnums)(*args)
        out["rev_rev"] = jax.jacrev(jax.grad(_sum(fn)))(*args)
    return out


@pytest.mark.parametrize("name", STANDARD)
def test_values_forward_mode_and_second_derivatives_match_reference(name):
    with jax.enable_x64(True):
        ours, ref, args = _in_float64(name)
        rng = np.random.default_rng(22)
        tangents = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), args)
        got = jax.jit(lambda a, t: _transforms(ours, a, t, full=True))(args, tangents)
        want = jax.jit(lambda a, t: _transforms(ref, a, t, full=False))(args, tangents)
        assert got["value"].dtype == jnp.float64

        def close(a, b):
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOL64), a, b)

        close(got["value"], want["value"])
        # Forward mode: a jvp along a real direction, and jacfwd equal to jacrev.
        assert np.abs(np.asarray(want["jvp"])).max() > 0  # not a zero derivative
        close(got["jvp"], want["jvp"])
        close(got["jacfwd"], got["jacrev"])
        # Second derivatives, forward over reverse and reverse over reverse;
        # piecewise-linear losses have a zero Hessian on both sides.
        close(got["hessian"], want["hessian"])
        close(got["rev_rev"], want["hessian"])


# ----------------------------------------------------------------------------------
# Hyperparameters: every traceable one is differentiated; the rest are refused.
# ----------------------------------------------------------------------------------

# Array arguments (differentiated like any input above) and structural arguments.
DATA_ARGS = {
    "predictions",
    "targets",
    "logits",
    "labels",
    "log_predictions",
    "log_targets",
    "log_probs",
    "scores",
    "predictor_outputs",
    "losses",
    "values",
    "params",
    "where",
    "weights",
    "mask",
}
# Static by nature: refused when traced, with a TypeError naming them.
STATIC = {"axis", "ignore_index", "reduction"}


def _hyper_cases():
    """(function, hyperparameter) -> (scalar function of it, value to differentiate at)."""
    rng = np.random.default_rng(23)
    x = rng.normal(size=(4, 6)) * 2.0
    soft = rng.uniform(0.05, 0.95, size=(4, 6))
    probs = rng.dirichlet(np.ones(6), size=4)
    labels = jnp.asarray([1, 0, 5, 3])
    where = jnp.asarray(rng.random((4, 6)) < 0.7).at[:, 0].set(True)
    small = x * 0.2  # squared norms below epsilon, where epsilon takes effect
    weights = rng.normal(size=(4, 6))
    ce = {"label_smoothing": 0.2, "z_loss": 0.05, "logit_softcap": 2.5}

    def ce_case(name):
        def f(h):
            return fl.softmax_cross_entropy_with_integer_labels(
                x, labels, where=where, **{**ce, name: h}
            ).sum()

        return f, ce[name]

    return {
        **{("softmax_cross_entropy_with_integer_labels", n): ce_case(n) for n in ce},
        ("sigmoid_focal_loss", "alpha"): (
            lambda h: fl.sigmoid_focal_loss(x, soft, alpha=h, gamma=1.5).sum(),
            0.3,
        ),
        ("sigmoid_focal_loss", "gamma"): (
            lambda h: fl.sigmoid_focal_loss(x, soft, alpha=0.3, gamma=h).sum(),
            1.5,
        ),
        ("poly_loss_cross_entropy", "epsilon"): (
            lambda h: fl.poly_loss_cross_entropy(x, probs, epsilon=h, where=where).sum(),
            1.5,
        ),
        ("smooth_labels", "alpha"): (
            lambda h: (weights * fl.smooth_labels(probs, h, where=where)).sum(),
            0.1,
        ),
        ("huber_loss", "delta"): (lambda h: fl.huber_loss(x, soft, delta=h).sum(), 0.7),
        ("cosine_similarity", "epsilon"): (
            lambda h: fl.cosine_similarity(small, soft, epsilon=h).sum(),
            1.0,
        ),
        ("cosine_distance", "epsilon"): (
            lambda h: fl.cosine_distance(small, soft, epsilon=h).sum(),
            1.0,
        ),
        ("l2_regularization", "scale"): (
            lambda h: fl.l2_regularization({"w": x}, scale=h),
            0.01,
        ),
    }


def test_every_hyperparameter_is_differentiated_or_static():
    names = {
        (fn, p)
        for fn in STANDARD
        for p in inspect.signature(getattr(fl, fn)).parameters
        if p not in DATA_ARGS
    }
    hyper = set(_hyper_cases())
    assert hyper <= names
    assert {(fn, p) for fn, p in names if p not in STATIC} == hyper


@pytest.mark.parametrize("key", list(_hyper_cases()), ids="/".join)
def test_hyperparameter_gradient_matches_finite_differences(key):
    with jax.enable_x64(True):
        f, h = _hyper_cases()[key]
        h, eps = jnp.float64(h), 1e-5
        value = jax.jit(f)
        fd = (value(h + eps) - value(h - eps)) / (2 * eps)
        grad = jax.jit(jax.grad(f))(h)
        # Central differences in float64 with eps=1e-5: error ~eps**2 |f'''| + 1e-16 / eps.
        np.testing.assert_allclose(grad, fd, rtol=1e-7)
        assert abs(float(fd)) > 1e-3  # the derivative checked is not trivially zero
        tangent = jax.jit(lambda h: jax.jvp(f, (h,), (jnp.ones_like(h),))[1])(h)
        np.testing.assert_allclose(tangent, grad, rtol=1e-12)


def test_static_arguments_are_refused_when_traced():
    logits = jnp.zeros((2, 3))
    labels = jnp.asarray([0, 2])
    for fn in (fl.softmax_cross_entropy_with_integer_labels, fl.nll_loss):
        with pytest.raises(TypeError, match="`ignore_index` must be an int or None, got"):
            jax.jit(lambda i, fn=fn: fn(logits, labels, ignore_index=i))(-100)
    with pytest.raises(TypeError, match="`axis` must be an int or a tuple of ints, got"):
        jax.jit(lambda a: fl.softmax_cross_entropy(logits, logits, axis=a))(1)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        jax.jit(lambda r: fl.reduce_loss(logits, r))(0)
