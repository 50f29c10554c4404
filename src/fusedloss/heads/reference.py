"""The plain materialized computation: the test oracle and the benchmark baseline.

It forms the whole ``[N, V]`` float32 logits and lets JAX's autodiff produce the
gradients, so it shares no gradient code with the fast paths.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fusedloss import _ce_math
from fusedloss.heads._engine import Hyper, Problem, TokenStats
from fusedloss.heads._targets import Target


class ReferencePlan(NamedTuple):
    w_vd: bool  # w is held as its [V, D] transpose


def plan(config: None, problem: Problem, target: Target) -> ReferencePlan:
    del config, target  # runs anywhere, nothing to tune
    return ReferencePlan(problem.w_vd)


def reference_stats_core(
    x, w, bias, labels, valid, vocab_offset, hp: Hyper, plan: ReferencePlan
) -> TokenStats:
    """Statistics of the materialized ``[N, V]`` logits; gradients by autodiff."""
    with jax.named_scope("fusedloss_reference"):
        return materialized_stats(x, w, bias, labels, valid, vocab_offset, hp, plan.w_vd)


def materialized_stats(x, w, bias, labels, valid, vocab_offset, hp: Hyper, w_vd: bool):
    """The statistics of the whole logits at once (also ``xla``'s plan for problems
    whose logits fit one chunk: then nothing is gained by chunking)."""
    dt = _ce_math.acc_dtype(x.dtype)
    # Excluded rows are zeroed so a NaN there cannot reach the gradients of w.
    x = jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))
    dims = (((1,), (1,)), ((), ())) if w_vd else (((1,), (0,)), ((), ()))
    logits = jax.lax.dot_general(x, w, dims, preferred_element_type=dt)
    if bias is not None:
        logits = logits + bias.astype(dt)[None, :]
    s = _ce_math.head_logits(logits, hp.softcap, hp.temperature)
    lse = jax.nn.logsumexp(s, axis=-1)
    v = s.shape[1]
    cols = jnp.asarray(vocab_offset, jnp.int32) + jnp.arange(v, dtype=jnp.int32)
    if labels.ndim == 1:
        label_logit = jnp.sum(jnp.where(labels[:, None] == cols[None, :], s, 0.0), axis=-1)
    else:  # [N, K] ids: each one's logit (0 for ids outside this vocabulary)
        local = labels - cols[0]
        inside = (local >= 0) & (local < v)
        picked = jnp.take_along_axis(s, jnp.clip(local, 0, v - 1), axis=1)
        label_logit = jnp.where(inside, picked, 0.0)
    sum_logits = jnp.sum(s, axis=-1) if hp.need_sum else jnp.zeros_like(lse)
    return TokenStats(
        lse=lse,
        label_logit=label_logit,
        sum_logits=sum_logits,
        max_logit=jnp.max(s, axis=-1),
        argmax=cols[0] + jnp.argmax(s, axis=-1).astype(jnp.int32),
        expected_logit=jnp.sum(jax.nn.softmax(s, axis=-1) * s, axis=-1) if hp.entropy else None,
    )
