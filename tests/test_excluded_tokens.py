"""Excluded tokens influence nothing, on every fused head and implementation.

A token excluded by ``where``, by ``ignore_index`` or by ``shift`` (the last
positions of ``x``, which predict nothing) holds NaN or inf in the student's ``x``,
the teacher's ``x`` or the teacher's log-probabilities, and a label outside the
vocabulary. The result must be finite and equal, with its gradients, to the call on
the included tokens alone (``dx`` of an excluded token is 0). Each case is one
compiled program holding both calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lce_impls import IMPL_CASES

from fusedloss import (
    XlaConfig,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
    linear_topk_distillation_loss,
)

B, S, D, DT, V, K = 2, 7, 16, 12, 37, 4
SHIFT = 1
CHUNKS = dict(token_chunk=8, vocab_chunk=16)


def poisoned_inputs(seed):
    """Tokens ``[B, S]`` with ``where`` and ``ignore_index`` exclusions at random inner
    positions; the excluded tokens' inputs (and the shifted-away last position of
    ``x``, the first of the teacher's top-K arrays) are NaN or inf. Returns the
    poisoned arrays, the boolean ``kept`` mask ``[B, S - SHIFT]`` of the tokens that
    remain after the shift, and the excluded rows of ``x`` ``[B, S]``."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s, scale=1.0: (rng.normal(size=s) * scale).astype(np.float32)
    arr = dict(
        x=f32(B, S, D), w=f32(D, V, scale=1.0 / np.sqrt(D)), bias=f32(V, scale=0.5),
        xt=f32(B, S, DT), wt=f32(DT, V, scale=2.0 / np.sqrt(DT)), teacher_bias=f32(V),
        labels=rng.integers(0, V, size=(B, S)).astype(np.int32),
        weights=rng.uniform(0.5, 2.0, size=(B, S)).astype(np.float32),
        ids=np.stack([rng.permutation(V)[:K] for _ in range(B * S)]).reshape(B, S, K),
    )  # fmt: skip
    p = rng.dirichlet(np.ones(K), size=(B, S)) * 0.8
    arr["tlp"] = np.log(p).astype(np.float32)
    arr["ids"] = arr["ids"].astype(np.int32)
    # Positions along S after the shift: label index s pairs with x index s - SHIFT.
    inner = rng.choice(np.arange(SHIFT + 1, S - 1), size=(B, 2), replace=False)
    where = np.ones((B, S), bool)
    for b in range(B):
        where[b, inner[b, 0]] = False
        arr["labels"][b, inner[b, 1]] = -100
    arr["where"] = where
    excluded = ~where | (arr["labels"] == -100)  # in label positions
    # The x row that predicts label s is s - SHIFT; the last SHIFT rows predict nothing.
    x_excl = np.zeros((B, S), bool)
    x_excl[:, : S - SHIFT] = excluded[:, SHIFT:]
    x_excl[:, S - SHIFT :] = True
    bad = np.where(rng.random((B, S)) < 0.5, np.nan, np.inf).astype(np.float32)
    for k in ("x", "xt"):
        arr[k][x_excl] = bad[x_excl][:, None]
    # The teacher's top-K arrays pair with labels (the first SHIFT positions are unused).
    t_excl = excluded.copy()
    t_excl[:, :SHIFT] = True
    arr["tlp"][t_excl] = bad[t_excl][:, None]
    arr["ids"][t_excl] = V + 3  # out of range: unchecked where excluded
    arr["labels"][~where] = V + 5
    return arr, ~excluded[:, SHIFT:], x_excl


def removed(arr, kept):
    """The included tokens alone, flattened, already aligned (no shift, no mask)."""
    xs = lambda a: a[:, :-SHIFT][kept]
    ys = lambda a: a[:, SHIFT:][kept]
    return dict(
        x=xs(arr["x"]), xt=xs(arr["xt"]), labels=ys(arr["labels"]),
        weights=ys(arr["weights"]), ids=ys(arr["ids"]), tlp=ys(arr["tlp"]),
    )  # fmt: skip


