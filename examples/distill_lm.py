"""Distill a smaller language model from ``train_lm.py``'s model, four ways.

The teacher is trained exactly as ``train_lm.py`` trains it (its data, tokenizer,
model, optimizer and fused loss are imported from there, not copied): a tied-head
decoder on Python's standard library. A smaller student (by default half the width
and half the layers) then trains from one initialization on the same batches, for
the same number of steps, with four losses:

- **fused**: :func:`fusedloss.linear_distillation_loss` between the student's head
  and the teacher's (forward KL, ``KL(p_teacher || q_student)``, at temperature 1,
  no hard-label term by default: ``--hard-label-weight`` mixes in the student's
  cross-entropy on the labels). The teacher's hidden states come from its trunk
  inside the step; both heads are tied embeddings, read through
  :class:`fusedloss.Transposed`. Neither head's ``[tokens, V]`` logits are formed;
- **materialized**: the same loss in plain JAX: both heads' full logits,
  ``log_softmax``, the KL. Its training curve must coincide with the fused one up
  to float32 rounding;
- **top-k**: :func:`fusedloss.linear_topk_distillation_loss` from the teacher's
  ``--top-k`` largest log-probabilities per token, computed once, before training,
  for every training batch (what a serving engine would return): no teacher in the
  training step at all;
- **labels only**: the student trained on the labels alone (the fused
  ``linear_cross_entropy`` of ``train_lm.py``), for reference.

Every variant is judged by the student's validation cross-entropy on held-out files
(and its forward KL to the teacher on them). The script writes
``distill_lm_loss.png`` (matplotlib, if installed) and ``distill_lm_results.md`` to
``--out``, with the compiled temporary memory of one training step per variant
(``memory_analysis().temp_size_in_bytes``) and the largest difference between the
fused and materialized losses: at the same parameters every step, and between the
two independent runs.

Usage::

    python examples/distill_lm.py            # the default run (about 5 minutes on 2 idle cores)
    python examples/distill_lm.py --quick    # a smaller, shorter run (about a minute)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fusedloss
from fusedloss import XlaConfig

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (the tests) rather than run as a script
    sys.path.insert(0, str(HERE))
import train_lm  # noqa: E402  (the teacher's data, model, optimizer and training loop)

VARIANTS = ("fused", "materialized", "top-k", "labels only")

# ---- the four student losses ------------------------------------------------------------
# Every loss is ``(params, batch) -> (loss, metrics)`` as train_lm.train expects. The
# batch holds the tokens and, for the live-teacher losses, the teacher's parameters (an
# argument of the compiled step, not a constant folded into it); for the top-k loss the
# precomputed teacher ids and log-probabilities. Positions 0..T-2 predict tokens 1..T-1.


def _trunks(params, batch, cfg: train_lm.ModelConfig, teacher_cfg: train_lm.ModelConfig):
    tokens = batch["tokens"]
    x = train_lm.hidden_states(params, tokens, cfg)[:, :-1]
    # The teacher is a constant of the step: no gradient reaches its parameters.
    teacher = jax.lax.stop_gradient(batch["teacher"])
    tx = train_lm.hidden_states(teacher, tokens, teacher_cfg)[:, :-1]
    return x, tx, teacher, tokens[:, 1:]


def fused_distill_fn(cfg, teacher_cfg, args):
    """:func:`fusedloss.linear_distillation_loss` against the live teacher's head."""
    config = XlaConfig(block_bytes=int(args.chunk_mib * 2**20))
    a = args.hard_label_weight

    def loss_fn(params, batch):
        x, tx, teacher, labels = _trunks(params, batch, cfg, teacher_cfg)
        loss = fusedloss.linear_distillation_loss(
            x,
            fusedloss.Transposed(params["embed"]),  # tied heads: [V, D] read as stored
            tx,
            fusedloss.Transposed(teacher["embed"]),
            divergence="forward_kl",
            temperature=args.temperature,
            labels=labels if a > 0 else None,
            hard_label_weight=a,
            implementation="xla",
            config=config,
        )
        return loss, {"loss": loss}

    return loss_fn


