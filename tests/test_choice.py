"""Where a fused head runs and on what: every way a user sets the backend (a name, a
list, a config of one backend with a list, the arguments' shardings, ``jax.set_mesh``)
gives the float64 oracle's result on every head; the default plans at real heads on
the host; the log-probs head's bf16 gradients within the materialized error budget."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from oracles import assert_within_error_budget

import fusedloss
from fusedloss import PallasGpuConfig, PallasTpuConfig, XlaConfig

N, D, V, K = 24, 16, 75, 4
GPU_INTERPRET = PallasGpuConfig(block_tokens=16, block_vocab=32, block_d=16, interpret=True)
TPU_INTERPRET = PallasTpuConfig(block_tokens=8, block_vocab=32, interpret=True)
SMALL_XLA = XlaConfig(strategy="recompute", token_chunk=8, vocab_chunk=32)

# (implementation, config, what runs on this CPU host): names, lists, and a config of
# one backend with a list of several (the config goes to the backend that takes it).
CHOICES = [
    (None, None, "xla"),
    ("xla", SMALL_XLA, "xla"),
    ("reference", None, "reference"),
    (("pallas_gpu", "xla"), None, "xla"),  # the kernel compiles for GPUs only: next
    (("pallas_tpu", "reference"), None, "reference"),
    (("pallas_gpu", "xla"), SMALL_XLA, "xla"),
    (("pallas_gpu", "xla"), GPU_INTERPRET, "pallas_gpu"),
    (["pallas_tpu", "xla"], TPU_INTERPRET, "pallas_tpu"),
]


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) / 2).astype(np.float32)
    labels = rng.integers(0, V, N).astype(np.int32)
    ids = np.stack([rng.permutation(V)[:K] for _ in range(N)]).astype(np.int32)
    tlp = np.log(rng.dirichlet(np.ones(K + 1), N)[:, :K]).astype(np.float32)
    return x, w, labels, ids, tlp


def heads(x, w, labels, ids, tlp, **kw):
    """(cross-entropy, log-probs + entropy, top-K) of one call each."""
    ce = fusedloss.linear_cross_entropy(x, w, labels, label_smoothing=0.1, **kw)
    lp, ent = fusedloss.linear_log_probs(x, w, labels, temperature=0.7, return_entropy=True, **kw)
    topk = fusedloss.linear_topk_distillation_loss(x, w, ids, tlp, **kw)
    return ce, jnp.sum(lp) + jnp.sum(ent), topk


def oracle(x, w, labels, ids, tlp):
    with jax.enable_x64(True):
        z = jnp.asarray(x, jnp.float64) @ jnp.asarray(w, jnp.float64)
        logp = jax.nn.log_softmax(z, -1)
        ce = -jnp.mean(0.9 * jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
                       + 0.1 * jnp.mean(logp, -1))  # fmt: skip
        lq = jax.nn.log_softmax(z / 0.7, -1)
        lp = jnp.take_along_axis(lq, labels[:, None], -1)[:, 0]
        rl = jnp.sum(lp) - jnp.sum(jnp.exp(lq) * lq)
        qk = jnp.take_along_axis(logp, ids, -1)
        pk = jnp.exp(jnp.asarray(tlp, jnp.float64))
        rp, rq = 1 - pk.sum(-1), 1 - jnp.exp(qk).sum(-1)
        kl = jnp.sum(pk * (jnp.log(pk) - qk), -1) + rp * (jnp.log(rp) - jnp.log(rq))
        return [float(v) for v in (ce, rl, jnp.mean(kl))]


@pytest.mark.parametrize(
    ("implementation", "config", "ran"),
    CHOICES,
    ids=[f"{i}-{c[2]}" for i, c in enumerate(CHOICES)],
)
def test_every_choice_gives_the_oracle_on_every_head(implementation, config, ran):
    x, w, labels, ids, tlp = data()
    kw = dict(implementation=implementation, config=config)
    got = jax.jit(functools.partial(heads, **kw))(x, w, labels, ids, tlp)
    for g, want in zip(got, oracle(x, w, labels, ids, tlp), strict=True):
        np.testing.assert_allclose(float(g), want, rtol=2e-5)
    # The backend that ran (the aux names it; top-K falls past a kernel to the next).
    _, aux = fusedloss.linear_cross_entropy(x, w, labels, return_aux=True, **kw)
    assert aux.implementation == ran, aux.implementation


def test_where_the_arrays_live_and_the_context_mesh():
    """Arguments committed to a device, and a call under ``jax.set_mesh`` with the
    tokens split over an Explicit data axis: the same results as plain arrays."""
    x, w, labels, ids, tlp = data(1)
    want = oracle(x, w, labels, ids, tlp)
    dev = SingleDeviceSharding(jax.devices()[3])
    placed = [jax.device_put(a, dev) for a in (x, w, labels, ids, tlp)]
    got = jax.jit(heads)(*placed)
    assert all(g.sharding == dev for g in got)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        split = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, labels)]
        ce = jax.jit(lambda x, w, y: fusedloss.linear_cross_entropy(x, w, y, label_smoothing=0.1))(
            split[0], jnp.asarray(w), split[1]
        )
    for g, wv in zip([*got[:2], ce], [*want[:2], want[0]], strict=True):
        np.testing.assert_allclose(float(g), wv, rtol=2e-5)


def test_bad_choices_are_refused():
    x, w, labels, _, _ = data()
    ce = functools.partial(fusedloss.linear_cross_entropy, x, w, labels)
    with pytest.raises(TypeError, match=r"`config` must be a XlaConfig .* got PallasTpuConfig"):
        ce(implementation=("xla", "reference"), config=TPU_INTERPRET)
    with pytest.raises(ValueError, match=r"`implementation` must be one of .* got 'triton'"):
        ce(implementation=("xla", "triton"))
    with pytest.raises(ValueError, match=r"must not be an empty sequence"):
        ce(implementation=())
    with pytest.raises(NotImplementedError, match=r"pallas_tpu compiles for TPUs"):
        ce(implementation="pallas_tpu")


@pytest.mark.parametrize(
    ("head", "hp", "per_token", "want"),
    [
        ("cross_entropy", {}, False, ("grad_in_forward", 256)),
        ("cross_entropy", {}, True, ("recompute", 4096)),
        ("log_probs", {"temperature": 0.8, "entropy": True}, True, ("recompute", 4096)),
    ],
)
def test_default_plan_on_the_host_at_llama3_8b(head, hp, per_token, want):
    """Llama-3-8B's head (N=8192, D=4096, V=128256, f32) on the host: the chunked xla
    core; a reduced cross-entropy forms its gradients in the forward pass, per-token
    statistics (``reduction="none"``, log-probs at a temperature with entropy) recompute."""
    from fusedloss.heads._engine import Hyper, Problem
    from fusedloss.heads._registry import choose_for

    problem = Problem(8192, 4096, 128256, jnp.float32, False, per_token, Hyper(**hp))
    choice = choose_for(None, False, None, problem, None)
    assert (choice.name, choice.plan.strategy, choice.plan.tn) == ("xla", *want), choice


def test_log_probs_bf16_gradients_within_the_materialized_error_budget():
    """bf16 ``dx`` and ``dw`` of log-probs with entropy at T=0.8 (a clamped last
    vocabulary chunk) are no further from float64 than the materialized bf16 path."""
    rng = np.random.default_rng(5)
    n, d, v = 96, 64, 1000
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) / 4, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    c1, c2 = (jnp.asarray(rng.normal(size=n), jnp.float32) for _ in range(2))

    def fused(x, w):
        lp, ent = fusedloss.linear_log_probs(
            x, w, labels, temperature=0.8, return_entropy=True,
            config=XlaConfig(strategy="recompute", vocab_chunk=384),
        )  # fmt: skip
        return jnp.sum(lp * c1) + jnp.sum(ent * c2)

    def materialized(x, w):  # what a bf16 training step writes
        logq = jax.nn.log_softmax((x @ w).astype(jnp.float32) / 0.8, -1)
        lp = jnp.take_along_axis(logq, labels[:, None], -1)[:, 0]
        return jnp.sum(lp * c1) - jnp.sum(jnp.sum(jnp.exp(logq) * logq, -1) * c2)

    got = jax.jit(jax.grad(fused, (0, 1)))(x, w)
    naive = jax.jit(jax.grad(materialized, (0, 1)))(x, w)
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)

        def ref_fn(x, w):
            logq = jax.nn.log_softmax(x @ w / 0.8, -1)
            lp = jnp.take_along_axis(logq, labels[:, None], -1)[:, 0]
            return jnp.sum(lp * f64(c1)) - jnp.sum(jnp.sum(jnp.exp(logq) * logq, -1) * f64(c2))

        ref = jax.grad(ref_fn, (0, 1))(f64(x), f64(w))
    for name, g, nv, r in zip(("dx", "dw"), got, naive, ref, strict=True):
        assert g.dtype == jnp.bfloat16
        assert_within_error_budget(name, g, nv, r)
