"""Tests for fusedloss.heads.sharded (data- and vocab-parallel).

The multi-device checks run in subprocesses with 8 forced CPU devices
(tests/_sharded_check.py): this process's JAX is initialized with one device, and
other tests must not see a different device count. Each test runs one batch of cases
(one JAX start, one compiled program per mesh) and reports every failing case by
name. The argument checks and a 1x1 mesh run here.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fusedloss
from fusedloss.heads.sharded import (
    sharded_linear_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

CHECK = Path(__file__).with_name("_sharded_check.py")


def run_check(*groups: str) -> dict[str, dict]:
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(CHECK), *groups],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["case"]] = r
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert results, f"no results\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return results


def assert_all_ok(results: dict[str, dict], expected: set[str]) -> None:
    assert set(results) == expected
    failed = {k: r["detail"] for k, r in results.items() if not r["ok"]}
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())


def test_meshes_match_single_device():
    """8x1, 1x8, 2x4, 4x2: loss, aux and grads (x, w, bias) equal one device's."""
    cases = {
        "mesh8x1-all_mean",
        "mesh8x1-none",
        "mesh1x8-all_mean_v41",
        "mesh1x8-sum_aux_v41",
        "mesh2x4-all_mean",
        "mesh2x4-all_mean_v41",
        "mesh2x4-none",
        "mesh4x2-all_mean_v41",
        "mesh4x2-sum_aux_v41",
        "mesh4x2-none",
    }
    assert_all_ok(run_check("meshes"), cases)


def test_in_users_shard_map():
    """The in-shard function in a user's shard_map; vocab_size padding; replicated w."""
    cases = {
        "in_shard-check_vma_False-grad_outside",
        "in_shard-vocab_size_padding",
        "in_shard-replicated_w_error",
    }
    assert_all_ok(run_check("in_shard"), cases)


def test_in_users_shard_map_check_vma():
    """check_vma=True (shard_map's default), gradients inside and outside it."""
    cases = {"in_shard-check_vma_True-grad_outside", "in_shard-check_vma_True-grad_inside"}
    assert_all_ok(run_check("vma"), cases)


def test_explicit_mesh_and_bf16():
    """Explicit axes with the mesh from jax.set_mesh and unsharded inputs; the plain
    linear_cross_entropy on inputs split over Explicit axes; bf16."""
    assert_all_ok(
        run_check("explicit"), {"explicit-set_mesh", "explicit-plain_entry", "explicit-bf16"}
    )


def test_tied_embeddings_on_a_mesh():
    """``w = embedding.T`` on a 2x4 mesh (also padded): single-device results, no copy."""
    assert_all_ok(run_check("tied"), {"tied-all_mean", "tied-all_mean_v41", "tied-memory"})


def test_per_device_temporaries_shrink_with_the_vocab_shard():
    results = run_check("memory")
    assert_all_ok(results, {"memory"})
    temps = results["memory"]["data"]["temps"]
    vocab1 = temps["tp1_v128000"] - temps["tp1_v64000"]
    vocab4 = temps["tp4_v128000"] - temps["tp4_v64000"]
    assert vocab4 <= vocab1 / 4 * 1.05 + 2**16


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