def materialized_distill_fn(cfg, teacher_cfg, args):
    """The same loss in plain JAX: both heads' full logits."""
    a, temp = args.hard_label_weight, args.temperature

    def loss_fn(params, batch):
        x, tx, teacher, labels = _trunks(params, batch, cfg, teacher_cfg)
        logits = x @ params["embed"].T  # [B, T-1, V]
        log_q = jax.nn.log_softmax(logits / temp, axis=-1)
        log_p = jax.nn.log_softmax((tx @ teacher["embed"].T) / temp, axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1).mean()
        loss = kl
        if a > 0:
            ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            loss = (1 - a) * kl + a * ce
        return loss, {"loss": loss}

    return loss_fn


def topk_distill_fn(cfg, args):
    """:func:`fusedloss.linear_topk_distillation_loss` from offline top-K log-probs."""
    config = XlaConfig(block_bytes=int(args.chunk_mib * 2**20))

    def loss_fn(params, batch):
        x = train_lm.hidden_states(params, batch["tokens"], cfg)[:, :-1]
        loss = fusedloss.linear_topk_distillation_loss(
            x,
            fusedloss.Transposed(params["embed"]),
            batch["top_ids"],
            batch["top_log_probs"],
            temperature=args.temperature,
            implementation="xla",
            config=config,
        )
        return loss, {"loss": loss}

    return loss_fn


def teacher_top_k(teacher, teacher_cfg, k: int, temperature: float):
    """Jitted ``tokens -> (top ids, top log-probs)``: the offline teacher's output."""

    def top(tokens):
        tx = train_lm.hidden_states(teacher, tokens, teacher_cfg)[:, :-1]
        log_p = jax.nn.log_softmax((tx @ teacher["embed"].T) / temperature, axis=-1)
        top_log_probs, top_ids = jax.lax.top_k(log_p, k)
        return top_ids, top_log_probs

    return jax.jit(top)


def make_student_eval(cfg, teacher_cfg, args):
    """Validation metrics of a student: cross-entropy on the labels (``loss``,
    perplexity, accuracy) and forward KL to the teacher (``kl``), both fused."""
    ce_fn = train_lm.fused_loss_fn(cfg, args.chunk_mib)
    config = XlaConfig(block_bytes=int(args.chunk_mib * 2**20))

    def metrics(params, batch):
        out = train_lm.metrics_of(ce_fn(params, batch)[1])
        x, tx, teacher, _ = _trunks(params, batch, cfg, teacher_cfg)
        out["kl"] = fusedloss.linear_distillation_loss(
            x,
            fusedloss.Transposed(params["embed"]),
            tx,
            fusedloss.Transposed(teacher["embed"]),
            implementation="xla",
            config=config,
        )
        return {k: out[k] for k in ("loss", "accuracy", "kl")}

    return jax.jit(metrics)


def compare(fused: dict, mat: dict, checked: bool) -> dict[str, Any]:
    """train_lm's agreement numbers, and the largest validation difference."""
    if not checked:  # no numbers at the same parameters: placeholders, reported as NaN
        fused = {**fused, "other_loss_same_params": fused["train_loss"], "grad_rel_diff": [(0, 0)]}
    out = train_lm.compare(fused, mat)
    if not checked:
        out.update(same_params_abs=math.nan, same_params_rel=math.nan, grad_rel=math.nan)
    out["val_abs"] = max(
        abs(e["loss"] - m["loss"])
        for (_, e), (_, m) in zip(fused["evals"], mat["evals"], strict=True)
    )
    return out


# ---- report ------------------------------------------------------------------------------