def check(arr, kept, x_excl, got, want, per_token=False):
    """``got = (out, (dx, dw, dbias))`` of the poisoned call against ``want`` of the
    included tokens alone."""
    out, (dx, dw, db) = got
    w_out, (w_dx, w_dw, w_db) = want
    leaves = (out, dx, dw, db)
    assert all(np.isfinite(np.asarray(a)).all() for a in leaves), [
        np.isfinite(np.asarray(a)).all() for a in leaves
    ]
    if per_token:
        out = np.asarray(out)
        assert not np.any(out[~kept])
        out = out[kept]
    np.testing.assert_allclose(out, w_out, rtol=1e-5, atol=1e-6)
    dx = np.asarray(dx)
    assert not np.any(dx[x_excl])
    np.testing.assert_allclose(dx[:, :-SHIFT][kept], w_dx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dw, w_dw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(db, w_db, rtol=1e-4, atol=1e-6)


LCE_CASES = [pytest.param(i, c, id=n) for n, i, c in IMPL_CASES]


@pytest.mark.parametrize("impl,cfg", LCE_CASES)
def test_cross_entropy(impl, cfg):
    arr, kept, x_excl = poisoned_inputs(1)
    r = removed(arr, kept)
    kw = dict(implementation=impl, config=cfg, label_smoothing=0.1, z_loss=1e-3)

    @jax.jit
    def run(x, w, b):
        f = lambda x, w, b: linear_cross_entropy(
            x, w, arr["labels"], bias=b, where=arr["where"], weights=arr["weights"],
            ignore_index=-100, shift=SHIFT, **kw,
        )  # fmt: skip
        g = lambda x, w, b: linear_cross_entropy(
            x, w, r["labels"], bias=b, weights=r["weights"], **kw
        )
        grad = lambda fn, x: jax.value_and_grad(fn, (0, 1, 2))(x, w, b)
        return grad(f, x), grad(g, r["x"])

    got, want = run(arr["x"], arr["w"], arr["bias"])
    check(arr, kept, x_excl, got, want)


LOGP_CASES = [
    pytest.param("reference", None, id="reference"),
    pytest.param("xla", XlaConfig(strategy="recompute", **CHUNKS), id="xla-recompute"),
    # The kernels serve log-probs at temperature 1 without entropy.
    *[pytest.param(i, c, id=n) for n, i, c in IMPL_CASES if i.startswith("pallas")],
]


@pytest.mark.parametrize("impl,cfg", LOGP_CASES)
def test_log_probs_and_entropy(impl, cfg):
    arr, kept, x_excl = poisoned_inputs(2)
    r = removed(arr, kept)
    ct = np.random.default_rng(3).normal(size=(2, B, S - SHIFT)).astype(np.float32)
    kernel = impl.startswith("pallas")
    kw = dict(implementation=impl, config=cfg, temperature=1.0 if kernel else 0.8)
    keep = arr["where"] & (arr["labels"] != -100)  # no ignore_index here

    def linear_log_probs_and_entropy(*a, **k):
        if kernel:
            lp = linear_log_probs(*a, **k)
            return lp, jnp.zeros_like(lp)
        return linear_log_probs(*a, return_entropy=True, **k)

    @jax.jit
    def run(x, w, b):
        def f(x, w, b):
            lp, ent = linear_log_probs_and_entropy(
                x, w, arr["labels"], bias=b, where=keep, shift=SHIFT, **kw
            )
            return jnp.sum(lp * ct[0] + ent * ct[1]), (lp, ent)

        def g(x, w, b):
            lp, ent = linear_log_probs_and_entropy(x, w, r["labels"], bias=b, **kw)
            return jnp.sum(lp * ct[0][kept] + ent * ct[1][kept]), (lp, ent)

        vg = lambda fn, x: jax.value_and_grad(fn, (0, 1, 2), has_aux=True)(x, w, b)
        (_, fo), fg = vg(f, x)
        (_, go), gg = vg(g, r["x"])
        return (fo, fg), (go, gg)

    (fo, fg), (go, gg) = run(arr["x"], arr["w"], arr["bias"])
    for i in range(2):  # log-probs, then entropies: 0 at excluded tokens
        check(arr, kept, x_excl, (fo[i], fg), (go[i], gg), per_token=True)


TOPK_CASES = [
    pytest.param("reference", None, id="reference"),
    pytest.param("xla", XlaConfig(strategy="recompute", **CHUNKS), id="xla-recompute"),
]


@pytest.mark.parametrize("impl,cfg", TOPK_CASES)
def test_topk_distillation(impl, cfg):
    arr, kept, x_excl = poisoned_inputs(4)
    r = removed(arr, kept)
    kw = dict(implementation=impl, config=cfg, temperature=1.3)

    @jax.jit
    def run(x, w, b):
        f = lambda x, w, b: linear_topk_distillation_loss(
            x, w, arr["ids"], arr["tlp"], bias=b, where=arr["where"] & (arr["labels"] != -100),
            weights=arr["weights"], shift=SHIFT, **kw,
        )  # fmt: skip
        g = lambda x, w, b: linear_topk_distillation_loss(
            x, w, r["ids"], r["tlp"], bias=b, weights=r["weights"], **kw
        )
        grad = lambda fn, x: jax.value_and_grad(fn, (0, 1, 2))(x, w, b)
        return grad(f, x), grad(g, r["x"])

    got, want = run(arr["x"], arr["w"], arr["bias"])
    check(arr, kept, x_excl, got, want)


DISTILL_CASES = [
    pytest.param("reference", None, id="reference"),
    *[
        pytest.param("xla", XlaConfig(strategy=s, **CHUNKS), id=f"xla-{s}")
        for s in ("materialized", "grad_in_forward", "recompute")
    ],
]


@pytest.mark.parametrize("impl,cfg", DISTILL_CASES)
def test_teacher_head_distillation(impl, cfg):
    """Every divergence, with the hard-label term; NaN or inf in both heads' inputs."""
    arr, kept, x_excl = poisoned_inputs(5)
    r = removed(arr, kept)
    divergences = ("forward_kl", "reverse_kl", "jsd")

    @jax.jit
    def run(x, w, b):
        outs = []
        for div in divergences:
            kw = dict(divergence=div, temperature=1.4, teacher_bias=arr["teacher_bias"],
                      hard_label_weight=0.3, implementation=impl, config=cfg)  # fmt: skip
            f = lambda x, w, b, kw=kw: linear_distillation_loss(
                x, w, arr["xt"], arr["wt"], bias=b, labels=arr["labels"], where=arr["where"],
                weights=arr["weights"], ignore_index=-100, shift=SHIFT, **kw,
            )  # fmt: skip
            g = lambda x, w, b, kw=kw: linear_distillation_loss(
                x, w, r["xt"], arr["wt"], bias=b, labels=r["labels"], weights=r["weights"], **kw
            )
            grad = lambda fn, x: jax.value_and_grad(fn, (0, 1, 2))(x, w, b)
            outs.append((grad(f, x), grad(g, r["x"])))
        return outs

    for div, (got, want) in zip(divergences, run(arr["x"], arr["w"], arr["bias"]), strict=True):
        try:
            check(arr, kept, x_excl, got, want)
        except AssertionError as e:
            raise AssertionError(f"{div}: {e}") from e
