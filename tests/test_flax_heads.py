"""Flax output layers through ``fusedloss.flax_heads.head_weights``.

The oracle is the Flax model itself: its output layer applied as Flax applies it
(``nnx.Linear`` / ``nn.Dense`` call, ``Embed.attend``), then
``optax.losses.softmax_cross_entropy_with_integer_labels``. Losses, parameter
gradients, optimizer trajectories and the compiled temporaries of a training step
are compared with that materialized model.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import fusedloss
from fusedloss.flax_heads import head_weights

HEADS = ["linear_bias", "linear_no_bias", "tied"]


def ce(logits, labels):
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def update(optimizer, model, grads):
    # optax's Adam bias correction raises a float to an int32 step count, which the
    # test-wide strict promotion refuses; our code is traced under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        optimizer.update(model, grads)


def assert_trees_close(actual, desired, rtol=1e-5):
    """Leafwise rtol, with an absolute floor at rtol times the leaf's largest entry
    (entries of a gradient near 0 carry the rounding of the large ones)."""
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_d, tree_d = jax.tree.flatten(desired)
    assert tree_a == tree_d
    for a, d in zip(leaves_a, leaves_d, strict=True):
        d = np.asarray(d)
        np.testing.assert_allclose(a, d, rtol=rtol, atol=rtol * float(np.max(np.abs(d))))


def assert_fused_step_holds_no_logits(temps, params, vocab, num_tokens):
    """Both training steps hold the gradients and Adam's updates of the parameters
    (two parameter-sized sets of temporaries); the materialized one also holds the
    ``[N, V]`` float32 logits and their gradient, the fused one only chunks of them."""
    logits_bytes = num_tokens * vocab * 4
    params_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
    assert temps["materialized"] > temps["fused"] + logits_bytes, temps
    assert temps["fused"] < 2 * params_bytes + logits_bytes / 8, (temps, params_bytes)


# ---- nnx -----------------------------------------------------------------------------


class NnxLM(nnx.Module):
    """Embedding, one hidden layer and an output layer (Linear or the tied Embed)."""

    def __init__(self, vocab: int, d: int, head: str, *, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.hidden = nnx.Linear(d, d, rngs=rngs)
        self.head_kind = head
        if head != "tied":
            self.head = nnx.Linear(d, vocab, use_bias=head == "linear_bias", rngs=rngs)
            if self.head.bias is not None:  # a nonzero bias, so its use is tested
                self.head.bias[...] = jax.random.normal(jax.random.key(seed + 1), (vocab,))

    def output_layer(self):
        return self.embed if self.head_kind == "tied" else self.head

    def features(self, tokens):
        return jnp.tanh(self.hidden(self.embed(tokens)))

    def logits(self, tokens):
        h = self.features(tokens)
        return self.embed.attend(h) if self.head_kind == "tied" else self.head(h)


def nnx_fused_loss(model, tokens, labels):
    w, bias = head_weights(model.output_layer())
    return fusedloss.linear_cross_entropy(model.features(tokens), w, labels, bias=bias)


def nnx_materialized_loss(model, tokens, labels):
    return ce(model.logits(tokens), labels)


def batch(vocab, shape=(4, 16), seed=2):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, size=shape), jnp.int32)
    labels = jnp.asarray(rng.integers(0, vocab, size=shape), jnp.int32)
    return tokens, labels


@pytest.mark.parametrize("head", HEADS)
def test_nnx_loss_and_gradients(head):
    model = NnxLM(300, 24, head)
    tokens, labels = batch(300)
    loss, grads = nnx.value_and_grad(nnx_fused_loss)(model, tokens, labels)
    ref_loss, ref_grads = nnx.value_and_grad(nnx_materialized_loss)(model, tokens, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    # The output layer's own parameters get their gradient (nonzero, in their layout).
    layer = grads["embed"] if head == "tied" else grads["head"]
    names = {"tied": ["embedding"], "linear_bias": ["kernel", "bias"]}.get(head, ["kernel"])
    for name in names:
        g = layer[name][...]
        assert g.shape == getattr(model.output_layer(), name).shape
        assert float(jnp.max(jnp.abs(g))) > 0


@pytest.mark.parametrize("head", HEADS)
def test_nnx_log_probs_and_entropy(head):
    """The RL head takes the same (w, bias): log-probs and entropy at temperature 0.7."""
    model = NnxLM(300, 24, head)
    tokens, labels = batch(300)
    ct = jnp.asarray(np.random.default_rng(4).normal(size=labels.shape), jnp.float32)

    def fused(model):
        w, bias = head_weights(model.output_layer())
        logp, ent = fusedloss.linear_log_probs(
            model.features(tokens), w, labels, bias=bias, temperature=0.7, return_entropy=True
        )
        return jnp.sum(logp * ct) + jnp.sum(ent)

    def materialized(model):
        logq = jax.nn.log_softmax(model.logits(tokens) / 0.7)
        logp = jnp.take_along_axis(logq, labels[..., None], axis=-1)[..., 0]
        return jnp.sum(logp * ct) - jnp.sum(jnp.exp(logq) * logq)

    loss, grads = nnx.value_and_grad(fused)(model)
    ref_loss, ref_grads = nnx.value_and_grad(materialized)(model)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads, rtol=2e-5)


@pytest.mark.parametrize("head", HEADS)
def test_nnx_optimizer_steps_match(head):
    tokens, labels = batch(300)

    def run(loss_fn):
        model = NnxLM(300, 24, head)
        optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, tokens, labels):
            loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, labels)
            update(optimizer, model, grads)
            return loss

        losses = [float(step(model, optimizer, tokens, labels)) for _ in range(4)]
        return losses, nnx.state(model, nnx.Param)

    losses, params = run(nnx_fused_loss)
    ref_losses, ref_params = run(nnx_materialized_loss)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]  # the steps did train
    assert_trees_close(params, ref_params)


def test_nnx_train_step_temporaries_smaller_than_materialized():
    # V = 32000, D = 256, N = 2048: the float32 logits alone are 250 MiB.
    vocab, d, shape = 32000, 256, (8, 256)
    tokens, labels = batch(vocab, shape)
    temps = {}
    for name, loss_fn in [("fused", nnx_fused_loss), ("materialized", nnx_materialized_loss)]:
        model = NnxLM(vocab, d, "linear_bias")
        optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

        def step(model, optimizer, tokens, labels, loss_fn=loss_fn):
            loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, labels)
            update(optimizer, model, grads)
            return loss

        compiled = nnx.jit(step).lower(model, optimizer, tokens, labels).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
    assert_fused_step_holds_no_logits(temps, nnx.state(model, nnx.Param), vocab, tokens.size)


def test_nnx_linear_dtype_is_followed():
    layer = nnx.Linear(8, 50, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    w, bias = head_weights(layer)
    assert w.dtype == bias.dtype == jnp.bfloat16
    assert layer.kernel[...].dtype == jnp.float32  # the stored parameter is unchanged
    w, bias = head_weights(nnx.Linear(8, 50, rngs=nnx.Rngs(0)), dtype=jnp.bfloat16)
    assert w.dtype == bias.dtype == jnp.bfloat16
    w, bias = head_weights(nnx.Embed(50, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert isinstance(w, fusedloss.Transposed) and w.dtype == jnp.bfloat16 and bias is None


# ---- linen ---------------------------------------------------------------------------


class LinenLM(nn.Module):
    vocab: int
    d: int
    head: str

    def setup(self):
        self.embed = nn.Embed(self.vocab, self.d)
        self.hidden = nn.Dense(self.d)
        if self.head != "tied":
            self.out = nn.Dense(
                self.vocab,
                use_bias=self.head == "linear_bias",
                bias_init=nn.initializers.normal(1.0),  # nonzero, so its use is tested
            )

    def features(self, tokens):
        return jnp.tanh(self.hidden(self.embed(tokens)))

    def __call__(self, tokens):
        h = self.features(tokens)
        return self.embed.attend(h) if self.head == "tied" else self.out(h)


@pytest.mark.parametrize("head", HEADS)
def test_linen_loss_and_gradients(head):
    model = LinenLM(300, 24, head)
    tokens, labels = batch(300)
    params = model.init(jax.random.key(0), tokens)
    layer_name = "embed" if head == "tied" else "out"

    def fused(params):
        h = model.apply(params, tokens, method=LinenLM.features)
        w, bias = head_weights(params["params"][layer_name])
        return fusedloss.linear_cross_entropy(h, w, labels, bias=bias)

    def materialized(params):
        return ce(model.apply(params, tokens), labels)

    if head == "tied":
        assert isinstance(head_weights(params["params"]["embed"])[0], fusedloss.Transposed)
    loss, grads = jax.value_and_grad(fused)(params)
    ref_loss, ref_grads = jax.value_and_grad(materialized)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    for g in jax.tree.leaves(grads["params"][layer_name]):
        assert float(jnp.max(jnp.abs(g))) > 0


@pytest.mark.parametrize("head", ["linear_bias", "tied"])
def test_linen_train_step_temporaries_smaller_than_materialized(head):
    vocab, d, shape = 32000, 256, (8, 256)
    model = LinenLM(vocab, d, head)
    tokens, labels = batch(vocab, shape)
    params = model.init(jax.random.key(0), tokens)
    opt = optax.adamw(1e-3)
    layer_name = "embed" if head == "tied" else "out"

    def fused(params):
        h = model.apply(params, tokens, method=LinenLM.features)
        w, bias = head_weights(params["params"][layer_name])
        return fusedloss.linear_cross_entropy(h, w, labels, bias=bias)

    def materialized(params):
        return ce(model.apply(params, tokens), labels)

    temps = {}
    for name, loss_fn in [("fused", fused), ("materialized", materialized)]:

        def step(params, opt_state, loss_fn=loss_fn):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            with jax.numpy_dtype_promotion("standard"):  # as in `update` above
                updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        compiled = jax.jit(step).lower(params, opt.init(params)).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
    assert_fused_step_holds_no_logits(temps, params, vocab, tokens.size)


# ---- optional dependencies -------------------------------------------------------------


def test_import_fusedloss_imports_neither_flax_nor_optax():
    code = "import sys, fusedloss; print([m for m in ('flax', 'optax') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- output layers of the Flax LM implementations post-training libraries ship -------


class Embedder(nnx.Module):
    """Gemma's tied output layer: ``decode(h) = h @ input_embedding.T``."""

    def __init__(self, vocab: int, d: int, rngs: nnx.Rngs):
        self.input_embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, d)) / 4)

    def decode(self, h):
        return h @ self.input_embedding[...].T


