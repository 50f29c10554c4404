"""Multi-device checks behind tests/test_sharded.py, run in a subprocess.

The test session's JAX is already initialized with one CPU device, so the checks that
need a mesh run in a process of their own with 8 host devices, under the test suite's
settings (strict dtype promotion, rank promotion "raise", warnings as errors)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -W error tests/_sharded_check.py GROUP [GROUP ...]

prints one JSON object per case and line: ``{"case": str, "ok": bool, "detail": str}``
(plus ``"data"`` where a case measures something). Cases are batched into one
compiled program per mesh where possible: compiling dominates the runtime. Importing
this module (pytest collects it for doctests) changes no setting.
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import fusedloss
from fusedloss.heads.sharded import (
    sharded_linear_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

B, T, D = 8, 6, 16
RTOL = 1e-5


def report(case: str, ok: bool, detail: str = "", **data) -> None:
    print(json.dumps({"case": case, "ok": bool(ok), "detail": detail, **data}), flush=True)


def make_data(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 41, (B, T)).astype(np.int32)
    labels[0, 2] = labels[3, 4] = -100  # ignored tokens
    return {
        "x": jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32),
        "w48": jnp.asarray(rng.normal(size=(D, 48)) / 3, jnp.float32),
        "w41": jnp.asarray(rng.normal(size=(D, 41)) / 3, jnp.float32),
        "b48": jnp.asarray(rng.normal(size=(48,)), jnp.float32),
        "b41": jnp.asarray(rng.normal(size=(41,)), jnp.float32),
        "labels": jnp.asarray(labels),
        "where": jnp.asarray(rng.random((B, T)) < 0.85),
        "weights": jnp.asarray(rng.random((B, T)), jnp.float32),
        "r": jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
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


def evaluate(lce, data, spec):
    """(per-example loss, aux arrays, grads w.r.t. x, w (, bias)) of one case."""
    v = spec["v"]
    kw = {
        k: spec[k]
        for k in ("reduction", "ignore_index", "label_smoothing", "z_loss", "logit_softcap")
        if k in spec
    }
    kw["shift"] = spec.get("shift", 0)
    for name in ("where", "weights"):
        if spec.get(name):
            kw[name] = data[name]
    args = [data["x"], data[f"w{v}"]] + ([data[f"b{v}"]] if spec["bias"] else [])

    def objective(x, w, *b):
        out = lce(x, w, data["labels"], bias=b[0] if b else None, return_aux=spec["aux"], **kw)
        loss, aux = out if spec["aux"] else (out, None)
        value = jnp.sum(loss * data["r"]) if spec["reduction"] == "none" else loss
        arrays = None if aux is None else (aux.lse, aux.correct, aux.num_tokens, aux.weight_sum)
        return value, (loss, arrays)

    (_, out), grads = jax.value_and_grad(objective, tuple(range(len(args))), has_aux=True)(*args)
    return out, grads


def compare(got, want) -> str:
    """'' if every leaf matches (float32 rtol 1e-5), else the first mismatch."""
    gl, wl = jax.tree.leaves(got), jax.tree.leaves(want)
    if len(gl) != len(wl):
        return f"{len(gl)} leaves, expected {len(wl)}"
    for i, (g, w) in enumerate(zip(gl, wl, strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"leaf {i}: {g.shape} {g.dtype}, expected {w.shape} {w.dtype}"
        if w.dtype == np.bool_ or np.issubdtype(w.dtype, np.integer):
            if not np.array_equal(g, w):
                return f"leaf {i}: {int((g != w).sum())} entries differ"
            continue
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        try:
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * 0.1 * max(scale, 1e-3))
        except AssertionError as e:
            return f"leaf {i}: {str(e).strip()[:600]}"
    return ""


def run_case(case, fn):
    """Reports ``fn()`` ('' = ok, else what is wrong); an exception fails the case."""
    try:
        err = fn()
    except Exception:
        err = traceback.format_exc(limit=4)[-1500:]
    report(case, not err, err)


def reference(data, names):
    def ref_lce(*a, **k):
        return fusedloss.linear_cross_entropy(*a, implementation="reference", **k)

    fn = jax.jit(lambda d: [evaluate(ref_lce, d, CASES[n]) for n in names])
    return dict(zip(names, fn(data), strict=True))


def mesh_of(shape, axis_type=AxisType.Auto):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type, axis_type))


def group_meshes():
    data = make_data()
    refs = reference(data, list(CASES))
    for shape, names in MESH_CASES.items():
        mesh = mesh_of(shape)

        def lce(*a, mesh=mesh, **k):
            return sharded_linear_cross_entropy(*a, mesh=mesh, **k)

        def run(d, names=names, lce=lce):
            return [evaluate(lce, d, CASES[n]) for n in names]

        prefix = f"mesh{shape[0]}x{shape[1]}"
        try:
            outs = jax.jit(run)(data)
        except Exception:
            for n in names:
                report(f"{prefix}-{n}", False, traceback.format_exc(limit=4)[-1500:])
            continue
        for n, out in zip(names, outs, strict=True):
            err = compare(out, refs[n])
            report(f"{prefix}-{n}", not err, err)


IN_SHARD_KW = dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=-100, shift=1)


def in_shard_fn(check_vma: bool, grad_inside: bool, *, vocab_size=None):
    """A user's own shard_map over a 2x4 mesh around the in-shard function."""
    mesh = mesh_of((2, 4))

    def loss(x, w, b, labels, where):
        return vocab_parallel_linear_cross_entropy(
            x, w, labels, bias=b, where=where, model_axis="model", data_axis="data",
            vocab_size=vocab_size, **IN_SHARD_KW,
        )  # fmt: skip

    specs = (P("data"), P(None, "model"), P("model"), P("data"), P("data"))
    if grad_inside:

        def body(x, w, b, labels, where):
            return jax.value_and_grad(loss, (0, 1, 2))(x, w, b, labels, where)

        return jax.jit(
            jax.shard_map(
                body,
                mesh=mesh,
                in_specs=specs,
                out_specs=(P(), specs[:3]),
                check_vma=check_vma,
            )
        )
    fn = jax.shard_map(loss, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)
    return jax.jit(jax.value_and_grad(fn, (0, 1, 2)))


