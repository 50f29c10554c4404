"""Tests for fusedloss.heads.sharded (data- and vocab-parallel).

The test session has 8 host CPU devices (tests/conftest.py), so the meshes 8x1, 1x8,
2x4 and 4x2 are built here. Every multi-device result (loss, aux outputs and the
gradients w.r.t. ``x``, ``w`` and ``bias``) is compared with :func:`oracle`, a
float64 NumPy computation written out below: the single-device call shares its code
with the sharded one, so it cannot be the oracle. Compiling dominates the runtime,
so the cases of one mesh are compiled as one program (cached per test process) and
checked by one test each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import fusedloss
from fusedloss.heads.sharded import (
    sharded_linear_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

# Error allowed relative to the largest entry of the compared array, by input dtype.
TOL = {
    # chunked float32 sums and the psum combination across shards round differently
    # from float64 (~1e-7 per term over tens of terms)
    jnp.dtype(jnp.float32): 2e-5,
    # float64 inputs are computed in float64 throughout: only summation order differs
    jnp.dtype(jnp.float64): 1e-10,
    # bf16 per-token outputs are rounded to bf16 (8 mantissa bits, 2**-8 = 0.4%)
    jnp.dtype(jnp.bfloat16): 2e-2,
}

B, T, D = 8, 6, 16


def test_the_session_has_eight_cpu_devices():
    assert jax.device_count() == 8, jax.devices()


# --------------------------------------------------------------------------------------
# the float64 oracle
# --------------------------------------------------------------------------------------


def oracle(
    x,
    w,
    labels,
    *,
    bias=None,
    where=None,
    weights=None,
    ignore_index=None,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    shift=0,
    r=None,
) -> dict[str, np.ndarray]:
    """Loss, aux outputs and the gradients (x, w, bias) of the objective, in float64.

    The objective is the loss for "sum"/"mean" and ``sum(loss * r)`` for "none"
    (``r`` with the shape of the shifted labels, default ones). ``x`` is ``[..., T, D]``, ``w``
    ``[D, V]``; the gradients are written out by hand from the softmax.
    """
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)
    x, w, bias, weights, r = f64(x), f64(w), f64(bias), f64(weights), f64(r)
    labels = np.asarray(labels)
    cut = lambda a: None if a is None or not shift else np.asarray(a)[..., shift:]
    xs = x[..., : x.shape[-2] - shift, :] if shift else x
    y = cut(labels) if shift else labels
    mask = cut(where) if shift else (None if where is None else np.asarray(where))
    wts = cut(weights) if shift else weights
    v = w.shape[1]
    valid = np.ones(y.shape, bool) if mask is None else mask.astype(bool)
    if ignore_index is not None:
        valid &= y != ignore_index
    z = xs @ w + (0.0 if bias is None else bias)
    zc = z if logit_softcap is None else logit_softcap * np.tanh(z / logit_softcap)
    m = zc.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(zc - m).sum(-1))
    ysafe = np.where(valid, y, 0)
    onehot = np.eye(v)[ysafe]
    zy = (zc * onehot).sum(-1)
    ls = label_smoothing
    tok = lse - (1 - ls) * zy - ls / v * zc.sum(-1) + z_loss * lse**2
    wts = np.where(valid, 1.0 if wts is None else wts, 0.0)
    wsum = wts.sum()
    coef = (wts / wsum if wsum else 0 * wts) if reduction == "mean" else wts
    per = np.where(valid, tok * coef, 0.0)
    g = coef * (r if reduction == "none" and r is not None else 1.0)
    p = np.exp(zc - lse[..., None])
    dzc = g[..., None] * (p * (1 + 2 * z_loss * lse[..., None]) - (1 - ls) * onehot - ls / v)
    dzc = np.where(valid[..., None], dzc, 0.0)
    dz = dzc if logit_softcap is None else dzc * (1 - np.tanh(z / logit_softcap) ** 2)
    dx = np.zeros_like(x)
    dx[..., : xs.shape[-2], :] = dz @ w.T
    return {
        "loss": per if reduction == "none" else per.sum(),
        "lse": np.where(valid, lse, 0.0),
        "correct": valid & (zc.argmax(-1) == y),
        "label_logit": np.where(valid, zy, 0.0),
        "predicted": np.where(valid, zc.argmax(-1), -1),
        "token_weights": wts,
        "num_tokens": valid.sum(),
        "weight_sum": wsum,
        "dx": dx,
        "dw": xs.reshape(-1, xs.shape[-1]).T @ dz.reshape(-1, v),
        "dbias": dz.reshape(-1, v).sum(0),
    }


AUX_NAMES = (
    "lse", "correct", "num_tokens", "weight_sum", "label_logit", "predicted", "token_weights"
)  # fmt: skip


def assert_close(got, want, dtype, name=""):
    got = np.asarray(got)
    assert got.shape == np.shape(want), f"{name}: shape {got.shape}, expected {np.shape(want)}"
    if got.dtype == np.bool_ or np.issubdtype(got.dtype, np.integer):
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    tol = TOL[jnp.dtype(dtype)]
    scale = float(np.max(np.abs(want))) if np.size(want) else 0.0
    np.testing.assert_allclose(
        got.astype(np.float64), want, rtol=tol, atol=tol * max(scale, 1e-3), err_msg=name
    )


def assert_matches(out, want, dtype, *, aux=True, bias=True):
    """``out`` = (loss, aux arrays or None), grads, as :func:`evaluate` returns it."""
    (loss, arrays), grads = out
    assert_close(loss, want["loss"], dtype, "loss")
    names = ("dx", "dw", "dbias")[: len(grads)]
    assert len(grads) == (3 if bias else 2)
    for name, g in zip(names, grads, strict=True):
        assert_close(g, want[name], dtype, name)
    if aux:
        for name, a in zip(AUX_NAMES, arrays, strict=True):
            assert_close(a, want[name], dtype, name)


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    """float64 NumPy data (cast to the test's dtype before JAX sees it)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 41, (B, T)).astype(np.int32)
    labels[0, 2] = labels[3, 4] = -100  # ignored tokens
    return {
        "x": rng.normal(size=(B, T, D)),
        "w48": rng.normal(size=(D, 48)) / 3,
        "w41": rng.normal(size=(D, 41)) / 3,
        "b48": rng.normal(size=(48,)),
        "b41": rng.normal(size=(41,)),
        "labels": labels,
        "where": rng.random((B, T)) < 0.85,
        "weights": rng.random((B, T)),
        "r": rng.normal(size=(B, T)),
    }


def to_jax(data: dict, dtype=jnp.float32) -> dict[str, jax.Array]:
    return {
        k: jnp.asarray(a, dtype if np.issubdtype(a.dtype, np.floating) else a.dtype)
        for k, a in data.items()
    }


def rounded(data: dict, dtype=jnp.float32) -> dict[str, np.ndarray]:
    """The data as JAX sees it in ``dtype``, back in float64 for the oracle."""
    return {
        k: np.asarray(jnp.asarray(a, dtype), np.float64)
        if np.issubdtype(a.dtype, np.floating)
        else a
        for k, a in data.items()
    }


# Feature combinations; "v" picks the vocabulary (41 divides by none of 2, 4, 8: the
# padded path, with an empty last shard on 8 devices).
CASES = {
    "all_mean": dict(v=48, bias=True, aux=True, reduction="mean", where=True, weights=True,
                     ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0,
                     shift=1),
    "all_mean_v41": dict(v=41, bias=True, aux=True, reduction="mean", where=True,
                         weights=True, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3,
                         logit_softcap=5.0, shift=1),
    "sum_aux_v41": dict(v=41, bias=False, aux=True, reduction="sum", ignore_index=-100,
                        z_loss=1e-2),
    "none": dict(v=48, bias=True, aux=False, reduction="none", weights=True,
                 ignore_index=-100, label_smoothing=0.2, logit_softcap=3.0),
}  # fmt: skip

MESH_CASES = {
    (8, 1): ["all_mean", "none"],
    (1, 8): ["all_mean_v41", "sum_aux_v41"],
    (2, 4): ["all_mean", "all_mean_v41", "none"],
    (4, 2): ["all_mean_v41", "sum_aux_v41", "none"],
}

_OPTIONS = ("reduction", "ignore_index", "label_smoothing", "z_loss", "logit_softcap", "shift")


def case_kwargs(data, spec) -> dict:
    kw = {k: spec[k] for k in _OPTIONS if k in spec}
    for name in ("where", "weights"):
        if spec.get(name):
            kw[name] = data[name]
    return kw


def evaluate(lce, data, spec):
    """((loss, aux arrays or None), grads w.r.t. x, w (, bias)) of one case in JAX."""
    v = spec["v"]
    kw = case_kwargs(data, spec)
    args = [data["x"], data[f"w{v}"]] + ([data[f"b{v}"]] if spec["bias"] else [])

    def objective(x, w, *b):
        out = lce(x, w, data["labels"], bias=b[0] if b else None, return_aux=spec["aux"], **kw)
        loss, aux = out if spec["aux"] else (out, None)
        value = jnp.sum(loss * data["r"]) if spec["reduction"] == "none" else loss
        arrays = None if aux is None else tuple(getattr(aux, n) for n in AUX_NAMES)
        return value, (loss, arrays)

    (_, out), grads = jax.value_and_grad(objective, tuple(range(len(args))), has_aux=True)(*args)
    return out, grads


def oracle_of(data: dict, spec: dict) -> dict[str, np.ndarray]:
    """The oracle for :func:`evaluate` on the same (float64) data."""
    v = spec["v"]
    kw = case_kwargs(data, spec)
    bias = data[f"b{v}"] if spec["bias"] else None
    r = data["r"][..., : T - spec.get("shift", 0)]
    return oracle(data["x"], data[f"w{v}"], data["labels"], bias=bias, r=r, **kw)


def mesh_of(shape, axis_type=AxisType.Auto):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type, axis_type))


