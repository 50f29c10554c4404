"""Train ``train_lm.py``'s model with GRPO on a verifiable task, fused and materialized.

The model (a tied-head decoder), its initialization and optimizer are imported from
``train_lm.py``, not copied. The task is verifiable: a prompt shows ``prompt_len``
consecutive digits counting up modulo 10 (``3 4 5 6``), and the completion should go
on counting (``7 8 9 0 1 ...``). The script computes the reward of each sampled
completion itself: per token, 0.5 for a digit and 0.5 more for the right digit,
averaged over the completion (1 is perfect; a random policy over the vocabulary
scores about ``5.5 / V``).

Each step samples ``group`` completions for each of ``prompts`` prompts at
``--temperature``, turns the rewards into group-normalized advantages (GRPO), and
makes ``--updates-per-batch`` clipped policy-gradient updates on that batch (the
first one on-policy, the next ones against the sampling policy's log-probabilities),
with a k3 KL penalty to the frozen initial model. Two runs start from the same
initialization and draw the same random numbers; they differ only in the loss:

- **fused**: :func:`fusedloss.linear_policy_gradient_loss` on the final hidden
  states and the tied embedding (read through :class:`fusedloss.Transposed`), its
  reference log-probs from the frozen initial model's hidden states and embedding in
  the same call: the ``[tokens, V]`` logits are never formed;
- **materialized**: ``logits = h @ embedding.T``, ``log_softmax``, the sampled
  tokens' log-probs and entropies, then the same :func:`fusedloss.policy_gradient_loss`
  (one copy of the math).

Every step the script also evaluates the materialized loss and gradients at the
fused run's parameters, so it reports how closely the two losses agree (float32
rounding) besides how closely the two runs track each other (sampling can amplify
rounding once a sampled token flips). It writes ``grpo_lm_reward.png`` (matplotlib,
if installed) and ``grpo_lm_results.md`` to ``--out``: the reward curves and the
compiled temporaries of one training step with each loss
(``memory_analysis().temp_size_in_bytes``).

Usage::

    python examples/grpo_lm.py            # the default run (a few minutes on 2 cores)
    python examples/grpo_lm.py --quick    # a few steps of a tiny model (seconds)
"""

from __future__ import annotations

import argparse
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
import train_lm  # noqa: E402  (the model, its initialization and the optimizer)

VARIANTS = ("fused", "materialized")

# ---- the task: count on, modulo 10 --------------------------------------------------------
# Token ids 0..9 are the digits; the rest of the vocabulary is there to make the output
# head the large part of the step, as in a real LM.


def make_prompts(key: jax.Array, num: int, prompt_len: int) -> jax.Array:
    start = jax.random.randint(key, (num, 1), 0, 10)
    return (start + jnp.arange(prompt_len)[None, :]) % 10


def rewards_of(prompts: jax.Array, completions: jax.Array) -> jax.Array:
    """[B] verifiable rewards: per token 0.5 for a digit, 0.5 more for the right one."""
    steps = jnp.arange(1, completions.shape[1] + 1)[None, :]
    want = (prompts[:, -1:] + steps) % 10
    is_digit = (completions < 10).astype(jnp.float32)
    right = (completions == want).astype(jnp.float32)
    return jnp.mean(0.5 * is_digit + 0.5 * right, axis=1)


def group_advantages(rewards: jax.Array, group: int) -> jax.Array:
    """GRPO's advantages: rewards normalized within each prompt's group of samples."""
    r = rewards.reshape(-1, group)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)
    return adv.reshape(-1)