class Einsum(nnx.Module):
    """A Llama / Qwen head: ``jnp.einsum(einsum_str, h, w)``."""

    def __init__(self, einsum_str: str, shape: tuple[int, int], rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / 4)

    def __call__(self, h):
        return jnp.einsum(self.einsum_str, h, self.w[...])


@pytest.mark.parametrize(
    ("kind", "softcap"), [("embedder", 5.0), ("einsum_dv", None), ("einsum_vd", 3.0)]
)
def test_post_training_model_heads(kind, softcap):
    """Gemma's Embedder with Gemma-2's final softcap, and Einsum heads in both layouts:
    the fused loss and the layer's gradient equal the materialized ones."""
    vocab, d = 131, 12
    rngs = nnx.Rngs(3)
    layer = {
        "embedder": lambda: Embedder(vocab, d, rngs),
        "einsum_dv": lambda: Einsum("BTD,DV->BTV", (d, vocab), rngs),
        "einsum_vd": lambda: Einsum("BTD,VD->BTV", (vocab, d), rngs),
    }[kind]()
    h = jax.random.normal(jax.random.key(4), (3, 5, d))
    _, labels = batch(vocab, shape=(3, 5))

    def fused(layer):
        w, bias = head_weights(layer)
        return fusedloss.linear_cross_entropy(h, w, labels, bias=bias, logit_softcap=softcap)

    def materialized(layer):
        z = layer.decode(h) if kind == "embedder" else layer(h)
        return ce(z if softcap is None else softcap * jnp.tanh(z / softcap), labels)

    w, _ = head_weights(layer)
    assert isinstance(w, fusedloss.Transposed) == (kind != "einsum_dv")
    loss, grads = nnx.value_and_grad(fused)(layer)
    want, want_grads = nnx.value_and_grad(materialized)(layer)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert_trees_close(grads, want_grads)
    # The same parameters as a linen-style params subtree (an Embedder's).
    if kind == "embedder":
        w2, _ = head_weights({"input_embedding": layer.input_embedding[...]})
        assert isinstance(w2, fusedloss.Transposed) and w2.shape == (d, vocab)


# ---- errors --------------------------------------------------------------------------


def test_unsupported_layers_are_refused():
    with pytest.raises(TypeError, match=r"nnx.Linear, an nnx.Embed.*got LayerNorm"):
        head_weights(nnx.LayerNorm(8, rngs=nnx.Rngs(0)))
    rngs = nnx.Rngs(0)
    for spec in ("BTD,DV->BTD", "BTD,DK->BTK,X", "BTH,DV->BTV", "BTD,DD->BTD"):
        with pytest.raises(TypeError, match=r"einsum_str` like 'BTD,DV->BTV'.*got '"):
            head_weights(Einsum(spec, (8, 8), rngs))
    with pytest.raises(TypeError, match=r"keys \{'kernel'\}.*got \['scale'\]"):
        head_weights({"scale": jnp.ones(8)})
    with pytest.raises(TypeError, match=r"got \['bias', 'embedding'\]"):
        head_weights({"embedding": jnp.ones((4, 8)), "bias": jnp.ones(4)})
