"""Tests of the sharded log-probs and top-K distillation heads (fusedloss.heads.sharded).

On the 8 host CPU devices (tests/conftest.py): the meshes 2x4, 4x2, 8x1 and 1x8, with
vocabularies of 50 (padded to 52 on 4 model shards, to 56 on 8) and 41 (on 8 model
shards the last shard holds no column at all). Every sharded result, values and
gradients w.r.t. ``x``, ``w`` and ``bias`` (for log-probs under random cotangents of
both outputs, through ``jax.vjp``), is compared with the single-device call and with
a float64 NumPy oracle that materializes the logits. Compiling dominates the run
time, so all cases of one mesh are one program, and the single-device results are
one program shared by every mesh.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

import fusedloss
from fusedloss.heads._engine import Hyper
from fusedloss.heads._tokens import check_head_args
from fusedloss.heads.sharded import Extra, ShardedHead, run_sharded

B, T, D, K, DT = 8, 5, 8, 3, 4

# float64 oracle vs float32 computation: error relative to the largest entry.
ORACLE_TOL = {"value": 2e-5, "grad": 1e-4}
# sharded vs single-device float32: only the summation order across shards differs.
SINGLE_TOL = {"value": 1e-5, "grad": 1e-4}


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = {
        "x": rng.normal(size=(B, T, D)),
        "where": rng.random((B, T)) < 0.8,
        "weights": rng.random((B, T)),
        # the teacher's probabilities of its K ids leave some mass outside them
        "tlp": np.log(rng.dirichlet(np.ones(K + 1), (B, T))[..., :K]),
        "ct_logp": rng.normal(size=(B, T)),
        "ct_ent": rng.normal(size=(B, T)),
        "r": rng.normal(size=(B, T)),
        "teacher_x": rng.normal(size=(B, T, DT)),
    }
    for v in (41, 50):
        data[f"w{v}"] = rng.normal(size=(D, v)) / 2
        data[f"b{v}"] = rng.normal(size=(v,))
        data[f"tw{v}"] = rng.normal(size=(DT, v))
        data[f"labels{v}"] = rng.integers(0, v, (B, T)).astype(np.int32)
        data[f"ids{v}"] = np.argsort(rng.random((B, T, v)), -1)[..., :K].astype(np.int32)
    return data


def to_jax(data):
    return {
        k: jnp.asarray(a, jnp.float32 if np.issubdtype(a.dtype, np.floating) else a.dtype)
        for k, a in data.items()
    }


def rounded(data):
    """The data as JAX sees it in float32, back in float64 for the oracle."""
    return {
        k: np.asarray(np.float32(a), np.float64) if np.issubdtype(a.dtype, np.floating) else a
        for k, a in data.items()
    }


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------

LOG_PROBS = {
    "lp_all": dict(bias=True, where=True, shift=1, temperature=0.7, logit_softcap=3.0,
                   return_entropy=True),
    "lp_plain": dict(bias=False, where=False, shift=0, temperature=1.0, logit_softcap=None,
                     return_entropy=False),
}  # fmt: skip
TOPK = {
    "tk_mean": dict(bias=True, where=True, weights=True, shift=1, temperature=0.7,
                    logit_softcap=3.0, reduction="mean"),
    "tk_sum": dict(bias=False, where=True, weights=False, shift=0, temperature=1.0,
                   logit_softcap=None, reduction="sum"),
    "tk_none": dict(bias=True, where=False, weights=True, shift=1, temperature=2.0,
                    logit_softcap=None, reduction="none", tied=True),
}  # fmt: skip
CASES = {**LOG_PROBS, **TOPK}

# (case, V) per mesh: every mesh runs both heads. V=41 on 8 model shards leaves the
# last shard without columns (its log-sum-exp is -inf) and pads it to 44 on 4; V=50
# is padded to 52 on 4 model shards and divides on 2.
MESH_CASES = {
    (1, 8): [("lp_all", 41), ("tk_none", 41)],
    (2, 4): [("lp_all", 41), ("tk_mean", 50)],
    (4, 2): [("lp_plain", 50), ("tk_sum", 50)],
    (8, 1): [("lp_all", 41), ("tk_mean", 50)],
}
# These run the chunked core with online statistics per shard (small problems
# otherwise take its materialized plan): [N, K] ids and the expected logit
# accumulated over vocabulary chunks, 0 at ids outside the shard.
RECOMPUTE = {
    ((1, 8), "tk_none"): fusedloss.XlaConfig(strategy="recompute", vocab_chunk=4, token_chunk=8),
    ((2, 4), "lp_all"): fusedloss.XlaConfig(strategy="recompute", vocab_chunk=4, token_chunk=8),
}
ALL_CASES = sorted({c for cases in MESH_CASES.values() for c in cases})


def _kwargs(d, spec):
    kw = {"bias": d[f"b{spec['v']}"] if spec["bias"] else None}
    kw["where"] = d["where"] if spec["where"] else None
    if "weights" in spec:
        kw["weights"] = d["weights"] if spec["weights"] else None
    keys = ("shift", "temperature", "logit_softcap", "return_entropy", "reduction")
    kw.update({k: spec[k] for k in keys if k in spec})
    return kw


def evaluate(d, name: str, v: int, mesh, config=None):
    """(values, grads w.r.t. (x, w, bias)) of one case, on ``mesh`` or (None) one device."""
    spec = {**CASES[name], "v": v}
    kw = _kwargs(d, spec)
    shift = spec["shift"]
    has_bias = kw.pop("bias") is not None
    args = (d["x"], d[f"w{v}"]) + ((d[f"b{v}"],) if has_bias else ())
    cut = lambda a: a[:, shift:]
    if name in LOG_PROBS:
        fn = fusedloss.linear_log_probs if mesh is None else fusedloss.sharded_linear_log_probs
        extra = {} if mesh is None else {"mesh": mesh, "config": config}

        def f(x, w, *b):
            return fn(x, w, d[f"labels{v}"], bias=b[0] if b else None, **kw, **extra)

        out, vjp = jax.vjp(f, *args)
        cts = cut(d["ct_logp"])
        cts = (cts, cut(d["ct_ent"])) if spec["return_entropy"] else cts
        return out, vjp(cts)
    fn = (
        fusedloss.linear_topk_distillation_loss
        if mesh is None
        else fusedloss.sharded_linear_topk_distillation_loss
    )
    extra = {} if mesh is None else {"mesh": mesh, "config": config}

    def g(x, w, *b):
        head = fusedloss.Transposed(w.T) if spec.get("tied") else w
        out = fn(x, head, d[f"ids{v}"], d["tlp"], bias=b[0] if b else None, **kw, **extra)
        value = jnp.sum(out * cut(d["r"])) if spec["reduction"] == "none" else out
        return value, out

    (_, out), grads = jax.value_and_grad(g, tuple(range(len(args))), has_aux=True)(*args)
    return out, grads


# --------------------------------------------------------------------------------------
# the float64 oracle (materialized logits, gradients written out by hand)
# --------------------------------------------------------------------------------------


def _head(d, spec):
    """Shifted float64 inputs and the head logits s = softcap(x @ w + b) / temperature."""
    v, shift = spec["v"], spec["shift"]
    xs = d["x"][:, : T - shift]
    z = xs @ d[f"w{v}"] + (d[f"b{v}"] if spec["bias"] else 0.0)
    c, temp = spec["logit_softcap"], spec["temperature"]
    s = (z if c is None else c * np.tanh(z / c)) / temp
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    p = np.exp(s - lse[..., None])
    valid = d["where"][:, shift:] if spec["where"] else np.ones(xs.shape[:-1], bool)

    def pull_back(ds):
        """Gradients (x, w, bias) from the cotangent of s."""
        ds = np.where(valid[..., None], ds, 0.0) / temp
        dz = ds if c is None else ds * (1 - np.tanh(z / c) ** 2)
        dx = np.zeros_like(d["x"])
        dx[:, : T - shift] = dz @ d[f"w{v}"].T
        grads = [dx, xs.reshape(-1, D).T @ dz.reshape(-1, v)]
        return grads + ([dz.reshape(-1, v).sum(0)] if spec["bias"] else [])

    return s, lse, p, valid, pull_back


def oracle(d, name: str, v: int):
    spec = {**CASES[name], "v": v}
    shift = spec["shift"]
    s, lse, p, valid, pull_back = _head(d, spec)
    cut = lambda a: a[:, shift:]
    if name in LOG_PROBS:
        y = cut(d[f"labels{v}"])
        onehot = np.eye(v)[y]
        logp = np.where(valid, (s * onehot).sum(-1) - lse, 0.0)
        expected = (p * s).sum(-1)
        ent = np.where(valid, lse - expected, 0.0)
        g1 = cut(d["ct_logp"])[..., None]
        ds = g1 * (onehot - p)
        if spec["return_entropy"]:
            ds = ds - cut(d["ct_ent"])[..., None] * p * (s - expected[..., None])
        out = (logp, ent) if spec["return_entropy"] else logp
        return out, pull_back(ds)
    ids, tlp = cut(d[f"ids{v}"]), cut(d["tlp"])
    onehot = np.eye(v)[ids]  # [B, T, K, V]
    log_q = np.einsum("btkv,btv->btk", onehot, s) - lse[..., None]
    q, pt = np.exp(log_q), np.exp(tlp)
    rt, rs = 1 - pt.sum(-1), 1 - q.sum(-1)
    kl = (pt * (tlp - log_q)).sum(-1) + rt * (np.log(rt) - np.log(rs))
    wts = cut(d["weights"]) if spec["weights"] else np.ones_like(kl)
    wts = np.where(valid, wts, 0.0)
    coef = wts / wts.sum() if spec["reduction"] == "mean" else wts
    loss = np.where(valid, kl * coef, 0.0)
    # d KL / d s: -sum_k p_k (onehot_k - p) + r_t / r_s * sum_k q_k (onehot_k - p)
    mix = -pt + (rt / rs)[..., None] * q
    dkl = np.einsum("btk,btkv->btv", mix, onehot) - mix.sum(-1)[..., None] * p
    g = coef * (cut(d["r"]) if spec["reduction"] == "none" else 1.0)
    out = loss if spec["reduction"] == "none" else loss.sum()
    return out, pull_back(g[..., None] * dkl)


# --------------------------------------------------------------------------------------
# programs (cached per test process)
# --------------------------------------------------------------------------------------


def mesh_of(shape):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


@functools.cache
def single_outputs() -> dict:
    """Every case on one device, as one program."""
    fn = jax.jit(lambda d: [evaluate(d, n, v, None) for n, v in ALL_CASES])
    return dict(zip(ALL_CASES, fn(to_jax(make_data())), strict=True))


@functools.cache
def mesh_outputs(shape) -> tuple[dict, str]:
    """Every case of ``MESH_CASES[shape]`` as one program; (outputs, compiled HLO)."""
    mesh, cases = mesh_of(shape), MESH_CASES[shape]
    data = to_jax(make_data())

    def run(d):
        return [evaluate(d, n, v, mesh, RECOMPUTE.get((shape, n))) for n, v in cases]

    compiled = jax.jit(run).lower(data).compile()
    return dict(zip(cases, compiled(data), strict=True)), compiled.as_text()


def assert_close(got, want, tol, name):
    got = np.asarray(got, np.float64)
    assert got.shape == np.shape(want), f"{name}: shape {got.shape}, expected {np.shape(want)}"
    scale = max(float(np.max(np.abs(want))), 1e-3)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=name)


def assert_outputs(got, want, tol):
    (out, grads), (want_out, want_grads) = got, want
    outs = out if isinstance(out, tuple) else (out,)
    want_outs = want_out if isinstance(want_out, tuple) else (want_out,)
    assert len(outs) == len(want_outs) and len(grads) == len(want_grads)
    for i, (a, b) in enumerate(zip(outs, want_outs, strict=True)):
        assert_close(a, b, tol["value"], f"output {i}")
    for name, a, b in zip(("dx", "dw", "dbias")[: len(grads)], grads, want_grads, strict=True):
        assert_close(a, b, tol["grad"], name)


def _ids(p):
    return "x".join(map(str, p)) if isinstance(p, tuple) and isinstance(p[0], int) else None


@pytest.mark.parametrize("shape", list(MESH_CASES), ids=_ids)
def test_mesh_matches_single_device_and_oracle(shape):
    """Values and gradients on 2x4, 4x2, 8x1 and 1x8 (padded and empty vocab shards)."""
    outputs, _ = mesh_outputs(shape)
    single, data = single_outputs(), rounded(make_data())
    for case in MESH_CASES[shape]:
        got = jax.tree.map(np.asarray, outputs[case])
        want = oracle(data, *case)
        try:
            assert_outputs(got, want, ORACLE_TOL)
            assert_outputs(got, jax.tree.map(np.asarray, single[case]), SINGLE_TOL)
        except AssertionError as e:
            raise AssertionError(f"case {case} on mesh {shape}: {e}") from None


def test_single_device_matches_oracle():
    """The single-device calls the meshes are compared with agree with the oracle."""
    single, data = single_outputs(), rounded(make_data())
    for case in ALL_CASES:
        assert_outputs(jax.tree.map(np.asarray, single[case]), oracle(data, *case), ORACLE_TOL)


_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\("
)


def test_only_per_token_values_cross_the_model_axis():
    """The collectives of the sharded heads in the compiled 1x8 program (forward and
    backward of both, vocabulary split 8 ways) exchange no vocabulary-sized operand:
    per-token scalars, [tokens, K] logits and the [B, T, D] gradient of the
    replicated x only. (The jitted program's own outputs, the gradients of w and
    bias returned unsharded, are gathered after it, outside the heads.)"""
    _, hlo = mesh_outputs((1, 8))
    shapes = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m is None or "shard_map" not in line:
            continue
        shapes += [
            tuple(int(n) for n in dims.split(",") if n)
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
        ]
    assert len(shapes) >= 4, "too few collectives found in the compiled program"
    vocab_dims = {41, 48, 6}  # V, padded V, columns per shard
    for dims in shapes:
        assert not vocab_dims & set(dims), f"a collective exchanges shape {dims}"
        assert np.prod(dims) <= B * T * max(K, D), f"a collective exchanges shape {dims}"


# --------------------------------------------------------------------------------------
# the extension point: a head with "columns" and "tokens" extras
# --------------------------------------------------------------------------------------


def teacher_log_probs_head() -> ShardedHead:
    """A second head's log-probs, from a teacher's hidden states (``"tokens"``) and
    kernel and bias (``"columns"``), split like x, w and bias."""

    def apply(tokens, stats, extras, ctx):
        tx = ctx.rows(extras["teacher_x"], trailing=1, predictor=True)
        t_stats, _ = ctx.stats(
            tx, extras["teacher_w"], extras["teacher_b"], tokens.labels, tokens.valid, Hyper()
        )
        student = jnp.where(tokens.valid, stats.label_logit - stats.lse, 0.0)
        teacher = jnp.where(tokens.valid, t_stats.label_logit - t_stats.lse, 0.0)
        return student.reshape(tokens.shape), teacher.reshape(tokens.shape)

    return ShardedHead(Hyper(), apply, lambda tok, _: (tok, tok))


def test_extra_arrays_are_split_like_tokens_and_columns():
    """On 2x4 with V=41 (padded to 44): a teacher's [Dt, V] kernel, its [V] bias
    and its [B, T, Dt] hidden states travel with their roles; the teacher's log-probs
    and their gradient w.r.t. its kernel equal a float64 oracle."""
    data = make_data()
    d, ref = to_jax(data), rounded(data)
    mesh = mesh_of((2, 4))
    args = check_head_args(d["x"], d["w41"], d["labels41"], None, d["where"], None, "[V]")

    def teacher_objective(tw):
        extras = {
            "teacher_x": Extra(d["teacher_x"], "tokens"),
            "teacher_w": Extra(tw, "columns", axis=1),
            "teacher_b": Extra(d["b41"], "columns"),
        }
        _, t = run_sharded(
            args, teacher_log_probs_head(), mesh, ("data",), ("model",), shift=1,
            implementation=None, config=None, extras=extras,
        )  # fmt: skip
        return jnp.sum(t * d["r"][:, 1:]), t

    (_, logp), grad = jax.jit(jax.value_and_grad(teacher_objective, has_aux=True))(d["tw41"])
    tx, valid, labels = ref["teacher_x"][:, :-1], data["where"][:, 1:], data["labels41"][:, 1:]
    z = tx @ ref["tw41"] + ref["b41"]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    onehot = np.eye(41)[labels]
    want = np.where(valid, (z * onehot).sum(-1) - lse, 0.0)
    g = np.where(valid, ref["r"][:, 1:], 0.0)[..., None] * (onehot - np.exp(z - lse[..., None]))
    assert_close(logp, want, ORACLE_TOL["value"], "teacher log-probs")
    assert_close(grad, tx.reshape(-1, DT).T @ g.reshape(-1, 41), ORACLE_TOL["grad"], "d teacher_w")


@pytest.mark.parametrize(
    ("extras", "match"),
    [
        ({"x": Extra(jnp.zeros((B, T)), "tokens")}, "must not be named 'x'"),
        ({"t": Extra(jnp.zeros((B + 1, T, 2)), "tokens")}, r"labels.shape \+ \(...\)"),
        ({"t": Extra(jnp.zeros((DT, 40)), "columns", axis=1)}, "V = 41 entries along axis 1"),
        ({"t": Extra(jnp.zeros((B, T)), "rows")}, "'tokens' or 'columns'"),
    ],
)
def test_extra_array_errors(extras, match):
    d = to_jax(make_data())
    args = check_head_args(d["x"], d["w41"], d["labels41"], None, None, None, "[V]")
    with pytest.raises(ValueError, match=match):
        run_sharded(
            args, teacher_log_probs_head(), mesh_of((2, 4)), ("data",), ("model",), shift=0,
            implementation=None, config=None, extras=extras,
        )  # fmt: skip


# --------------------------------------------------------------------------------------
# argument checks (no compilation)
# --------------------------------------------------------------------------------------


def test_out_of_range_ids_are_rejected_eagerly():
    d = to_jax(make_data())
    mesh = mesh_of((2, 4))
    ids = d["ids50"].at[0, 1, 2].set(50)
    with pytest.raises(ValueError, match="teacher_ids"):
        fusedloss.sharded_linear_topk_distillation_loss(d["x"], d["w50"], ids, d["tlp"], mesh=mesh)
    labels = d["labels50"].at[1, 1].set(-1)
    with pytest.raises(ValueError, match="labels"):
        fusedloss.sharded_linear_log_probs(d["x"], d["w50"], labels, mesh=mesh)


def test_argument_errors():
    d = to_jax(make_data())
    mesh = mesh_of((2, 4))
    with pytest.raises(ValueError, match="temperature"):
        fusedloss.sharded_linear_log_probs(d["x"], d["w50"], d["labels50"], mesh=mesh,
                                           temperature=0.0)  # fmt: skip
    with pytest.raises(TypeError, match="return_entropy"):
        fusedloss.sharded_linear_log_probs(d["x"], d["w50"], d["labels50"], mesh=mesh,
                                           return_entropy=1)  # fmt: skip
    with pytest.raises(ValueError, match="teacher_ids"):
        fusedloss.sharded_linear_topk_distillation_loss(
            d["x"], d["w50"], d["ids50"][:, :, 0], d["tlp"], mesh=mesh
        )
    with pytest.raises(ValueError, match="different mesh axes"):
        fusedloss.sharded_linear_log_probs(d["x"], d["w50"], d["labels50"], mesh=mesh,
                                           data_axis="model")  # fmt: skip
