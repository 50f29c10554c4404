"""Train a small decoder-only transformer on Python's own standard library, twice.

Both runs start from the same initialization and see the same batches; they differ
only in the loss:

- **fused**: :func:`fusedloss.objectives.causal_lm_objective` with
  ``implementation="xla"``, i.e. ``linear_cross_entropy(hidden, head, tokens,
  shift=1)``, which never materializes the ``[tokens, vocab]`` logits;
- **materialized**: ``logits = hidden @ head`` followed by
  ``optax.losses.softmax_cross_entropy_with_integer_labels``: the plain optax path.

The script prints a progress bar (tqdm if installed), train/validation loss and
perplexity, the compiled temporary memory of one training step with each loss
(``memory_analysis().temp_size_in_bytes``), and the largest per-step difference
between the two runs' training losses, which must be float32 rounding only. It
writes ``train_lm_loss.png`` (matplotlib, if installed) and ``train_lm_results.md``
to ``--out``.

Data. The ``*.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` and the test
suites): real text on every machine with Python, no download. The split is by file
and deterministic: every 10th file in sorted path order is validation. The numbers
depend on the Python version, whose standard library differs.

Tokenizer. "Frequent pieces with byte fallback": the text is cut into pieces by a
regular expression (a newline with its indentation, a word or number with an
optional leading space, a run of punctuation, spaces), the ``vocab_size - 256``
most frequent multi-byte pieces of the *training* files become tokens, and
everything else is spelled with the 256 byte tokens, so any file encodes losslessly.
A byte-level vocabulary (256) would make the output layer a negligible part of the
step; with the default ``vocab_size=8192`` and ``d_model=128`` the float32 logits of
one batch (``[batch * seq_len, 8192]``, 64 MiB) are larger than the whole model --
the regime (large vocabulary, modest width) where a fused loss matters.

Agreement. With the fused run, the script also evaluates the materialized loss at
the fused run's parameters every step (and both gradients at every evaluation), so
it reports two things: how closely the loss functions agree at the same point
(float32 rounding), and how closely the two independent runs track each other. The
latter also depends on the training dynamics: at the default learning rate the runs
agree to rounding for all steps, while a learning rate at the edge of stability
(e.g. ``--lr 3e-3``) amplifies rounding differences (of any origin, such as a
different summation order) until the runs drift apart after some tens of steps.

Model. Token + learned position embeddings, ``--layers`` pre-LayerNorm blocks
(causal multi-head attention, GELU MLP), a final LayerNorm and an output head tied
to the token embedding (``--untied-head`` for a separate ``[D, V]`` kernel). Plain
JAX, trained with ``optax.adamw`` under a warmup + cosine schedule and global-norm
clipping.

Usage::

    python examples/train_lm.py                 # the default run (a few minutes on 2 cores)
    python examples/train_lm.py --steps 50 --vocab-size 2048 --out /tmp/lm
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import pathlib
import re
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fusedloss
from fusedloss import XlaConfig, objectives

HERE = pathlib.Path(__file__).resolve().parent

# ---- data: the standard library, tokenized ---------------------------------------------

_PIECE = re.compile(rb"\n[ ]*|[ ]?[A-Za-z_]\w*|[ ]?\d+|[ ]?[^\s\w]+|[ ]+(?=[ ])|\s")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
SEPARATOR = 0  # the NUL byte never occurs in source files: it marks a file boundary


def stdlib_files(max_bytes: int | None = None) -> list[pathlib.Path]:
    """The standard library's ``*.py`` files in sorted order (at most ``max_bytes``)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # prune site-packages early
        files += [pathlib.Path(folder, n) for n in names if n.endswith(".py")]
    files.sort()
    if max_bytes is not None:
        kept, total = [], 0
        # Take files spread over the whole library, not just its first packages.
        for f in files[:: max(1, len(files) // 200)] + files:
            if total >= max_bytes:
                break
            if f not in kept:
                kept.append(f)
                total += f.stat().st_size
        files = sorted(kept)
    if not files:
        raise RuntimeError(f"no *.py files found under {root}")
    return files


class Tokenizer:
    """Frequent multi-byte pieces plus the 256 bytes as fallback (lossless)."""

    def __init__(self, texts: Iterable[bytes], vocab_size: int):
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be > 256 (the byte tokens), got {vocab_size}")
        counts: collections.Counter[bytes] = collections.Counter()
        for text in texts:
            counts.update(_PIECE.findall(text))
        # Ties broken by the piece itself, so the vocabulary is deterministic.
        ranked = sorted((p for p in counts if len(p) > 1), key=lambda p: (-counts[p], p))
        self.pieces: list[bytes] = [bytes([b]) for b in range(256)] + ranked[: vocab_size - 256]
        self._ids = {p: i for i, p in enumerate(self.pieces) if i >= 256}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: bytes) -> list[int]:
        ids: list[int] = []
        for piece in _PIECE.findall(text):
            i = self._ids.get(piece)
            if i is None:
                ids.extend(piece)  # iterating bytes gives the byte values 0..255
            else:
                ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.pieces[i] for i in ids)


