"""A Flax nnx decoder-only transformer trained with the fused loss, and without it.

The model is an ordinary ``nnx.Module`` whose output layer is the token ``nnx.Embed``
(tied, through ``attend``) or an ``nnx.Linear`` with bias (``--untied-head``). The
fused run never calls that layer: it takes the model's final hidden states and hands
the layer's parameters to the fused head,

    w, bias = head_weights(model.output_layer)  # Transposed(embedding) when tied
    loss = fusedloss.linear_cross_entropy(h, w, tokens, bias=bias, shift=1)

so the ``[tokens, vocab]`` logits are never materialized, while gradients still reach
the layer's parameters through ``nnx.value_and_grad``. The materialized run applies
the layer (``model.logits``) and ``optax.losses.softmax_cross_entropy_with_integer_labels``.
Both start from the same initialization, see the same batches and are trained with
``nnx.Optimizer`` under ``nnx.jit``.

The data, tokenizer, batching and optimizer are those of ``train_lm.py`` (imported
from it): the running interpreter's standard library, split by file. The script
prints train/validation loss, the compiled temporaries of one training step with each
loss, and writes ``flax_nnx_lm_loss.png`` (matplotlib, if installed) and
``flax_nnx_lm_results.md`` to ``--out``.

Usage::

    python examples/flax_nnx_lm.py                # the default run (under 3 minutes on 2 CPU cores)
    python examples/flax_nnx_lm.py --steps 50 --vocab-size 2048 --out /tmp/nnx
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fusedloss
from fusedloss import XlaConfig
from fusedloss.flax_heads import head_weights

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (the tests) rather than run as a script
    sys.path.insert(0, str(HERE))
import train_lm  # noqa: E402  (the shared data pipeline and optimizer)

# ---- model -------------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-LayerNorm block: causal multi-head self-attention and a GELU MLP."""

    def __init__(self, d: int, num_heads: int, out_scale: float, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads, d, decode=False, out_kernel_init=_scaled(out_scale), rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
        self.out = nnx.Linear(4 * d, d, kernel_init=_scaled(out_scale), rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


def _scaled(scale: float):
    # Residual branches start small (GPT-2's 1/sqrt(2 * layers)), so training starts
    # from a loss close to log(V).
    return nnx.initializers.variance_scaling(scale**2, "fan_in", "normal")


class DecoderLM(nnx.Module):
    def __init__(self, vocab: int, seq_len: int, d: int, layers: int, heads: int, *,
                 tied: bool, seed: int):  # fmt: skip
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(vocab, d, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq_len, d)) * 0.01)
        out_scale = 1.0 / math.sqrt(2 * layers)
        self.blocks = nnx.List([Block(d, heads, out_scale, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = None if tied else nnx.Linear(d, vocab, rngs=rngs)

    @property
    def output_layer(self) -> nnx.Embed | nnx.Linear:
        """The layer that maps hidden states to logits (the embedding when tied)."""
        return self.embed if self.head is None else self.head

    def features(self, tokens: jax.Array) -> jax.Array:
        """[B, T] token ids -> [B, T, D] final hidden states (before the output layer)."""
        t = tokens.shape[-1]
        x = self.embed(tokens) + self.pos[:t][None]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def logits(self, h: jax.Array) -> jax.Array:
        """The output layer applied as Flax applies it: [..., D] -> [..., V]."""
        return self.embed.attend(h) if self.head is None else self.head(h)


# ---- the two losses: (model, batch) -> (loss, metrics) ------------------------------------


def fused_loss(chunk_mib: float):
    config = XlaConfig(block_bytes=int(chunk_mib * 2**20))  # CPU-sized logits blocks

    def loss_fn(model: DecoderLM, batch: dict) -> tuple[jax.Array, dict]:
        tokens = batch["tokens"]
        w, bias = head_weights(model.output_layer)
        loss, aux = fusedloss.linear_cross_entropy(
            model.features(tokens), w, tokens, bias=bias, shift=1, return_aux=True,
            implementation="xla", config=config,
        )  # fmt: skip
        return loss, {"loss": loss, "accuracy": jnp.sum(aux.correct) / aux.num_tokens}

    return loss_fn


def materialized_loss(model: DecoderLM, batch: dict) -> tuple[jax.Array, dict]:
    tokens = batch["tokens"]
    logits = model.logits(model.features(tokens))[:, :-1]
    labels = tokens[:, 1:]
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return loss, {"loss": loss, "accuracy": accuracy}


# ---- training ----------------------------------------------------------------------------


def train_step(loss_fn):
    def step(model: DecoderLM, optimizer: nnx.Optimizer, batch: dict) -> jax.Array:
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
        # optax's Adam combines an int32 step count with float32 values: implicit
        # promotion, which JAX's "strict" mode (used by the tests) rejects.
        with jax.numpy_dtype_promotion("standard"):
            optimizer.update(model, grads)
        return loss

    return nnx.jit(step)


def train(name, loss_fn, args, cfg, train_data, val_data) -> dict[str, Any]:
    model = DecoderLM(**cfg, seed=args.seed)  # the same initialization for both runs
    optimizer = nnx.Optimizer(model, train_lm.make_optimizer(args), wrt=nnx.Param)
    # Compiled once, ahead of the loop: the same object gives the step's memory and runs
    # it (updating model and optimizer in place, as the nnx.jit function would).
    step = train_step(loss_fn).lower(model, optimizer, train_data[0]).compile()
    temp_bytes = step.memory_analysis().temp_size_in_bytes
    eval_fn = nnx.jit(lambda model, batch: loss_fn(model, batch)[1])
    losses, evals, seconds = [], [], 0.0
    for i, batch in enumerate(train_data):
        t0 = time.perf_counter()
        losses.append(float(step(model, optimizer, batch)))  # float() waits for the step
        seconds += time.perf_counter() - t0
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            evals.append((i + 1, train_lm.evaluate(eval_fn, model, val_data)))
            if not args.quiet:
                print(f"{name:>12} step {i + 1:4d}: train {losses[-1]:.4f} "
                      f"val {evals[-1][1]['loss']:.4f}", flush=True)  # fmt: skip
    final = evals[-1][1]
    print(
        f"{name:>12}: val loss {final['loss']:.4f} ppl {final['perplexity']:.2f} "
        f"acc {final['accuracy']:.3f} | {seconds / args.steps * 1e3:.0f} ms/step | "
        f"step temporaries {temp_bytes / 2**20:.1f} MiB"
    )
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"train_loss": losses, "evals": evals, "final": final, "temp_bytes": temp_bytes,
            "seconds": seconds, "params": params}  # fmt: skip


def plot(results: dict, path: pathlib.Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"materialized": ("tab:orange", 3, 0.5, "s"), "fused": ("tab:blue", 1, 1.0, "x")}
    for name, (color, lw, alpha, marker) in styles.items():  # fused drawn on top
        r = results[name]
        steps = np.arange(1, len(r["train_loss"]) + 1)
        ax.plot(steps, r["train_loss"], color=color, lw=lw, alpha=alpha, label=f"train, {name}")
        xs = [s for s, _ in r["evals"]]
        ax.plot(xs, [e["loss"] for _, e in r["evals"]], marker, color=color, ms=8, ls="--",
                lw=1, label=f"validation, {name}")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(path, args, cfg, corpus, results, max_diff, seconds) -> None:
    fused, mat = results["fused"], results["materialized"]
    n_tokens = args.batch_size * (args.seq_len - 1)
    lines = [
        "# flax_nnx_lm.py results",
        "",
        f"Command: `{' '.join(['python examples/flax_nnx_lm.py', *args.argv])}` "
        f"({seconds:.0f} s in all on {jax.devices()[0].device_kind}, "
        f"{jax.local_device_count()} device(s)).",
        "",
        f"Python {sys.version.split()[0]} standard library: {corpus['train_tokens']:,} train / "
        f"{corpus['val_tokens']:,} validation tokens, vocabulary {cfg['vocab']}; nnx model "
        f"d_model={cfg['d']}, {cfg['layers']} layers, {cfg['heads']} heads, "
        f"{'tied (`nnx.Embed.attend`)' if cfg['tied'] else 'untied (`nnx.Linear`)'} output "
        f"layer, {fused['params']:,} parameters; {args.steps} steps of {args.batch_size} x "
        f"{args.seq_len} tokens.",
        "",
        "| | fused (`head_weights` + `linear_cross_entropy`) | materialized (optax) |",
        "|---|---:|---:|",
        f"| final validation loss (nats/token) | {fused['final']['loss']:.4f} | "
        f"{mat['final']['loss']:.4f} |",
        f"| final validation accuracy | {fused['final']['accuracy']:.3f} | "
        f"{mat['final']['accuracy']:.3f} |",
        f"| compiled temp bytes of one training step | {fused['temp_bytes']:,} "
        f"({fused['temp_bytes'] / 2**20:.1f} MiB) | {mat['temp_bytes']:,} "
        f"({mat['temp_bytes'] / 2**20:.1f} MiB) |",
        f"| time per step (wall clock, indicative) | {fused['seconds'] / args.steps * 1e3:.0f} "
        f"ms | {mat['seconds'] / args.steps * 1e3:.0f} ms |",
        "",
        f"Float32 logits of one step would be {n_tokens} x {cfg['vocab']} x 4 B = "
        f"{n_tokens * cfg['vocab'] * 4 / 2**20:.1f} MiB. Largest per-step difference of the "
        f"two runs' training losses: {max_diff:.3g}.",
        "",
    ]
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--untied-head", action="store_true", help="an nnx.Linear output layer")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--chunk-mib", type=float, default=4.0, help="fused: MiB of one logits block")
    p.add_argument("--max-mbytes", type=float, default=None, help="read at most this much text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=HERE, help="folder for the PNG and .md")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs both trainings; returns the numbers (also written to ``--out``)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    max_bytes = None if args.max_mbytes is None else int(args.max_mbytes * 1e6)
    tok, train_ids, val_ids, corpus = train_lm.load_corpus(args.vocab_size, max_bytes)
    cfg = {"vocab": tok.vocab_size, "seq_len": args.seq_len, "d": args.d_model,
           "layers": args.layers, "heads": args.heads, "tied": not args.untied_head}  # fmt: skip
    batches = train_lm.train_batches(train_ids, args.batch_size, args.seq_len, args.seed)
    train_data = [next(batches) for _ in range(args.steps)]
    val_data = train_lm.val_batches(val_ids, args.batch_size, args.seq_len, args.eval_batches)
    results = {
        name: train(name, fn, args, cfg, train_data, val_data)
        for name, fn in [("fused", fused_loss(args.chunk_mib)), ("materialized", materialized_loss)]
    }
    fused, mat = results["fused"], results["materialized"]
    max_diff = float(np.max(np.abs(np.subtract(fused["train_loss"], mat["train_loss"]))))
    ft, mt = fused["temp_bytes"], mat["temp_bytes"]
    seconds = time.perf_counter() - t0
    print(
        f"step temporaries: fused {ft / 2**20:.1f} MiB, materialized {mt / 2**20:.1f} MiB "
        f"({mt / max(ft, 1):.1f}x); max per-step train loss difference {max_diff:.3g}; "
        f"{seconds:.0f} s in all"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "flax_nnx_lm_loss.png"
    title = (f"nnx LM on the stdlib: V={cfg['vocab']}, D={cfg['d']}, {cfg['layers']} layers, "
             f"{'tied' if cfg['tied'] else 'untied'}")  # fmt: skip
    wrote_png = plot(results, png, title)
    md = args.out / "flax_nnx_lm_results.md"
    write_results(md, args, cfg, corpus, results, max_diff, seconds)
    return {**results, "max_train_diff": max_diff, "png": png if wrote_png else None,
            "results_md": md, "seconds": seconds}  # fmt: skip


if __name__ == "__main__":
    main()
