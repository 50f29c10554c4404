"""``linear_log_probs``: per-token log-probabilities (and entropy) of ``x @ w``.

What policy-gradient RL needs from the output head (GRPO, PPO, RLOO): the
log-probability of each sampled token and, for an entropy bonus, the entropy of each
token's distribution, with gradients for any per-token upstream weights, without the
``[tokens, vocab]`` logits. Both are functions of the engine's per-token statistics
of the head logits ``s = softcap(x @ w + bias) / temperature``::

    log p(y) = s_y - lse(s)          entropy = lse(s) - E_softmax(s)[s]

so one backward maps any cotangents of both outputs to ``dx``, ``dw`` and ``dbias``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fusedloss import _ce_math
from fusedloss.heads._engine import Hyper, TokenStats
from fusedloss.heads._registry import run_stats
from fusedloss.heads._tokens import (
    Tokens,
    check_head_args,
    check_options,
    check_shift,
    prepare_tokens,
    static_float,
)
from fusedloss.heads.transposed import Transposed


def linear_log_probs(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike | Transposed,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    shift: int = 0,
    return_entropy: bool = False,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log-probabilities of ``labels`` under ``softmax(x @ w (+ bias))``, fused.

    Equal to ``jax.nn.log_softmax(logits / temperature)`` at the labels (with
    ``logits = softcap(x @ w + bias)``), and optionally the entropy of each token's
    distribution, without materializing the logits. Differentiable w.r.t. ``x``,
    ``w`` and ``bias`` for any per-token cotangent on both outputs.

    Args:
      x: hidden states ``[..., D]`` (float32 / bfloat16 / float16).
      w: kernel ``[D, V]`` with ``x``'s dtype, or :class:`~fusedloss.Transposed` of
        a ``[V, D]`` tied embedding.
      labels: integer token ids with shape ``x.shape[:-1]`` (e.g. sampled tokens).
      bias: optional ``[V]`` bias.
      where: optional bool mask with the shape of ``labels``; excluded tokens give 0
        and no gradient.
      temperature: ``> 0``; the logits are divided by it (after the softcap), as a
        sampler uses them.
      logit_softcap: if set, logits become ``c * tanh(logits / c)`` first.
      shift: ``x[..., :-shift, :]`` scores ``labels[..., shift:]``.
      return_entropy: also return the entropy of ``softmax(logits / temperature)``.
      implementation: as in :func:`~fusedloss.linear_cross_entropy`; the Pallas
        kernels compute the log-probs and the entropy at any temperature (with bias
        and softcap), so a GPU or TPU runs its kernel by default.
      config: the implementation's tuning dataclass.

    Returns:
      float32 log-probabilities with the (shifted) shape of ``labels``, and the
      entropies if ``return_entropy``. An included label outside ``[0, V)`` gives
      NaN under ``jit``; an eager call raises.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> kx, kw, kl = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(kx, (2, 8, 16))
      >>> w = jax.random.normal(kw, (16, 1000)) / 4
      >>> tokens = jax.random.randint(kl, (2, 8), 0, 1000)
      >>> logp, ent = fusedloss.linear_log_probs(
      ...     x, w, tokens, temperature=0.7, return_entropy=True)
      >>> ref = jax.nn.log_softmax((x @ w) / 0.7)
      >>> want = jnp.take_along_axis(ref, tokens[..., None], -1)[..., 0]
      >>> bool(jnp.allclose(logp, want, atol=1e-5)), logp.shape, ent.shape
      (True, (2, 8), (2, 8))
    """
    args, hp = check_log_probs(
        x, w, labels, bias, where, temperature, logit_softcap, shift, return_entropy
    )
    tokens = prepare_tokens(
        args.x,
        args.labels,
        args.where,
        None,
        shift=shift,
        ignore_index=None,
        reduction="none",
        vocab_size=args.vocab_size,
    )
    stats, _ = run_stats(
        tokens, args.w, args.w_vd, args.bias, hp, implementation=implementation, config=config
    )
    return log_probs_from_stats(stats, tokens, args.vocab_size, return_entropy)


def check_log_probs(x, w, labels, bias, where, temperature, logit_softcap, shift, return_entropy):
    """Checked arguments of a log-probs call (shared with the sharded call): the
    HeadArgs and the statistics' hyperparameters."""
    args = check_head_args(x, w, labels, bias, where, None, "[V], V = w.shape[1]")
    base = check_options("none", 0.0, 0.0, logit_softcap, None, shift)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"`return_entropy` must be a bool, got {return_entropy!r}.")
    temp = static_float("temperature", temperature, 0.0, None, low_inclusive=False)
    check_shift(args.x, shift)
    return args, Hyper(softcap=base.softcap, temperature=temp, entropy=return_entropy)


def log_probs_from_stats(
    stats: TokenStats, tokens: Tokens, vocab_size: int, return_entropy: bool
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The log-probs head on the engine's statistics (shared with the sharded call)."""
    valid = tokens.valid
    logp = jnp.where(valid, stats.label_logit - stats.lse, 0.0)
    logp = _ce_math.nan_if_bad_label(logp, tokens.labels, vocab_size, valid).reshape(tokens.shape)
    if not return_entropy:
        return logp
    entropy = jnp.where(valid, stats.lse - stats.expected_logit, 0.0)
    return logp, entropy.reshape(tokens.shape)