def load_corpus(
    vocab_size: int, max_bytes: int | None
) -> tuple[Tokenizer, np.ndarray, np.ndarray, dict[str, int]]:
    """(tokenizer, train ids, validation ids, sizes); every 10th file is validation."""
    files = stdlib_files(max_bytes)
    texts = [f.read_bytes() for f in files]
    if len(files) < 2:
        raise ValueError("need at least two files for a train/validation split")
    val_index = set(range(min(5, len(files) - 1), len(files), 10))
    train_texts = [t for i, t in enumerate(texts) if i not in val_index]
    val_texts = [t for i, t in enumerate(texts) if i in val_index]
    tok = Tokenizer(train_texts, vocab_size)

    def stream(ts: list[bytes]) -> np.ndarray:
        ids: list[int] = []
        for t in ts:
            ids.extend(tok.encode(t))
            ids.append(SEPARATOR)
        return np.asarray(ids, np.int32)

    train_ids, val_ids = stream(train_texts), stream(val_texts)
    sizes = {
        "files": len(files),
        "bytes": sum(map(len, texts)),
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
    }
    return tok, train_ids, val_ids, sizes


def train_batches(ids: np.ndarray, batch_size: int, seq_len: int, seed: int) -> Iterator[dict]:
    """Random windows of the training stream (the same sequence for every run)."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
        yield {"tokens": np.stack([ids[s : s + seq_len] for s in starts])}


def val_batches(ids: np.ndarray, batch_size: int, seq_len: int, num_batches: int) -> list[dict]:
    """Fixed windows spread evenly over the validation stream."""
    n = batch_size * num_batches
    if len(ids) < seq_len + n:
        raise ValueError(f"validation stream too short ({len(ids)} tokens) for {n} windows")
    starts = np.linspace(0, len(ids) - seq_len, n).astype(np.int64)
    windows = np.stack([ids[s : s + seq_len] for s in starts])
    return [{"tokens": w} for w in windows.reshape(num_batches, batch_size, seq_len)]


# ---- model: a small pre-LN decoder-only transformer in plain JAX ------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    seq_len: int
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    tied: bool = True


def init_params(key: jax.Array, cfg: ModelConfig) -> dict[str, Any]:
    d, v = cfg.d_model, cfg.vocab_size
    keys = iter(jax.random.split(key, 4 + 4 * cfg.num_layers))

    def dense(shape, scale=1.0):
        return jax.random.normal(next(keys), shape) * (scale / math.sqrt(shape[0]))

    def layer_norm():
        return {"scale": jnp.ones(d), "bias": jnp.zeros(d)}

    # Residual branches start small (GPT-2's 1/sqrt(2 * layers)) so the two runs start
    # from a sensible loss close to log(V).
    out_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
    params: dict[str, Any] = {
        "embed": jax.random.normal(next(keys), (v, d)) * 0.02,
        "pos": jax.random.normal(next(keys), (cfg.seq_len, d)) * 0.01,
        "blocks": [
            {
                "ln1": layer_norm(),
                "qkv": dense((d, 3 * d)),
                "proj": dense((d, d), out_scale),
                "ln2": layer_norm(),
                "fc": dense((d, 4 * d)),
                "fc_b": jnp.zeros(4 * d),
                "out": dense((4 * d, d), out_scale),
                "out_b": jnp.zeros(d),
            }
            for _ in range(cfg.num_layers)
        ],
        "ln_f": layer_norm(),
    }
    if not cfg.tied:
        params["head"] = dense((d, v))
    return params


def _vec(v: jax.Array, ndim: int) -> jax.Array:
    """A [D] parameter shaped to broadcast explicitly against [..., D] activations."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _layer_norm(p: dict, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + 1e-5)
    return y * _vec(p["scale"], x.ndim) + _vec(p["bias"], x.ndim)