def in_shard_reference(data, labels, v):
    def loss(x, w, b):
        return fusedloss.linear_cross_entropy(
            x, w, labels, bias=b, where=data["where"], implementation="reference", **IN_SHARD_KW
        )

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(
        data["x"], data["w48"][:, :v], data["b48"][:v]
    )


def in_shard_cases(check_vma: bool, inside_too: bool):
    data = make_data(1)
    args = (data["x"], data["w48"], data["b48"], data["labels"], data["where"])
    ref = in_shard_reference(data, data["labels"], 48)
    for inside in (False, True) if inside_too else (False,):
        name = f"in_shard-check_vma_{check_vma}-grad_{'inside' if inside else 'outside'}"
        run_case(name, lambda i=inside: compare(in_shard_fn(check_vma, i)(*args), ref))
    return data


def group_vma():
    """The user's shard_map with check_vma=True, gradients taken inside and outside."""
    in_shard_cases(True, True)


def group_in_shard():
    data = in_shard_cases(False, False)

    # A vocabulary padded by the user: ids >= vocab_size are excluded, their grads are 0.
    def padded():
        labels = jnp.minimum(data["labels"], 44)
        a = (data["x"], data["w48"], data["b48"], labels, data["where"])
        got = in_shard_fn(False, False, vocab_size=45)(*a)
        want = in_shard_reference(data, labels, 45)
        (lv, (gx, gw, gb)) = got
        if np.any(np.asarray(gw[:, 45:])) or np.any(np.asarray(gb[45:])):
            return "padded columns got a nonzero gradient"
        return compare((lv, (gx, gw[:, :45], gb[:45])), want)

    run_case("in_shard-vocab_size_padding", padded)

    def replicated_w():
        mesh = mesh_of((2, 4))
        fn = jax.shard_map(
            lambda x, w, labels: vocab_parallel_linear_cross_entropy(x, w, labels),
            mesh=mesh,
            in_specs=(P("data"), P(), P("data")),
            out_specs=P(),
        )
        try:
            fn(data["x"], data["w48"], data["labels"])
        except ValueError as e:
            ok = "must be sharded over mesh axis 'model'" in str(e)
            return "" if ok else f"wrong message: {e}"
        return "no error for a replicated w"

    run_case("in_shard-replicated_w_error", replicated_w)