def sample(params, prompts, key, cfg: train_lm.ModelConfig, completion_len: int, temp: float):
    """Completions drawn token by token at temperature ``temp`` ([B, completion_len])."""
    b, lp = prompts.shape
    tokens = jnp.concatenate([prompts, jnp.zeros((b, completion_len), prompts.dtype)], axis=1)
    w = train_lm.head_kernel(params)

    def body(i, carry):
        tokens, key = carry
        key, sub = jax.random.split(key)
        pos = lp + i
        h = train_lm.hidden_states(params, tokens, cfg)
        last = jax.lax.dynamic_index_in_dim(h, pos - 1, axis=1, keepdims=False)
        tok = jax.random.categorical(sub, (last @ w) / temp)
        return jax.lax.dynamic_update_index_in_dim(tokens, tok.astype(tokens.dtype), pos, 1), key

    tokens, _ = jax.lax.fori_loop(0, completion_len, body, (tokens, key))
    return tokens[:, lp:]


# ---- the two losses: (params, batch) -> (loss, metrics) ------------------------------------


def _completion_states(params, batch, cfg):
    """Hidden states that score the completion tokens (positions Lp-1 .. T-2)."""
    tokens = jnp.concatenate([batch["prompts"], batch["completions"]], axis=1)
    lp = batch["prompts"].shape[1]
    return train_lm.hidden_states(params, tokens, cfg)[:, lp - 1 : -1]


def _options(args, batch):
    return dict(
        old_log_probs=batch.get("old_log_probs"),
        loss_type="grpo",
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high,
        beta=args.beta,
        kl_estimator="k3",
        return_aux=True,
    )


def fused_grpo_fn(cfg, args):
    config = XlaConfig(block_bytes=int(args.chunk_mib * 2**20))

    def loss_fn(params, batch):
        h = _completion_states(params, batch, cfg)
        ref = jax.lax.stop_gradient(batch["reference"])
        loss, aux = fusedloss.linear_policy_gradient_loss(
            h, fusedloss.Transposed(params["embed"]), batch["completions"], batch["advantages"],
            ref_x=_completion_states(ref, batch, cfg), ref_w=fusedloss.Transposed(ref["embed"]),
            temperature=args.temperature, implementation="xla", config=config,
            **_options(args, batch),
        )  # fmt: skip
        return loss, aux._asdict()

    return loss_fn


def materialized_log_probs(h, w, tokens, temperature):
    logp = jax.nn.log_softmax((h @ w) / temperature, axis=-1)
    lp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return lp, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def materialized_grpo_fn(cfg, args):
    def loss_fn(params, batch):
        h = _completion_states(params, batch, cfg)
        ref = jax.lax.stop_gradient(batch["reference"])
        toks = batch["completions"]
        lp, _ = materialized_log_probs(h, params["embed"].T, toks, args.temperature)
        ref_h = _completion_states(ref, batch, cfg)
        ref_lp, _ = materialized_log_probs(ref_h, ref["embed"].T, toks, args.temperature)
        loss, aux = fusedloss.policy_gradient_loss(
            lp, batch["advantages"], ref_log_probs=ref_lp, **_options(args, batch)
        )
        return loss, aux._asdict()

    return loss_fn


def make_rollout(cfg, args):
    """``(params, reference, key) -> batch``, one compiled program shared by both runs:
    prompts, sampled completions, their rewards and group advantages, and the
    sampling policy's log-probs of them (fused, no gradient)."""

    @jax.jit
    def rollout(params, reference, key):
        kp, ks = jax.random.split(key)
        prompts = jnp.repeat(make_prompts(kp, args.prompts, args.prompt_len), args.group, 0)
        completions = sample(params, prompts, ks, cfg, args.completion_len, args.temperature)
        rewards = rewards_of(prompts, completions)
        batch = {"prompts": prompts, "completions": completions, "reference": reference,
                 "advantages": group_advantages(rewards, args.group)}  # fmt: skip
        h = _completion_states(params, batch, cfg)
        batch["old_log_probs"] = fusedloss.linear_log_probs(
            h, fusedloss.Transposed(params["embed"]), completions, temperature=args.temperature
        )
        return batch, rewards.mean()

    return rollout


# ---- training ------------------------------------------------------------------------------