def plot(results: dict, teacher: dict, path: pathlib.Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"fused": "tab:blue", "materialized": "tab:orange", "top-k": "tab:green",
              "labels only": "tab:gray"}  # fmt: skip
    styles = {"materialized": {"lw": 4, "alpha": 0.45}}
    fig, (ax_val, ax_train, ax_diff) = plt.subplots(
        3, 1, figsize=(8, 10), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.3]}
    )
    for name, r in results.items():
        xs = [s for s, _ in r["evals"]]
        ax_val.plot(xs, [e["loss"] for _, e in r["evals"]], "o-", ms=4, color=colors[name],
                    label=f"student, {name}", **styles.get(name, {"lw": 1.2}))  # fmt: skip
    ax_val.axhline(teacher["final"]["loss"], color="k", ls=":", label="teacher (final)")
    ax_val.set_ylabel("validation cross-entropy\n(nats / token)")
    ax_val.set_title(title)
    ax_val.grid(alpha=0.3)
    ax_val.legend()

    for name in ("fused", "materialized", "top-k"):
        if name not in results:
            continue
        r = results[name]
        steps = np.arange(1, len(r["train_loss"]) + 1)
        what = "top-K KL (K+1 bins)" if name == "top-k" else "forward KL"
        ax_train.plot(steps, r["train_loss"], color=colors[name], label=f"train, {name}: {what}",
                      **styles.get(name, {"lw": 1}))  # fmt: skip
    for name, r in results.items():
        xs = [s for s, _ in r["evals"]]
        ax_train.plot(xs, [e["kl"] for _, e in r["evals"]], "x--", color=colors[name], lw=1,
                      label=f"validation KL(teacher || student), {name}")  # fmt: skip
    ax_train.set_ylabel("distillation loss\n(nats / token)")
    ax_train.grid(alpha=0.3)
    ax_train.legend(fontsize="small")

    fused, mat = results["fused"], results["materialized"]
    own = np.asarray(fused["train_loss"], np.float32)
    steps = np.arange(1, len(own) + 1)
    runs = np.abs(own - np.asarray(mat["train_loss"], np.float32))
    ax_diff.semilogy(steps, np.maximum(runs, 1e-9), "o", color="tab:red", ms=4, mfc="none",
                     label="independent runs")  # fmt: skip
    if fused["other_loss_same_params"]:  # not with --no-checks
        same = np.abs(own - np.asarray(fused["other_loss_same_params"], np.float32))
        ax_diff.semilogy(steps, np.maximum(same, 1e-9), ".", color="k", ms=3,
                         label="same parameters (0 drawn at 1e-9)")  # fmt: skip
    ax_diff.semilogy(steps, np.spacing(own), ":", color="gray", label="float32 spacing")
    ax_diff.legend(loc="center", fontsize="small", ncols=3)
    ax_diff.set_ylabel("|fused - materialized|\ntrain loss")
    ax_diff.set_xlabel("student step")
    ax_diff.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(path, args, cfgs, corpus, teacher, results, agreement, seconds) -> None:
    teacher_cfg, cfg = cfgs
    n_tokens = args.batch_size * (args.seq_len - 1)
    a = args.hard_label_weight
    fused_what = (
        "forward KL" if a == 0 else f"{1 - a:g} x forward KL + {a:g} x cross-entropy on the labels"
    )
    names = list(results)
    heads = {
        "fused": "fused (`linear_distillation_loss`)",
        "materialized": "materialized (plain JAX)",
        "top-k": f"top-{args.top_k} (`linear_topk_distillation_loss`)",
        "labels only": "labels only (`linear_cross_entropy`)",
    }
    lines = [
        "# distill_lm.py results",
        "",
        f"Command: `{' '.join(['python examples/distill_lm.py', *args.argv])}`",
        "",
        f"Python {sys.version.split()[0]} standard library: {corpus['train_tokens']:,} train / "
        f"{corpus['val_tokens']:,} validation tokens ({corpus['files']} files), vocabulary "
        f"{cfg.vocab_size}, batches of {args.batch_size} x {args.seq_len} tokens on "
        f"{jax.devices()[0].device_kind}; whole run {seconds:.0f} s.",
        "",
        f"- teacher (as `train_lm.py` trains it): d_model={teacher_cfg.d_model}, "
        f"{teacher_cfg.num_layers} layers, {teacher_cfg.num_heads} heads, tied head, "
        f"{corpus['teacher_params']:,} parameters, {args.teacher_steps} steps: validation "
        f"cross-entropy {teacher['final']['loss']:.4f} (perplexity "
        f"{teacher['final']['perplexity']:.2f}, accuracy {teacher['final']['accuracy']:.3f});",
        f"- student: d_model={cfg.d_model}, {cfg.num_layers} layer(s), {cfg.num_heads} heads, "
        f"tied head, {corpus['student_params']:,} parameters, {args.steps} steps from one "
        "initialization on the same batches; distillation loss: "
        f"{fused_what} at temperature {args.temperature:g} (fused and materialized)"
        + (
            f", the K+1-bin forward KL from the teacher's top {args.top_k} log-probabilities "
            "(top-k)."
            if "top-k" in results
            else "."
        ),
        "",
        "| student trained with | " + " | ".join(heads[n] for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(results[n]) for n in names) + " |")

    row("final validation cross-entropy (nats/token)", lambda r: f"{r['final']['loss']:.4f}")
    row("final validation perplexity", lambda r: f"{r['final']['perplexity']:.2f}")
    row("final validation accuracy", lambda r: f"{r['final']['accuracy']:.3f}")
    row("final validation KL(teacher \\|\\| student)", lambda r: f"{r['final']['kl']:.4f}")
    row("final training loss (its own objective)", lambda r: f"{r['train_loss'][-1]:.4f}")
    row(
        "compiled temp bytes of one training step",
        lambda r: f"{r['temp_bytes']:,} ({r['temp_bytes'] / 2**20:.1f} MiB)",
    )
    row(
        "time per step (wall clock, indicative)",
        lambda r: f"{r['seconds'] / args.steps * 1e3:.0f} ms",
    )
    lines += [
        "",
        f"Float32 logits of one step are {n_tokens} x {cfg.vocab_size} x 4 B = "
        f"{n_tokens * cfg.vocab_size * 4 / 2**20:.1f} MiB per head; the materialized step "
        "holds both heads' logits and their softmax, the fused ones blocks of "
        f"{args.chunk_mib:g} MiB. The top-k step has no teacher in it (its inputs are "
        f"{n_tokens} x {args.top_k} ids and log-probabilities); the live-teacher steps also "
        "hold the teacher trunk's activations.",
        "",
    ]
    same = (
        "not evaluated (`--no-checks`)"
        if math.isnan(agreement["same_params_abs"])
        else f"max |fused - materialized| = {agreement['same_params_abs']:.3g} (relative "
        f"{agreement['same_params_rel']:.3g}); gradients at "
        f"{len(results['fused']['grad_rel_diff'])} steps: max relative difference "
        f"{agreement['grad_rel']:.3g} (per parameter, relative to its largest entry)"
    )
    lines += [
        "Agreement of the fused and materialized distillation losses:",
        "",
        f"- same parameters and batch, every step of the fused run: {same};",
        f"- the two independent runs: max per-step |training loss difference| "
        f"{agreement['runs_abs']:.3g} (relative {agreement['runs_rel']:.3g}), "
        f"below 1e-5 relative for {agreement['runs_agree_steps']} of {args.steps} steps; "
        f"max |validation cross-entropy difference| {agreement['val_abs']:.3g}.",
        "",
    ]
    path.write_text("\n".join(lines))