def group_explicit():
    """Explicit mesh axes, the mesh from `jax.set_mesh`, unsharded inputs, bf16."""
    data = make_data(2)
    names = ["all_mean", "sum_aux_v41"]
    want = reference(data, names)
    mesh = mesh_of((2, 4), AxisType.Explicit)

    def explicit():
        # w48 laid out as the function wants it (used in place); the rest, w41 too,
        # unsharded (padded and resharded inside). Gradients keep their primal's
        # sharding.
        w_sharding = NamedSharding(mesh, P(None, "model"))
        placed = dict(data, w48=jax.device_put(data["w48"], w_sharding))
        with jax.set_mesh(mesh):
            outs = jax.jit(
                lambda d: [evaluate(sharded_linear_cross_entropy, d, CASES[n]) for n in names]
            )(placed)
        for n, out in zip(names, outs, strict=True):
            if err := compare(out, want[n]):
                return f"{n}: {err}"
        dw = outs[0][1][1]
        if dw.sharding != w_sharding:
            return f"dw sharding {dw.sharding}, expected {w_sharding}"
        return ""

    run_case("explicit-set_mesh", explicit)

    def plain_entry():
        # fusedloss.linear_cross_entropy itself on inputs split over Explicit axes: x
        # and the labels by batch, w48 (and its bias) by vocabulary. It runs per shard,
        # and the gradients keep their primal's sharding.
        shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        placed = dict(data, w48=shard(data["w48"], P(None, "model")))
        placed["b48"] = shard(data["b48"], P("model"))
        for k in ("x", "labels", "where", "weights", "r"):
            placed[k] = shard(data[k], P("data"))
        with jax.set_mesh(mesh):
            out = jax.jit(lambda d: evaluate(fusedloss.linear_cross_entropy, d, CASES["all_mean"]))(
                placed
            )
        if err := compare(out, want["all_mean"]):
            return err
        _, (dx, dw, _) = out
        for name, g, spec in (("dx", dx, P("data")), ("dw", dw, P(None, "model"))):
            if tuple(g.sharding.spec)[: len(spec)] != tuple(spec):
                return f"{name} sharding {g.sharding.spec}, expected {spec}"
        return ""

    run_case("explicit-plain_entry", plain_entry)

    def bf16():
        # Same bf16 inputs through the unsharded xla path and the sharded one.
        x, w = data["x"].astype(jnp.bfloat16), data["w48"].astype(jnp.bfloat16)
        kw = dict(reduction="none", ignore_index=-100, label_smoothing=0.1)
        one = fusedloss.linear_cross_entropy(x, w, data["labels"], implementation="xla", **kw)
        many = jax.jit(
            lambda x, w: sharded_linear_cross_entropy(
                x, w, data["labels"], mesh=mesh_of((2, 4)), **kw
            )
        )(x, w)
        if many.dtype != jnp.bfloat16:
            return f"dtype {many.dtype}, expected bfloat16"
        a, b = np.asarray(many, np.float32), np.asarray(one, np.float32)
        return "" if np.allclose(a, b, rtol=1e-2, atol=1e-2) else f"max diff {np.abs(a - b).max()}"

    run_case("explicit-bf16", bf16)