@functools.cache
def mesh_outputs(shape: tuple[int, int]) -> dict:
    """Every case of ``MESH_CASES[shape]``, compiled as one program."""
    mesh, names = mesh_of(shape), MESH_CASES[shape]

    def lce(*a, **k):
        return sharded_linear_cross_entropy(*a, mesh=mesh, **k)

    outs = jax.jit(lambda d: [evaluate(lce, d, CASES[n]) for n in names])(to_jax(make_data()))
    return dict(zip(names, outs, strict=True))


@pytest.mark.parametrize(
    ("shape", "case"),
    [(shape, case) for shape, names in MESH_CASES.items() for case in names],
    ids=lambda p: "x".join(map(str, p)) if isinstance(p, tuple) else p,
)
def test_mesh_matches_oracle(shape, case):
    """Loss, aux and grads (x, w, bias) on 8x1, 1x8, 2x4 and 4x2 meshes."""
    spec = CASES[case]
    want = oracle_of(rounded(make_data()), spec)
    assert_matches(mesh_outputs(shape)[case], want, jnp.float32, aux=spec["aux"], bias=spec["bias"])


# --------------------------------------------------------------------------------------
# inside the user's shard_map
# --------------------------------------------------------------------------------------

IN_SHARD_KW = dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=-100, shift=1)
IN_SHARD_SPECS = (P("data"), P(None, "model"), P("model"), P("data"), P("data"))


