"""``sharded_linear_distillation_loss`` on the 8 host CPU devices: on the meshes 2x4,
4x2, 8x1 and 1x8 (V = 53: padded on 4 and 8 model shards), values and gradients
w.r.t. ``x``, ``w`` and ``bias`` (per-token losses under a random cotangent) equal the
single-device call, which ``tests/test_distillation_head.py`` holds to a float64
oracle; the teacher gets no gradient; only per-token scalars cross the model axis.
Tokens excluded by ``where``, ``ignore_index`` or ``shift`` hold NaN in both heads'
hidden states and change nothing. All cases of one mesh compile as one program."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedloss
from fusedloss import XlaConfig

B, T, D, DT, V = 8, 5, 8, 6, 53
CFG = XlaConfig(strategy="recompute", token_chunk=8, vocab_chunk=4)
CASES = {
    "fkl_all": dict(divergence="forward_kl", temperature=1.5, logit_softcap=4.0,
                    teacher_logit_softcap=3.0, hard_label_weight=0.3, ignore_index=-1,
                    where=True, weights=True, shift=1, reduction="mean", bias=True),
    "rkl_none": dict(divergence="reverse_kl", reduction="none", where=True, bias=True),
    "jsd_sum": dict(divergence="jsd", beta=0.3, hard_label_weight=0.5, reduction="sum",
                    shift=1, tied=True),
    # -inf on both heads' biases: whole vocabulary chunks of the first shard, single
    # columns, the last column (on the padded shard); they add nothing, nothing is NaN.
    "rkl_masked": dict(divergence="reverse_kl", reduction="none", bias=True, masked=True),
}  # fmt: skip
MASKED = np.r_[0:8, 20, 52]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
    labels = rng.integers(0, V, (B, T)).astype(np.int32)
    labels[0, 2] = -1  # ignored where ignore_index is set
    return dict(
        x=f(B, T, D), w=f(D, V, scale=0.5), b=f(V), xt=f(B, T, DT), wt=f(DT, V, scale=0.7),
        bt=f(V), labels=jnp.asarray(labels), where=jnp.asarray(rng.random((B, T)) < 0.8),
        weights=jnp.asarray(rng.uniform(0.5, 2, (B, T)), jnp.float32), ct=f(B, T),
    )  # fmt: skip


def _poisoned(a, case, where, labels):
    """``a`` ``[B, T, .]`` with NaN in the rows the case excludes (``where``,
    ``ignore_index``, and the last ``shift`` rows, which predict nothing)."""
    shift = case.get("shift", 0)
    keep = jnp.ones((B, T), bool) if where is None else where
    if case.get("ignore_index") is not None:
        keep = keep & (labels != case["ignore_index"])
    rows = jnp.concatenate([~keep[:, shift:], jnp.ones((B, shift), bool)], axis=1)
    return jnp.where(rows[..., None], jnp.nan, a)


def _call(fn, d, x, w, b, case, **kw):
    c = dict(case)
    tied, use_bias = c.pop("tied", False), c.pop("bias", False)
    mask = jnp.where(jnp.isin(jnp.arange(V), MASKED), -jnp.inf, 0.0) if c.pop("masked", 0) else 0
    where = d["where"] if c.pop("where", False) else None
    weights = d["weights"] if c.pop("weights", False) else None
    labels = d["labels"] if ("hard_label_weight" in c or "ignore_index" in c) else None
    if labels is not None and "ignore_index" not in c:
        labels = labels % V
    wt = fusedloss.Transposed(d["wt"].T) if tied else d["wt"]
    x, xt = _poisoned(x, c, where, labels), _poisoned(d["xt"], c, where, labels)
    out = fn(
        x, fusedloss.Transposed(w.T) if tied else w, xt, wt,
        bias=b + mask if use_bias else None, teacher_bias=d["bt"] + mask, labels=labels,
        where=where, weights=weights, config=CFG, **c, **kw,
    )  # fmt: skip
    if c.get("reduction") == "none":
        shift = c.get("shift", 0)
        return jnp.sum(out * d["ct"][:, shift:])
    return out


def _all(fn, d, **kw):
    def f(x, w, b):
        return [_call(fn, d, x, w, b, case, **kw) for case in CASES.values()]

    outs = f(d["x"], d["w"], d["b"])
    grads = [
        jax.grad(lambda x, w, b, i=i: f(x, w, b)[i], (0, 1, 2))(d["x"], d["w"], d["b"])
        for i in range(len(CASES))
    ]
    return outs, grads


@pytest.fixture(scope="module")
def single():
    d = _data()
    return jax.jit(lambda d: _all(fusedloss.linear_distillation_loss, d))(d)


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (8, 1), (1, 8)])
def test_sharded_equals_single_device(shape, single):
    d = _data()
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    fn = lambda *a, **k: fusedloss.sharded_linear_distillation_loss(*a, mesh=mesh, **k)
    outs, grads = jax.jit(lambda d: _all(fn, d))(d)
    want_outs, want_grads = single
    for name, o, wo, g, wg in zip(CASES, outs, want_outs, grads, want_grads, strict=True):
        # Only the order of the sums across shards differs from one device.
        assert np.isfinite(o) and all(np.isfinite(a).all() for a in g), name
        np.testing.assert_allclose(o, wo, rtol=1e-5, err_msg=name)
        for gn, a, b in zip(("dx", "dw", "dbias"), g, wg, strict=True):
            scale = float(np.abs(b).max()) or 1.0
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{name} {gn}")


def test_no_teacher_gradient_and_only_per_token_scalars_cross_the_model_axis():
    d = _data(1)
    mesh = jax.make_mesh((1, 8), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def loss(x, w, xt, wt):
        return fusedloss.sharded_linear_distillation_loss(
            x, w, xt, wt, mesh=mesh, divergence="jsd", config=CFG
        )

    g = jax.jit(jax.grad(loss, (2, 3)))(d["x"], d["w"], d["xt"], d["wt"])
    assert not any(np.any(np.asarray(a)) for a in g)
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(d["x"], d["w"], d["xt"], d["wt"])
    shapes = []
    for line in hlo.compile().as_text().splitlines():
        m = _COLLECTIVE.search(line)
        if m is None or "shard_map" not in line:  # the heads' own, not the outputs' gather
            continue
        shapes += [
            tuple(int(n) for n in dims.split(",") if n)
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
        ]
    assert len(shapes) >= 3, "too few collectives found in the compiled program"
    for dims in shapes:  # per-token vectors, scalars and x's [B, T, D] gradient
        assert not {V, 56, 7} & set(dims), f"a collective exchanges shape {dims}"
        assert np.prod(dims) <= B * T * D, f"a collective exchanges shape {dims}"


_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\("
)


def test_forward_mode_on_a_mesh():
    """``jax.jvp`` of the sharded head equals the single-device call's."""
    d = _data(2)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    kw = dict(divergence="jsd", reduction="none", config=CFG)

    def sharded(x, w):
        return fusedloss.sharded_linear_distillation_loss(x, w, d["xt"], d["wt"], mesh=mesh, **kw)

    def single(x, w):
        return fusedloss.linear_distillation_loss(x, w, d["xt"], d["wt"], **kw)

    t = (d["xt"][..., :1] * d["x"], 0.1 * d["w"])  # any tangents
    got = jax.jit(lambda x, w: jax.jvp(sharded, (x, w), t)[1])(d["x"], d["w"])
    want = jax.jit(lambda x, w: jax.jvp(single, (x, w), t)[1])(d["x"], d["w"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