def _attention(p: dict, x: jax.Array, num_heads: int) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
    q, k, v = (z.reshape(b, t, num_heads, d // num_heads) for z in (q, k, v))
    scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // num_heads)
    causal = jnp.tril(jnp.ones((t, t), bool)).reshape(1, 1, t, t)
    scores = jnp.where(causal, scores, -jnp.inf)
    out = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(b, t, d) @ p["proj"]


def hidden_states(params: dict, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """[B, T] token ids -> [B, T, D] final hidden states (before the output head)."""
    t = tokens.shape[-1]
    x = params["embed"][tokens] + params["pos"][:t].reshape(1, t, -1)
    for blk in params["blocks"]:
        x = x + _attention(blk, _layer_norm(blk["ln1"], x), cfg.num_heads)
        h = _layer_norm(blk["ln2"], x) @ blk["fc"] + _vec(blk["fc_b"], 3)
        x = x + jax.nn.gelu(h) @ blk["out"] + _vec(blk["out_b"], 3)
    return _layer_norm(params["ln_f"], x)


def head_kernel(params: dict) -> jax.Array:
    """The [D, V] output kernel: the tied embedding's transpose, or a separate one."""
    return params["head"] if "head" in params else params["embed"].T


# ---- the two losses ----------------------------------------------------------------------


def fused_loss_fn(cfg: ModelConfig, chunk_mib: float):
    """The fused objective: no [tokens, V] logits in the compiled step.

    ``chunk_mib`` is the float32 size of one ``[token_chunk, V]`` logits block; the
    library's default budget (32 MiB) is sized for accelerators, and would be as
    large as this CPU-sized problem's whole logits.
    """
    return objectives.causal_lm_objective(
        lambda p, tokens: hidden_states(p, tokens, cfg),
        # Tied: the [V, D] embedding read as stored (no transposed copy of it).
        head=lambda p: p["head"] if "head" in p else fusedloss.Transposed(p["embed"]),
        implementation="xla",
        config=XlaConfig(block_bytes=int(chunk_mib * 2**20)),
    )


def materialized_loss_fn(cfg: ModelConfig):
    """The plain optax path, with the same (loss, metrics) output."""

    def loss_fn(params, batch):
        tokens = batch["tokens"]
        logits = hidden_states(params, tokens, cfg)[:, :-1] @ head_kernel(params)
        labels = tokens[:, 1:]
        loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"loss": loss, "perplexity": jnp.exp(loss), "accuracy": accuracy}

    return loss_fn


def metrics_of(aux: Any) -> dict[str, jax.Array]:
    return aux.metrics() if hasattr(aux, "metrics") else aux


# ---- training ----------------------------------------------------------------------------


def _strong(tree: Any) -> Any:
    # optax init states hold weakly typed scalars that the updated states do not; a
    # precompiled step accepts exactly one signature.
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.result_type(x)), tree)


def make_optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        args.lr,
        warmup_steps=max(1, min(args.warmup, args.steps // 2)),
        decay_steps=max(args.steps, 2),
        end_value=args.lr * 0.1,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.1)
    )


def compile_train_step(loss_fn, opt, params, opt_state, batch):
    def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        # optax's Adam combines an int32 step count with float32 values; that is
        # implicit promotion, which JAX's "strict" mode (used by our tests) rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step).lower(params, opt_state, batch).compile()


