"""Property-based checks of the fused heads against a float64 oracle written here.

Hypothesis draws shapes and masks that reach the edges: no tokens, one class, a
hidden size of 1, every token masked, labels at 0 and V - 1, and logits from O(1) up
to O(1000) (where an unshifted log-sum-exp would overflow float32). Shapes come from a
fixed list of classes, so each jitted head compiles once per class and implementation
and an example costs milliseconds; the number of examples is the hypothesis
profile's (tests/conftest.py: 50 in CI).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedloss
from fusedloss import XlaConfig

# Tiny chunks, so that several (and clamped partial) chunks occur at these shapes.
IMPLS = {
    "reference": ("reference", None),
    "xla-recompute": ("xla", XlaConfig(strategy="recompute", token_chunk=8, vocab_chunk=16)),
    "xla-grad_in_forward": (
        "xla",
        XlaConfig(strategy="grad_in_forward", token_chunk=8, vocab_chunk=16),
    ),
}


# (tokens, hidden, vocabulary): no tokens, one class, a hidden size of 1, and sizes
# that leave partial (clamped) token and vocabulary chunks.
SHAPES = [(0, 3, 5), (1, 1, 1), (5, 1, 37), (19, 5, 16), (9, 2, 17), (8, 4, 1)]


@st.composite
def problems(draw):
    n, d, v = draw(st.sampled_from(SHAPES))
    scale = draw(st.sampled_from([0.5, 30.0, 1000.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * scale / np.sqrt(d)).astype(np.float32)
    labels = rng.integers(0, v, size=n).astype(np.int32)
    if n:
        labels[0] = v - 1
        labels[-1] = 0
    density = draw(st.sampled_from([0.0, 0.5, 1.0]))  # 0: every token masked
    where = rng.random(n) < density
    return x, w, labels, where


def oracle(x, w, labels, where):
    """float64 mean CE over the included tokens (0 if none), and its gradients."""
    z = x.astype(np.float64) @ w.astype(np.float64)
    m = z.max(-1, keepdims=True) if z.size else np.zeros((len(z), 1))
    e = np.exp(z - m)
    lse = (m + np.log(e.sum(-1, keepdims=True)))[:, 0] if z.size else np.zeros(len(z))
    count = int(where.sum())
    if count == 0:
        return 0.0, np.zeros_like(x, np.float64), np.zeros_like(w, np.float64)
    picked = z[np.arange(len(z)), labels]
    loss = float(np.sum(np.where(where, lse - picked, 0.0)) / count)
    p = e / e.sum(-1, keepdims=True)
    dz = (p - np.eye(w.shape[1])[labels]) * (where / count)[:, None]
    return loss, dz @ w.T.astype(np.float64), x.T.astype(np.float64) @ dz


@functools.partial(jax.jit, static_argnames="impl")
def _lce_value_and_grad(x, w, labels, where, impl):
    name, cfg = IMPLS[impl]

    def f(x, w):
        return fusedloss.linear_cross_entropy(
            x, w, labels, where=where, implementation=name, config=cfg
        )

    return jax.value_and_grad(f, (0, 1))(x, w)


@jax.jit
def _log_probs(x, w, labels, where):
    return fusedloss.linear_log_probs(
        x, w, labels, where=where, return_entropy=True, implementation="xla",
        config=IMPLS["xla-recompute"][1],
    )  # fmt: skip


@given(problem=problems(), impl=st.sampled_from(sorted(IMPLS)))
def test_linear_cross_entropy_matches_float64_oracle(problem, impl):
    x, w, labels, where = problem
    loss, (gx, gw) = _lce_value_and_grad(x, w, labels, where, impl=impl)
    want, want_gx, want_gw = oracle(x, w, labels, where)
    assert np.isfinite(float(loss))
    # float32 statistics of logits up to ~1000: relative 1e-5 of the loss's scale.
    scale = max(1.0, abs(want))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5 * scale)
    # p = exp(s - lse) carries the float32 rounding of lse (~eps |s|), which the
    # gradients multiply by x or w: absolute error ~ 1e-6 (1 + |z|) max(|x|, |w|).
    z = np.abs(x.astype(np.float64) @ w.astype(np.float64)).max(initial=0.0)
    size = max(np.abs(x).max(initial=0.0), np.abs(w).max(initial=0.0))
    atol = 1e-6 * (1.0 + z) * max(size, 1.0)
    for g, wg in ((gx, want_gx), (gw, want_gw)):
        assert g.shape == wg.shape
        np.testing.assert_allclose(g, wg, rtol=1e-4, atol=atol)


@given(problem=problems())
def test_linear_log_probs_matches_float64_oracle(problem):
    x, w, labels, where = problem
    logp, ent = _log_probs(x, w, labels, where)
    z = x.astype(np.float64) @ w.astype(np.float64)
    if z.size:
        logq = z - z.max(-1, keepdims=True)
        logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
        want_lp = np.where(where, logq[np.arange(len(z)), labels], 0.0)
        want_ent = np.where(where, -(np.exp(logq) * logq).sum(-1), 0.0)
    else:
        want_lp = want_ent = np.zeros(len(z))
    # Log-probs of logits up to ~1000 in float32: absolute 1e-5 of their scale.
    atol = 1e-5 * max(1.0, float(np.abs(want_lp).max(initial=0.0)))
    np.testing.assert_allclose(logp, want_lp, rtol=1e-5, atol=atol)
    # The entropy is lse - E[z] in float32: its absolute error is a few float32 ulps of
    # the logits' magnitude (|z| up to thousands here), however small the entropy.
    z_scale = float(np.abs(z).max(initial=0.0))
    ent_atol = max(1e-5, 8 * float(np.finfo(np.float32).eps) * z_scale)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-4, atol=ent_atol)


def test_hypothesis_profile_draws_at_least_50_examples():
    # The profile of tests/conftest.py (ci unless HYPOTHESIS_PROFILE says otherwise)
    # sets the number of examples of the property tests.
    assert settings.default.max_examples >= 50
    assert settings.default.deadline is None