def temp_bytes(dp, tp, n, d, v, config=None, grad=True) -> int:
    """Per-device temporaries of the jitted loss (or value_and_grad), from shapes only."""
    mesh = mesh_of((dp, tp))
    x = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=NamedSharding(mesh, P(None, "model")))
    lab = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P("data")))

    def fn(*a):
        return sharded_linear_cross_entropy(*a, mesh=mesh, config=config)

    fn = jax.value_and_grad(fn, (0, 1)) if grad else fn
    compiled = jax.jit(fn).lower(x, w, lab).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def group_memory():
    """Per-device temporaries shrink with the vocabulary shard.

    With a data axis, the gradient of the w shard is formed before its all-reduce over
    the data axis: the one vocabulary-dependent temporary, [D, V/tp] float32. It is
    isolated as temp(2V) - temp(V).
    """
    n, d, v = 4096, 256, 64000
    # A 1 MiB logits block keeps the vocabulary chunk (128 columns) below V/tp, so the
    # block itself does not grow with V here.
    config = fusedloss.XlaConfig(block_bytes=2**20)
    t = {(tp, vv): temp_bytes(2, tp, n, d, vv, config) for tp in (1, 4) for vv in (v, 2 * v)}
    vocab1 = t[(1, 2 * v)] - t[(1, v)]
    vocab4 = t[(4, 2 * v)] - t[(4, v)]
    problems = []
    if vocab1 > 1.05 * 4 * d * v:
        problems.append(f"tp=1 holds {vocab1} vocabulary-dependent bytes, > one [D, V] f32")
    if vocab4 > vocab1 / 4 * 1.05 + 2**16:
        problems.append(f"tp=4 vocabulary-dependent {vocab4} > a quarter of tp=1's {vocab1}")
    if t[(4, v)] > t[(1, v)]:
        problems.append(f"tp=4 temps {t[(4, v)]} > tp=1 temps {t[(1, v)]}")
    if t[(4, v)] >= (n // 2) * (v // 4) * 4:
        problems.append(f"tp=4 temps {t[(4, v)]} could hold the [N/dp, V/tp] logits")
    # Without a data axis, nothing vocabulary-sized is temporary at all.
    flat = temp_bytes(1, 4, n, d, 2 * v, config) - temp_bytes(1, 4, n, d, v, config)
    if flat > 2**16:
        problems.append(f"dp=1, tp=4: {flat} vocabulary-dependent temp bytes")
    report(
        "memory",
        not problems,
        "; ".join(problems),
        data={"temps": {f"tp{k[0]}_v{k[1]}": b for k, b in t.items()}, "dp1_vocab": flat},
    )


def group_tied():
    """``w = embedding.T`` (tied embeddings): same results, and no copy of ``w``."""
    data = make_data(3)
    mesh = mesh_of((2, 4))
    names = ["all_mean", "all_mean_v41"]

    def tied(lce):
        def run(d):
            outs = []
            for n in names:
                v = CASES[n]["v"]
                emb = d[f"w{v}"].T  # stored [V, D]; the loss sees emb.T
                dd = {**d, f"w{v}": emb}

                def via_t(x, e, *a, lce=lce, **k):
                    return lce(x, e.T, *a, **k)

                (loss, arrays), grads = evaluate(via_t, dd, CASES[n])
                outs.append(((loss, arrays), (grads[0], grads[1].T, *grads[2:])))
            return outs

        return run

    refs = reference(data, names)
    outs = jax.jit(tied(lambda *a, **k: sharded_linear_cross_entropy(*a, mesh=mesh, **k)))(data)
    for n, out in zip(names, outs, strict=True):
        err = compare(out, refs[n])
        report(f"tied-{n}", not err, err)

    def memory():
        n, d, v = 4096, 256, 64000
        x = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=NamedSharding(mesh, P("data")))
        lab = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
        e = jax.ShapeDtypeStruct((v, d), jnp.float32, sharding=NamedSharding(mesh, P("model")))

        def fn(x, e, y):
            return sharded_linear_cross_entropy(x, e.T, y, mesh=mesh)

        vg = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(x, e, lab).compile()
        tied_bytes = int(vg.memory_analysis().temp_size_in_bytes)
        untied = temp_bytes(2, 4, n, d, v)
        if tied_bytes > untied + 2**16:
            return f"tied {tied_bytes} temp bytes > untied {untied}"
        return ""

    run_case("tied-memory", memory)


def group_table():
    """Not a test: the per-device temporaries at Llama-3-8B's head, for the docs."""
    n, d, v = 8192, 4096, 128256
    for dp, tp in ((1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4)):
        fwd, vg = (temp_bytes(dp, tp, n, d, v, grad=g) for g in (False, True))
        report(f"table-{dp}x{tp}", True, data={"forward": fwd, "value_and_grad": vg})


GROUPS = {
    "meshes": group_meshes,
    "in_shard": group_in_shard,
    "vma": group_vma,
    "explicit": group_explicit,
    "memory": group_memory,
    "tied": group_tied,
    "table": group_table,
}


if __name__ == "__main__":
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    if jax.device_count() != 8:
        report("devices", False, f"expected 8 CPU devices, got {jax.devices()}")
        sys.exit(1)
    for group in sys.argv[1:] or [g for g in GROUPS if g != "table"]:
        GROUPS[group]()