class _Progress:
    """tqdm when installed, else a one-line text bar."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self._bar = None
        self._postfix = ""
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)
            except ImportError:
                pass

    def update(self, postfix: str) -> None:
        self.n += 1
        self._postfix = postfix
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(1)
        elif self.n == self.total or self.n % max(1, self.total // 50) == 0:
            done = int(30 * self.n / self.total)
            bar = "#" * done + "." * (30 - done)
            print(f"\r{self.desc} [{bar}] {self.n}/{self.total} {postfix}", end="", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print()


def evaluate(eval_fn, params, batches) -> dict[str, float]:
    """Token-weighted mean of the metrics over the (equal-sized) validation batches."""
    sums: dict[str, float] = collections.defaultdict(float)
    for batch in batches:
        for k, v in eval_fn(params, batch).items():
            sums[k] += float(v)
    out = {k: v / len(batches) for k, v in sums.items()}
    out["perplexity"] = math.exp(out["loss"])
    return out


def make_eval_fn(loss_fn):
    """Jitted ``(params, batch) -> metrics`` (loss, perplexity, accuracy, ...)."""
    return jax.jit(lambda params, batch: metrics_of(loss_fn(params, batch)[1]))


def make_grad_check(fused_fn, materialized_fn):
    """Jitted largest relative gradient difference of the two losses at the same point."""

    def grad_rel_diff(params, batch):
        g = jax.grad(lambda p: fused_fn(p, batch)[0])(params)
        g_ref = jax.grad(lambda p: materialized_fn(p, batch)[0])(params)
        # Per leaf, the largest difference relative to the leaf's largest entry.
        errs = jax.tree.map(lambda a, r: jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r)), g, g_ref)
        return jnp.max(jnp.stack(jax.tree.leaves(errs)))

    return jax.jit(grad_rel_diff)


def train(
    name, loss_fn, eval_fn, params, opt, train_data, val_data, args, log, checks=None
) -> dict[str, Any]:
    """Trains from ``params``. With ``checks = (other_eval_fn, grad_check)`` it also
    evaluates the other loss at this run's parameters: every step its value, at every
    evaluation its gradient (:func:`make_grad_check`)."""
    opt_state = _strong(opt.init(params))
    step_fn = compile_train_step(loss_fn, opt, params, opt_state, train_data[0])
    temp_bytes = step_fn.memory_analysis().temp_size_in_bytes
    losses, evals, same_params_loss, grad_rel = [], [], [], []
    bar = _Progress(args.steps, f"{name:>12}", enabled=not args.quiet)
    seconds = 0.0  # training steps only, not evaluation or checks
    for i, batch in enumerate(train_data):
        if checks is not None:
            same_params_loss.append(float(checks[0](params, batch)["loss"]))
            if i % args.eval_every == 0:
                grad_rel.append((i, float(checks[1](params, batch))))
        t0 = time.perf_counter()
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(float(loss))  # float() waits for the step
        seconds += time.perf_counter() - t0
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            evals.append((i + 1, evaluate(eval_fn, params, val_data)))
        v = evals[-1][1]["loss"] if evals else float("nan")
        bar.update(f"loss {losses[-1]:.4f} val {v:.4f}")
    bar.close()
    final = evals[-1][1]
    log(
        f"{name:>12}: train loss {losses[-1]:.4f} | val loss {final['loss']:.4f} "
        f"ppl {final['perplexity']:.2f} acc {final['accuracy']:.3f} | "
        f"{seconds / args.steps * 1e3:.0f} ms/step | step temp {temp_bytes / 2**20:.1f} MiB"
    )
    return {
        "train_loss": losses,
        "evals": evals,
        "final": final,
        "temp_bytes": temp_bytes,
        "seconds": seconds,
        "other_loss_same_params": same_params_loss,
        "grad_rel_diff": grad_rel,
        "params": params,  # the trained parameters
    }


def compare(fused: dict, mat: dict) -> dict[str, Any]:
    """Agreement of the two losses: at the same parameters (the loss functions) and
    between the two independent runs (the loss functions plus training dynamics)."""
    own = np.asarray(fused["train_loss"], np.float64)
    other = np.asarray(fused["other_loss_same_params"], np.float64)
    runs = np.abs(own - np.asarray(mat["train_loss"], np.float64))
    rel = runs / np.abs(own)
    over = np.flatnonzero(rel > 1e-5)
    return {
        "same_params_abs": float(np.max(np.abs(own - other))),
        "same_params_rel": float(np.max(np.abs(own - other) / np.abs(other))),
        "grad_rel": max(g for _, g in fused["grad_rel_diff"]),
        "runs_abs": float(np.max(runs)),
        "runs_rel": float(np.max(rel)),
        "runs_agree_steps": int(over[0]) if len(over) else len(own),
    }


def plot(results: dict[str, dict], path: pathlib.Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fused, mat = results["fused"], results["materialized"]
    steps = np.arange(1, len(fused["train_loss"]) + 1)
    fig, (ax, ax_diff) = plt.subplots(
        2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    ax.plot(steps, mat["train_loss"], "tab:orange", lw=3, alpha=0.5, label="train, materialized")
    ax.plot(steps, fused["train_loss"], color="tab:blue", lw=1, label="train, fused (xla)")
    for r, color, marker, label in [
        (mat, "tab:orange", "s", "validation, materialized"),
        (fused, "tab:blue", "x", "validation, fused (xla)"),
    ]:
        xs = [s for s, _ in r["evals"]]
        ax.plot(xs, [e["loss"] for _, e in r["evals"]], marker, color=color, ms=8, ls="--",
                lw=1, label=label)  # fmt: skip
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    own = np.asarray(fused["train_loss"], np.float32)
    same = np.abs(own - np.asarray(fused["other_loss_same_params"], np.float32))
    runs = np.abs(own - np.asarray(mat["train_loss"], np.float32))
    ax_diff.semilogy(steps, np.maximum(runs, 1e-9), "o", color="tab:red", ms=4, mfc="none",
                     label="independent runs")  # fmt: skip
    ax_diff.semilogy(steps, np.maximum(same, 1e-9), ".", color="k", ms=3,
                     label="same parameters (0 drawn at 1e-9)")  # fmt: skip
    ax_diff.semilogy(steps, np.spacing(own), ":", color="gray", label="float32 spacing")
    ax_diff.set_ylabel("|fused - materialized|\ntrain loss")
    ax_diff.legend(loc="center", fontsize="small", ncols=3)  # the empty band of the log axis
    ax_diff.set_xlabel("step")
    ax_diff.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(path: pathlib.Path, args, cfg, corpus, results, agreement) -> None:
    fused, mat = results["fused"], results["materialized"]
    n_tokens = args.batch_size * (args.seq_len - 1)
    rows = [
        ("final validation loss (nats/token)", "{:.4f}", "loss"),
        ("final validation perplexity", "{:.2f}", "perplexity"),
        ("final validation accuracy", "{:.3f}", "accuracy"),
    ]
    lines = [
        "# train_lm.py results",
        "",
        f"Command: `{' '.join(['python examples/train_lm.py', *args.argv])}`",
        "",
        f"Python {sys.version.split()[0]} standard library: {corpus['train_tokens']:,} train / "
        f"{corpus['val_tokens']:,} validation tokens ({corpus['files']} files, "
        f"{corpus['bytes'] / 1e6:.1f} MB), vocabulary {cfg.vocab_size}; model d_model="
        f"{cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
        f"{'tied' if cfg.tied else 'untied'} head, {corpus['params']:,} parameters; "
        f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens on "
        f"{jax.devices()[0].device_kind}.",
        "",
        "| | fused (`linear_cross_entropy`, xla) | materialized (optax) |",
        "|---|---:|---:|",
    ]
    for label, fmt, key in rows:
        lines.append(
            f"| {label} | {fmt.format(fused['final'][key])} | {fmt.format(mat['final'][key])} |"
        )
    lines += [
        f"| compiled temp bytes of one training step | {fused['temp_bytes']:,} "
        f"({fused['temp_bytes'] / 2**20:.1f} MiB) | {mat['temp_bytes']:,} "
        f"({mat['temp_bytes'] / 2**20:.1f} MiB) |",
        f"| time per step (wall clock, indicative) | {fused['seconds'] / args.steps * 1e3:.0f} ms"
        f" | {mat['seconds'] / args.steps * 1e3:.0f} ms |",
        "",
        f"Float32 logits of one step would be {n_tokens} x {cfg.vocab_size} x 4 B = "
        f"{n_tokens * cfg.vocab_size * 4 / 2**20:.1f} MiB.",
        "",
        "Agreement of the two losses:",
        "",
        f"- same parameters and batch, every step of the fused run: max |fused - materialized "
        f"loss| = {agreement['same_params_abs']:.3g} (relative "
        f"{agreement['same_params_rel']:.3g}); gradients at {len(fused['grad_rel_diff'])} "
        f"steps: max relative difference {agreement['grad_rel']:.3g} (per parameter, relative "
        "to its largest entry);",
        f"- the two independent runs: max per-step |train loss difference| "
        f"{agreement['runs_abs']:.3g} (relative {agreement['runs_rel']:.3g}); "
        + (
            "they agree to float32 rounding at every step."
            if agreement["runs_agree_steps"] == args.steps
            else f"below 1e-5 relative for the first {agreement['runs_agree_steps']} of "
            f"{args.steps} steps. Past that, training itself amplifies float32 rounding "
            "(any change of summation order does, e.g. another XLA version), not the loss: "
            "at the same parameters the two agree to float32 rounding at every step."
        ),
        "",
    ]
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--untied-head", action="store_true", help="separate [D, V] output kernel")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument(
        "--chunk-mib", type=float, default=4.0, help="fused loss: MiB of one logits block"
    )
    p.add_argument("--max-mbytes", type=float, default=None, help="read at most this much text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=HERE, help="folder for the PNG and .md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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
    log = print
    t0 = time.perf_counter()
    max_bytes = None if args.max_mbytes is None else int(args.max_mbytes * 1e6)
    tok, train_ids, val_ids, corpus = load_corpus(args.vocab_size, max_bytes)
    load_seconds = time.perf_counter() - t0
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        seq_len=args.seq_len,
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        tied=not args.untied_head,
    )
    params = init_params(jax.random.key(args.seed), cfg)
    corpus["params"] = sum(x.size for x in jax.tree.leaves(params))
    log(
        f"corpus: {corpus['files']} files, {corpus['bytes'] / 1e6:.1f} MB -> "
        f"{corpus['train_tokens']:,} train / {corpus['val_tokens']:,} val tokens "
        f"(vocab {cfg.vocab_size}, {corpus['bytes'] / (len(train_ids) + len(val_ids)):.2f} "
        f"bytes/token) in {load_seconds:.1f} s; model {corpus['params']:,} params"
    )

    batches = train_batches(train_ids, args.batch_size, args.seq_len, args.seed)
    train_data = [next(batches) for _ in range(args.steps)]
    val_data = val_batches(val_ids, args.batch_size, args.seq_len, args.eval_batches)
    opt = make_optimizer(args)
    losses = {
        "fused": fused_loss_fn(cfg, args.chunk_mib),
        "materialized": materialized_loss_fn(cfg),
    }
    # One jitted evaluation per loss, shared by the validation and the per-step checks
    # (training and validation batches have the same shape: one compilation each).
    eval_fns = {name: make_eval_fn(fn) for name, fn in losses.items()}
    checks = (eval_fns["materialized"], make_grad_check(*losses.values()))
    results = {}
    for name, fn in losses.items():
        check = checks if name == "fused" else None
        results[name] = train(
            name, fn, eval_fns[name], params, opt, train_data, val_data, args, log, check
        )
    fused, mat = results["fused"], results["materialized"]
    ft, mt = fused["temp_bytes"], mat["temp_bytes"]
    log(
        f"compiled temp bytes of one training step: fused {ft:,} ({ft / 2**20:.1f} MiB), "
        f"materialized {mt:,} ({mt / 2**20:.1f} MiB): {mt / max(ft, 1):.1f}x"
    )
    agreement = compare(fused, mat)
    log(
        "same parameters, every step: max |fused - materialized loss| = "
        f"{agreement['same_params_abs']:.3g} (relative {agreement['same_params_rel']:.3g}); "
        f"gradients at {len(fused['grad_rel_diff'])} steps: max relative difference "
        f"{agreement['grad_rel']:.3g}"
    )
    log(
        f"independent runs: max per-step |train loss difference| {agreement['runs_abs']:.3g} "
        f"(relative {agreement['runs_rel']:.3g}); below 1e-5 relative for the first "
        f"{agreement['runs_agree_steps']} of {args.steps} steps"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "train_lm_loss.png"
    title = (
        f"stdlib LM: V={cfg.vocab_size}, D={cfg.d_model}, {cfg.num_layers} layers, "
        f"{args.batch_size}x{args.seq_len} tokens/step"
    )
    wrote_png = plot(results, png, title)
    md = args.out / "train_lm_results.md"
    write_results(md, args, cfg, corpus, results, agreement)
    log(f"wrote {md}" + (f" and {png}" if wrote_png else " (no matplotlib: no PNG)"))
    return {
        **results,
        "agreement": agreement,
        "png": png if wrote_png else None,
        "results_md": md,
        "corpus": corpus,
        "config": cfg,
    }


if __name__ == "__main__":
    main()