def in_shard_fn(check_vma: bool, grad_inside: bool, *, vocab_size=None):
    """value_and_grad (x, w, bias) of the in-shard function in a shard_map over 2x4."""
    mesh = mesh_of((2, 4))

    def loss(x, w, b, labels, where):
        return vocab_parallel_linear_cross_entropy(
            x, w, labels, bias=b, where=where, model_axis="model", data_axis="data",
            vocab_size=vocab_size, **IN_SHARD_KW,
        )  # fmt: skip

    specs = IN_SHARD_SPECS
    if grad_inside:

        def body(*a):
            return jax.value_and_grad(loss, (0, 1, 2))(*a)

        return jax.jit(
            jax.shard_map(
                body, mesh=mesh, in_specs=specs, out_specs=(P(), specs[:3]), check_vma=check_vma
            )
        )
    fn = jax.shard_map(loss, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)
    return jax.jit(jax.value_and_grad(fn, (0, 1, 2)))


def in_shard_case(labels_max=None, v=48):
    data = make_data(1)
    if labels_max is not None:
        data["labels"] = np.minimum(data["labels"], labels_max)
    jx = to_jax(data)
    args = (jx["x"], jx["w48"], jx["b48"], jx["labels"], jx["where"])
    ref = rounded(data)
    want = oracle(
        ref["x"], ref["w48"][:, :v], ref["labels"], bias=ref["b48"][:v], where=data["where"],
        **IN_SHARD_KW,
    )  # fmt: skip
    return args, want


