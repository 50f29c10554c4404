"""The post-training objectives on a mesh of the 8 host devices (through
``fusedloss.sharded_linear_log_probs``) equal the single-device call: values and
gradients w.r.t. x, w and bias, with masked tokens and an all-masked row."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

import fusedloss

D, V = 8, 40  # V splits over model axes of 2 and 4


def _data(rows, t, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, t, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) / 2, jnp.float32)
    bias = jnp.asarray(0.3 * rng.normal(size=(V,)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, size=(rows, t)), jnp.int32)
    mask = rng.random((rows, t)) < 0.7
    mask[1] = False  # an all-masked row
    return x, w, bias, tokens, jnp.asarray(mask), rng


def _compare(objective, mesh, x, w, bias):
    """One program: the objective on ``mesh`` and on one device, values and grads."""
    grad = lambda m: jax.value_and_grad(lambda *a: objective(*a, mesh=m), (0, 1, 2))
    program = jax.jit(lambda *a: (grad(mesh)(*a), grad(None)(*a)))
    assert "shard_map" in str(program.trace(x, w, bias).jaxpr)  # the mesh path ran
    on_mesh, single = program(x, w, bias)
    np.testing.assert_allclose(on_mesh[0], single[0], rtol=1e-5, atol=1e-6)
    for g_mesh, g_one in zip(on_mesh[1], single[1], strict=True):
        np.testing.assert_allclose(g_mesh, g_one, rtol=1e-4, atol=1e-6)
    assert np.any(np.asarray(single[1][1]))


def test_grpo_and_dpo_on_meshes_equal_one_device():
    mesh_2x4 = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    mesh_4x2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    # GRPO with clip-higher, entropy bonus (at the sampling temperature) and k3 KL.
    x, w, bias, tokens, mask, rng = _data(4, 6, 0)
    old = jnp.asarray(rng.normal(scale=0.3, size=(4, 6)) - 3.5, jnp.float32)
    ref = jnp.asarray(rng.normal(scale=0.3, size=(4, 6)) - 3.5, jnp.float32)
    adv = jnp.asarray(rng.normal(size=(4,)), jnp.float32)

    def grpo(x, w, bias, mesh):
        return fusedloss.linear_policy_gradient_loss(
            x, w, tokens, adv, bias=bias, where=mask, old_log_probs=old, ref_log_probs=ref,
            beta=0.05, entropy_coef=0.01, epsilon_high=0.28, temperature=0.8, mesh=mesh,
        )  # fmt: skip

    _compare(grpo, mesh_2x4, x, w, bias)

    # DPO: 2 chosen rows then 2 rejected, reference sums given.
    x, w, bias, tokens, mask, rng = _data(4, 5, 1)
    ref_sums = jnp.asarray(rng.uniform(-14, -6, size=(4,)), jnp.float32)

    def dpo(x, w, bias, mesh):
        return fusedloss.linear_preference_loss(
            x, w, tokens, bias=bias, where=mask, ref_log_probs=ref_sums, beta=0.3,
            loss_type="rpo", mesh=mesh,
        )  # fmt: skip

    _compare(dpo, mesh_4x2, x, w, bias)