def compile_step(loss_fn, opt, params, opt_state, batch):
    def step(params, opt_state, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        with jax.numpy_dtype_promotion("standard"):  # optax's int32 step count
            updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    return jax.jit(step).lower(params, opt_state, batch).compile()


def train(name, loss_fn, rollout, params, args, log, check=None) -> dict[str, Any]:
    """GRPO: sample and score a batch, then ``args.updates`` clipped updates on it."""
    opt = train_lm.make_optimizer(
        argparse.Namespace(lr=args.lr, warmup=args.warmup, steps=args.steps * args.updates)
    )
    opt_state = train_lm._strong(opt.init(params))
    reference = params  # the frozen initial model
    key = jax.random.key(args.seed + 7)
    out: dict[str, Any] = {"reward": [], "loss": [], "ratio_max": [], "clip_high": []}
    if check is not None:
        out["same_params"] = []
    step_fn = None
    t0 = time.perf_counter()
    for step in range(args.steps):
        key, sub = jax.random.split(key)
        batch, reward = rollout(params, reference, sub)
        if step_fn is None:
            step_fn = compile_step(loss_fn, opt, params, opt_state, batch)
            out["temp_bytes"] = step_fn.memory_analysis().temp_size_in_bytes
        if check is not None:
            out["same_params"].append(check(params, batch))
        for _ in range(args.updates):
            params, opt_state, loss, aux = step_fn(params, opt_state, batch)
        out["reward"].append(float(reward))
        out["loss"].append(float(loss))
        out["ratio_max"].append(float(aux["ratio_max"]))
        out["clip_high"].append(float(aux["clip_fraction_high"]))
        if not args.quiet:
            log(f"[{name}] step {step + 1}/{args.steps}: reward {out['reward'][-1]:.3f}, "
                f"loss {out['loss'][-1]:+.4f}, max ratio {out['ratio_max'][-1]:.3f}")  # fmt: skip
    out["seconds"] = time.perf_counter() - t0
    out["params"] = params
    return out


def make_check(fused_fn, mat_fn):
    """|fused - materialized| of the loss and the gradients at the same parameters."""

    @jax.jit
    def check(params, batch):
        (lf, _), gf = jax.value_and_grad(fused_fn, has_aux=True)(params, batch)
        (lm, _), gm = jax.value_and_grad(mat_fn, has_aux=True)(params, batch)
        diff = optax.tree_utils.tree_norm(jax.tree.map(jnp.subtract, gf, gm))
        norm = optax.tree_utils.tree_norm(gm)
        return jnp.abs(lf - lm), jnp.where(norm > 0, diff / jnp.where(norm > 0, norm, 1.0), diff)

    def run(params, batch):
        return tuple(float(v) for v in check(params, batch))

    return run


# ---- output --------------------------------------------------------------------------------


def plot(results: dict, path: pathlib.Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = np.arange(1, len(results["fused"]["reward"]) + 1)
    ax.plot(steps, results["materialized"]["reward"], color="tab:orange", lw=3, alpha=0.5,
            label="materialized logits")  # fmt: skip
    ax.plot(steps, results["fused"]["reward"], color="tab:blue", lw=1, label="fused (one pass)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward of the sampled completions")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(path: pathlib.Path, args, cfg, results, agreement) -> None:
    fused, mat = results["fused"], results["materialized"]
    b = args.prompts * args.group
    lines = [
        "# GRPO on a verifiable task: fused vs materialized",
        "",
        f"Model: `train_lm.py`'s decoder, d_model {cfg.d_model}, {cfg.num_layers} layer(s), "
        f"vocabulary {cfg.vocab_size} (tied head); {args.steps} steps of {b} completions "
        f"({args.prompts} prompts x {args.group}) of {args.completion_len} tokens at "
        f"temperature {args.temperature}, {args.updates} update(s) per batch, "
        f"k3 KL to the initial model (beta {args.beta}).",
        "",
        "| | fused | materialized |",
        "|---|---|---|",
        f"| compiled temporaries of one training step | {fused['temp_bytes']:,} B | "
        f"{mat['temp_bytes']:,} B |",
        f"| mean reward, first step | {fused['reward'][0]:.3f} | {mat['reward'][0]:.3f} |",
        f"| mean reward, last step | {fused['reward'][-1]:.3f} | {mat['reward'][-1]:.3f} |",
        f"| wall time of the steps | {fused['seconds']:.1f} s | {mat['seconds']:.1f} s |",
        "",
        "The fused run's wall time includes the check below (both losses' gradients at its "
        "parameters, every step); the step times are not a benchmark.",
        "",
    ]
    if "same_params_loss" in agreement:
        lines.append(
            "At the fused run's parameters, every step: largest |loss difference| "
            f"{agreement['same_params_loss']:.2e}, largest relative gradient difference "
            f"{agreement['same_params_grad_rel']:.2e}."
        )
    lines += [
        f"The independent runs' rewards agree for {agreement['runs_agree_steps']} of "
        f"{args.steps} steps.",
        "",
    ]
    path.write_text("\n".join(lines))


# ---- command line --------------------------------------------------------------------------

_DEFAULTS = {  # name: (default run, --quick)
    "steps": (60, 3),
    "prompts": (8, 2),
    "group": (8, 8),
    "prompt_len": (4, 3),
    "completion_len": (8, 6),
    "vocab_size": (1024, 512),
    "d_model": (64, 16),
    "layers": (1, 1),
    "heads": (2, 2),
    "chunk_mib": (1.0, 0.05),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps of a tiny model")
    for name in _DEFAULTS:
        if name != "chunk_mib":
            p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, default=0.2, help="lower clip")
    p.add_argument("--epsilon-high", type=float, default=0.28, help="upper clip (DAPO)")
    p.add_argument("--beta", type=float, default=0.01, help="k3 KL to the initial model")
    p.add_argument("--updates", type=int, default=2, help="updates per sampled batch")
    p.add_argument("--chunk-mib", type=float, default=None, help="fused logits block (MiB)")
    p.add_argument("--no-checks", action="store_true",
                   help="skip evaluating both losses at the fused run's parameters")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=HERE, help="folder for the PNG and .md")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name, (full, quick) in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs both variants; returns the numbers (also written to --out)."""
    args = parse_args(argv)
    log = print
    cfg = train_lm.ModelConfig(
        vocab_size=args.vocab_size, seq_len=args.prompt_len + args.completion_len,
        d_model=args.d_model, num_layers=args.layers, num_heads=args.heads, tied=True,
    )  # fmt: skip
    params = jax.jit(train_lm.init_params, static_argnums=1)(jax.random.key(args.seed), cfg)
    fused_fn, mat_fn = fused_grpo_fn(cfg, args), materialized_grpo_fn(cfg, args)
    rollout = make_rollout(cfg, args)
    check = None if args.no_checks else make_check(fused_fn, mat_fn)
    results = {
        "fused": train("fused", fused_fn, rollout, params, args, log, check),
        "materialized": train("materialized", mat_fn, rollout, params, args, log),
    }
    fused, mat = results["fused"], results["materialized"]
    same = np.abs(np.asarray(fused["reward"]) - np.asarray(mat["reward"])) < 1e-6
    over = np.flatnonzero(~same)
    agreement = {"runs_agree_steps": int(over[0]) if len(over) else len(same)}
    if check is not None:
        agreement["same_params_loss"] = max(v for v, _ in fused["same_params"])
        agreement["same_params_grad_rel"] = max(g for _, g in fused["same_params"])
    args.out.mkdir(parents=True, exist_ok=True)
    results_md = args.out / "grpo_lm_results.md"
    write_results(results_md, args, cfg, results, agreement)
    png = args.out / "grpo_lm_reward.png"
    title = f"GRPO, count on mod 10: vocabulary {cfg.vocab_size}, d_model {cfg.d_model}"
    made = plot(results, png, title)
    log(results_md.read_text())
    for r in results.values():
        r.pop("params")
    return {**results, "agreement": agreement, "results_md": results_md,
            "png": png if made else None}  # fmt: skip


if __name__ == "__main__":
    main()