@pytest.mark.parametrize(
    ("check_vma", "grad_inside"), [(False, False), (True, False), (True, True)]
)
def test_in_users_shard_map(check_vma, grad_inside):
    """check_vma=True is shard_map's default; the gradient inside it needs it."""
    args, want = in_shard_case()
    loss, (dx, dw, db) = in_shard_fn(check_vma, grad_inside)(*args)
    assert_close(loss, want["loss"], jnp.float32, "loss")
    for name, g in (("dx", dx), ("dw", dw), ("dbias", db)):
        assert_close(g, want[name], jnp.float32, name)


def test_in_users_shard_map_vocab_size_padding():
    """A vocabulary padded by the user: ids >= vocab_size are no class; their grads are 0."""
    args, want = in_shard_case(labels_max=44, v=45)
    loss, (dx, dw, db) = in_shard_fn(False, False, vocab_size=45)(*args)
    assert_close(loss, want["loss"], jnp.float32, "loss")
    assert_close(dx, want["dx"], jnp.float32, "dx")
    assert_close(dw[:, :45], want["dw"], jnp.float32, "dw")
    assert_close(db[:45], want["dbias"], jnp.float32, "dbias")
    np.testing.assert_array_equal(dw[:, 45:], 0.0)
    np.testing.assert_array_equal(db[45:], 0.0)


def test_in_users_shard_map_rejects_a_replicated_w():
    data = to_jax(make_data(1))
    fn = jax.shard_map(
        lambda x, w, labels: vocab_parallel_linear_cross_entropy(x, w, labels),
        mesh=mesh_of((2, 4)),
        in_specs=(P("data"), P(), P("data")),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match=r"`w` must be sharded over mesh axis 'model'"):
        fn(data["x"], data["w48"], data["labels"])


# --------------------------------------------------------------------------------------
# Explicit mesh axes
# --------------------------------------------------------------------------------------


def explicit_mesh():
    return mesh_of((2, 4), AxisType.Explicit)


@pytest.mark.parametrize("case", ["all_mean", "sum_aux_v41"])
def test_explicit_mesh_from_set_mesh(case):
    """The mesh from jax.set_mesh; w48 laid out as the function wants it (used in
    place), the rest (w41 too) unsharded: resharded inside. dw keeps w's sharding."""
    data = make_data(2)
    mesh = explicit_mesh()
    w_sharding = NamedSharding(mesh, P(None, "model"))
    placed = to_jax(data)
    placed["w48"] = jax.device_put(placed["w48"], w_sharding)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda d: evaluate(sharded_linear_cross_entropy, d, CASES[case]))(placed)
    spec = CASES[case]
    assert_matches(out, oracle_of(rounded(data), spec), jnp.float32, bias=spec["bias"])
    if spec["v"] == 48:
        assert out[1][1].sharding == w_sharding