# ---- main --------------------------------------------------------------------------------

# --quick: a smaller corpus and vocabulary, fewer and smaller steps (explicit flags win).
_DEFAULTS = {
    "teacher_steps": (250, 60),
    "steps": (150, 60),
    "vocab_size": (8192, 2048),
    "batch_size": (16, 8),
    "seq_len": (128, 64),
    "max_mbytes": (None, 2.0),
    "eval_every": (25, 20),
    "eval_batches": (8, 4),
    "warmup": (30, 10),
    "chunk_mib": (4.0, 0.5),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small, short run (about a minute)")
    p.add_argument("--teacher-steps", type=int, help="teacher training steps (250)")
    p.add_argument("--steps", type=int, help="student training steps, every variant (150)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--max-mbytes", type=float, help="read at most this much text")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--d-model", type=int, default=128, help="teacher width")
    p.add_argument("--layers", type=int, default=2, help="teacher layers")
    p.add_argument("--heads", type=int, default=4, help="teacher attention heads")
    p.add_argument("--student-d-model", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=1)
    p.add_argument("--student-heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="teacher and student peak rate")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=16, help="offline teacher ids per token")
    p.add_argument(
        "--hard-label-weight",
        type=float,
        default=0.0,
        help="fused/materialized: weight of the cross-entropy on the labels",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated students to train, from {', '.join(VARIANTS)} (fused and "
        "materialized always)",
    )
    p.add_argument(
        "--no-checks",
        action="store_true",
        help="skip evaluating the materialized loss and gradients at the fused run's "
        "parameters (two compilations less); the two runs are still compared",
    )
    p.add_argument("--chunk-mib", type=float, help="fused losses: MiB of one logits block (4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=HERE, help="folder for the PNG and .md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name, (full, quick) in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for d, h, who in [(args.d_model, args.heads, ""), (args.student_d_model, args.student_heads,
                                                        "--student-")]:  # fmt: skip
        if d % h:
            p.error(f"{who or '--'}d-model {d} must be a multiple of {who or '--'}heads {h}")
    if min(args.steps, args.teacher_steps) < 1:
        p.error("--steps and --teacher-steps must be >= 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")
    args.variants = [v for v in VARIANTS if v in {"fused", "materialized", *args.variants}]
    if not 0 <= args.hard_label_weight <= 1:
        p.error("--hard-label-weight must be in [0, 1]")
    return args


def _args_for(args: argparse.Namespace, steps: int) -> argparse.Namespace:
    """train_lm's training arguments, for a run of ``steps`` steps."""
    return argparse.Namespace(**{**vars(args), "steps": steps})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trains the teacher, then the students; returns the numbers (also written to --out)."""
    args = parse_args(argv)
    log = print
    t_start = time.perf_counter()
    max_bytes = None if args.max_mbytes is None else int(args.max_mbytes * 1e6)
    tok, train_ids, val_ids, corpus = train_lm.load_corpus(args.vocab_size, max_bytes)
    teacher_cfg = train_lm.ModelConfig(
        vocab_size=tok.vocab_size, seq_len=args.seq_len, d_model=args.d_model,
        num_layers=args.layers, num_heads=args.heads, tied=True,
    )  # fmt: skip
    cfg = dataclasses.replace(
        teacher_cfg,
        d_model=args.student_d_model,
        num_layers=args.student_layers,
        num_heads=args.student_heads,
    )
    batches = train_lm.train_batches(train_ids, args.batch_size, args.seq_len, args.seed)
    train_data = [next(batches) for _ in range(max(args.steps, args.teacher_steps))]
    val_data = train_lm.val_batches(val_ids, args.batch_size, args.seq_len, args.eval_batches)

    # 1. The teacher, as train_lm.py trains it (its fused run).
    t_args = _args_for(args, args.teacher_steps)
    # Jitted: one compilation rather than one per eager operation (same values).
    init = jax.jit(train_lm.init_params, static_argnums=1)
    teacher_params = init(jax.random.key(args.seed), teacher_cfg)
    corpus["teacher_params"] = sum(x.size for x in jax.tree.leaves(teacher_params))
    log(
        f"corpus: {corpus['train_tokens']:,} train / {corpus['val_tokens']:,} val tokens, "
        f"vocab {teacher_cfg.vocab_size}; teacher {corpus['teacher_params']:,} params"
    )
    t_loss = train_lm.fused_loss_fn(teacher_cfg, args.chunk_mib)
    teacher = train_lm.train(
        "teacher", t_loss, train_lm.make_eval_fn(t_loss), teacher_params,
        train_lm.make_optimizer(t_args), train_data[: args.teacher_steps], val_data, t_args, log,
    )  # fmt: skip
    teacher_params = teacher.pop("params")

    # 2. What the students see: the teacher's parameters with every batch (live
    # teacher) or its top-K log-probabilities, computed once for every batch (offline).
    student_data = [{**b, "teacher": teacher_params} for b in train_data[: args.steps]]
    topk_data = []
    if "top-k" in args.variants:
        top = teacher_top_k(teacher_params, teacher_cfg, args.top_k, args.temperature)
        t0 = time.perf_counter()
        for b in train_data[: args.steps]:
            ids, logp = jax.device_get(top(b["tokens"]))
            topk_data.append({**b, "top_ids": ids, "top_log_probs": logp})
        log(f"offline top-{args.top_k} teacher log-probs of {args.steps} batches in "
            f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    student_val = [{**b, "teacher": teacher_params} for b in val_data]

    # 3. The students: one initialization, the same batches and steps.
    s_args = _args_for(args, args.steps)
    params = init(jax.random.key(args.seed + 1), cfg)
    corpus["student_params"] = sum(x.size for x in jax.tree.leaves(params))
    losses = {
        "fused": (fused_distill_fn(cfg, teacher_cfg, args), student_data),
        "materialized": (materialized_distill_fn(cfg, teacher_cfg, args), student_data),
        "top-k": (topk_distill_fn(cfg, args), topk_data),
        "labels only": (train_lm.fused_loss_fn(cfg, args.chunk_mib), student_data),
    }
    losses = {name: losses[name] for name in args.variants}
    eval_fn = make_student_eval(cfg, teacher_cfg, args)
    # The fused run also evaluates the materialized loss (every step) and both
    # gradients (at every evaluation) at its own parameters.
    checks = None
    if not args.no_checks:
        checks = (
            train_lm.make_eval_fn(losses["materialized"][0]),
            train_lm.make_grad_check(losses["fused"][0], losses["materialized"][0]),
        )
    results = {}
    for name, (fn, data) in losses.items():
        results[name] = train_lm.train(
            name, fn, eval_fn, params, train_lm.make_optimizer(s_args), data, student_val,
            s_args, log, checks if name == "fused" else None,
        )  # fmt: skip
        results[name].pop("params", None)
    agreement = compare(results["fused"], results["materialized"], checked=checks is not None)
    seconds = time.perf_counter() - t_start
    log(
        "fused vs materialized: same parameters, every step: max |difference| "
        f"{agreement['same_params_abs']:.3g} (relative {agreement['same_params_rel']:.3g}); "
        f"independent runs: max per-step |difference| {agreement['runs_abs']:.3g}; "
        f"gradients: max relative difference {agreement['grad_rel']:.3g}"
    )
    log("compiled temp bytes of one training step: " + ", ".join(
        f"{n} {r['temp_bytes'] / 2**20:.1f} MiB" for n, r in results.items()))  # fmt: skip
    log(f"whole run: {seconds:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "distill_lm_loss.png"
    title = (
        f"stdlib LM distillation: V={cfg.vocab_size}, teacher D={teacher_cfg.d_model} x "
        f"{teacher_cfg.num_layers}, student D={cfg.d_model} x {cfg.num_layers}"
    )
    wrote_png = plot(results, teacher, png, title)
    md = args.out / "distill_lm_results.md"
    write_results(md, args, (teacher_cfg, cfg), corpus, teacher, results, agreement, seconds)
    log(f"wrote {md}" + (f" and {png}" if wrote_png else " (no matplotlib: no PNG)"))
    return {
        **results,
        "teacher": teacher,
        "agreement": agreement,
        "png": png if wrote_png else None,
        "results_md": md,
        "corpus": corpus,
        "config": cfg,
        "teacher_config": teacher_cfg,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