def test_plain_entry_on_inputs_split_over_explicit_axes():
    """fusedloss.linear_cross_entropy itself: x and the labels split by batch, w (and
    its bias) by vocabulary; it runs per shard and the grads keep their primal's
    sharding."""
    data = make_data(2)
    mesh = explicit_mesh()
    placed = to_jax(data)
    shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    placed["w48"] = shard(placed["w48"], P(None, "model"))
    placed["b48"] = shard(placed["b48"], P("model"))
    for k in ("x", "labels", "where", "weights", "r"):
        placed[k] = shard(placed[k], P("data"))
    spec = CASES["all_mean"]
    with jax.set_mesh(mesh):
        out = jax.jit(lambda d: evaluate(fusedloss.linear_cross_entropy, d, spec))(placed)
    assert_matches(out, oracle_of(rounded(data), spec), jnp.float32)
    _, (dx, dw, _) = out
    assert tuple(dx.sharding.spec)[:1] == ("data",)
    assert tuple(dw.sharding.spec)[:2] == (None, "model")


def test_bf16_on_a_mesh():
    data = make_data(2)
    jx = to_jax(data, jnp.bfloat16)
    kw = dict(reduction="none", ignore_index=-100, label_smoothing=0.1)
    mesh = mesh_of((2, 4))
    got = jax.jit(lambda x, w: sharded_linear_cross_entropy(x, w, jx["labels"], mesh=mesh, **kw))(
        jx["x"], jx["w48"]
    )
    assert got.dtype == jnp.bfloat16
    ref = rounded(data, jnp.bfloat16)
    want = oracle(ref["x"], ref["w48"], data["labels"], **kw)["loss"]
    assert_close(np.asarray(got, np.float32), want, jnp.bfloat16)


# --------------------------------------------------------------------------------------
# tied embeddings
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["all_mean", "all_mean_v41"])
def test_tied_embeddings_on_a_mesh(case):
    """``Transposed(embedding)`` on a 2x4 mesh: the gradient comes out as [V, D]."""
    data, spec = make_data(3), CASES[case]
    v = spec["v"]
    mesh = mesh_of((2, 4))
    jx = to_jax(data)
    jx[f"w{v}"] = jx[f"w{v}"].T  # stored [V, D]

    def via_transposed(x, emb, *a, **k):
        return sharded_linear_cross_entropy(x, fusedloss.Transposed(emb), *a, mesh=mesh, **k)

    (loss, arrays), grads = jax.jit(lambda d: evaluate(via_transposed, d, spec))(jx)
    assert grads[1].shape == (v, D)
    grads = (grads[0], grads[1].T, *grads[2:])
    assert_matches(((loss, arrays), grads), oracle_of(rounded(data), spec), jnp.float32)


# --------------------------------------------------------------------------------------
# per-device memory
# --------------------------------------------------------------------------------------

MEM_N, MEM_D, MEM_V = 4096, 256, 64000


def temp_bytes(dp, tp, v, config=None, *, tied=False) -> int:
    """Per-device temporaries of the jitted value_and_grad, from shapes only."""
    mesh = mesh_of((dp, tp))
    sds = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
        shape, dtype, sharding=NamedSharding(mesh, spec)
    )
    x = sds((MEM_N, MEM_D), jnp.float32, P("data"))
    lab = sds((MEM_N,), jnp.int32, P("data"))
    if tied:
        w = sds((v, MEM_D), jnp.float32, P("model"))
        head = fusedloss.Transposed
    else:
        w = sds((MEM_D, v), jnp.float32, P(None, "model"))
        head = lambda w: w

    def fn(x, w, y):
        return sharded_linear_cross_entropy(x, head(w), y, mesh=mesh, config=config)

    compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(x, w, lab).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_per_device_temporaries_shrink_with_the_vocab_shard():
    """With a data axis, the w shard's gradient is formed before its all-reduce over
    the data axis: the one vocabulary-dependent temporary, [D, V/tp] float32,
    isolated as temp(2V) - temp(V)."""
    n, d, v = MEM_N, MEM_D, MEM_V
    # A 1 MiB logits block keeps the vocabulary chunk (128 columns) below V/tp, so the
    # block itself does not grow with V here.
    config = fusedloss.XlaConfig(block_bytes=2**20)
    t = {(tp, vv): temp_bytes(2, tp, vv, config) for tp in (1, 4) for vv in (v, 2 * v)}
    vocab1 = t[(1, 2 * v)] - t[(1, v)]
    vocab4 = t[(4, 2 * v)] - t[(4, v)]
    assert vocab1 <= 1.05 * 4 * d * v, "tp=1 holds more than one [D, V] f32"
    assert vocab4 <= vocab1 / 4 * 1.05 + 2**16, (vocab4, vocab1)
    assert t[(4, v)] <= t[(1, v)], t
    assert t[(4, v)] < (n // 2) * (v // 4) * 4, "tp=4 temps could hold the [N/dp, V/tp] logits"
    # Without a data axis, nothing vocabulary-sized is temporary at all.
    flat = temp_bytes(1, 4, 2 * v, config) - temp_bytes(1, 4, v, config)
    assert flat <= 2**16, flat


def test_tied_embeddings_cost_no_copy_of_w():
    tied, untied = temp_bytes(2, 4, MEM_V, tied=True), temp_bytes(2, 4, MEM_V)
    assert tied <= untied + 2**16, (tied, untied)


# --------------------------------------------------------------------------------------
# one device: a 1x1 mesh and the argument checks
# --------------------------------------------------------------------------------------


def data(v=50, b=2, t=5, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
        jnp.asarray(rng.normal(size=(d, v)) / 3, jnp.float32),
        jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
    )


MESH24 = AbstractMesh((2, 4), ("data", "model"))


@functools.cache
def mesh11():
    return jax.make_mesh((1, 1), ("data", "model"))


def test_one_by_one_mesh_equals_unsharded():
    x, w, labels = data()
    kw = dict(label_smoothing=0.1, z_loss=1e-3, shift=1, return_aux=True)

    def sharded(x, w):
        return sharded_linear_cross_entropy(x, w, labels, mesh=mesh11(), **kw)

    def plain(x, w):
        return fusedloss.linear_cross_entropy(x, w, labels, implementation="reference", **kw)

    (got, got_aux), got_g = jax.jit(jax.value_and_grad(sharded, (0, 1), has_aux=True))(x, w)
    (want, want_aux), want_g = jax.jit(jax.value_and_grad(plain, (0, 1), has_aux=True))(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, h in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_aux.lse, want_aux.lse, rtol=1e-5)
    np.testing.assert_array_equal(got_aux.correct, want_aux.correct)
    np.testing.assert_allclose(got_aux.label_logit, want_aux.label_logit, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_aux.predicted, want_aux.predicted)
    np.testing.assert_array_equal(got_aux.token_weights, want_aux.token_weights)
    assert int(got_aux.num_tokens) == int(want_aux.num_tokens) == 8


def test_mesh_from_context():
    x, w, labels = data()
    with jax.set_mesh(mesh11()):
        got = jax.jit(lambda x, w: sharded_linear_cross_entropy(x, w, labels, reduction="sum"))(
            x, w
        )
    want = fusedloss.linear_cross_entropy(x, w, labels, reduction="sum", implementation="reference")
    np.testing.assert_allclose(got, want, rtol=1e-5)


def in_shard_map(fn, *arrays, specs):
    placed = [
        jax.device_put(a, NamedSharding(mesh11(), s)) for a, s in zip(arrays, specs, strict=True)
    ]
    return jax.shard_map(fn, mesh=mesh11(), in_specs=specs, out_specs=P(), check_vma=False)(*placed)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(mesh=MESH24, data_axis="batch"), ValueError, r"`data_axis`='batch' is not an axis"),
        (dict(mesh=MESH24, data_axis="model"), ValueError, r"must name different mesh axes"),
        (dict(mesh=MESH24, model_axis=3), TypeError, r"A mesh axis must be a name"),
        (dict(mesh=AbstractMesh((3, 1), ("data", "model"))), ValueError, r"divisible by .* \(3\)"),
        (dict(mesh=MESH24, config=fusedloss.XlaConfig(strategy="grad_in_forward")), ValueError,
         r"fuses a reduced cross-entropy"),
        (dict(mesh=MESH24, config=object()), TypeError, r"must be a .*XlaConfig.*, got object"),
        (dict(mesh=MESH24, reduction="avg"), ValueError, r"`reduction` must be one of"),
        (dict(mesh=MESH24, label_smoothing=1.0), ValueError, r"`label_smoothing` must be in"),
        (dict(mesh=MESH24, bias=jnp.zeros(49)), ValueError, r"`bias` must have shape \(50,\)"),
    ],
)  # fmt: skip
def test_wrapper_argument_errors(kwargs, error, match):
    x, w, labels = data()
    with pytest.raises(error, match=match):
        sharded_linear_cross_entropy(x, w, labels, **kwargs)


def test_wrapper_shift_needs_a_batch_axis_when_tokens_are_split():
    x, w, labels = data()
    with pytest.raises(ValueError, match=r"needs `x` of shape \[B, T, D\]"):
        sharded_linear_cross_entropy(x[0, :4], w, labels[0, :4], mesh=MESH24, shift=1)


def test_wrapper_without_mesh():
    x, w, labels = data()
    with pytest.raises(ValueError, match=r"no mesh is set"):
        sharded_linear_cross_entropy(x, w, labels)


def test_wrapper_rejects_out_of_range_labels_eagerly():
    x, w, labels = data()
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 50\); got 50"):
        sharded_linear_cross_entropy(x, w, labels.at[1, 2].set(50), mesh=mesh11())


def test_out_of_range_label_is_nan_under_jit():
    x, w, labels = data()
    bad = labels.at[1, 2].set(50)
    loss = jax.jit(lambda lab: sharded_linear_cross_entropy(x, w, lab, mesh=mesh11()))(bad)
    assert np.isnan(loss)


def test_in_shard_outside_shard_map():
    x, w, labels = data()
    with pytest.raises(ValueError, match=r"`model_axis`='model' is not a mesh axis"):
        vocab_parallel_linear_cross_entropy(x, w, labels)


def test_in_shard_vocab_size_range():
    x, w, labels = data()

    def fn(x, w, labels):
        return vocab_parallel_linear_cross_entropy(x, w, labels, vocab_size=51)

    with pytest.raises(ValueError, match=r"`vocab_size` must be an int in \[1, 50\]"):
        in_shard_map(fn, x, w, labels, specs=(P(), P(None, "model"), P()))


def test_in_shard_vocab_size_excludes_padding_columns():
    """Columns at ids >= vocab_size take no part in the loss (and get no gradient)."""
    x, w, labels = data(v=50)
    labels = jnp.minimum(labels, 44)

    def fn(x, w, labels):
        return vocab_parallel_linear_cross_entropy(
            x, w, labels, vocab_size=45, label_smoothing=0.2, logit_softcap=2.0
        )

    specs = (P(), P(None, "model"), P())
    got, g = jax.jit(jax.value_and_grad(lambda w: in_shard_map(fn, x, w, labels, specs=specs)))(w)
    want, h = jax.jit(
        jax.value_and_grad(
            lambda w: fusedloss.linear_cross_entropy(
                x, w, labels, label_smoothing=0.2, logit_softcap=2.0, implementation="reference"
            )
        )
    )(w[:, :45])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(g[:, :45], h, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g[:, 45:], 0.0)
