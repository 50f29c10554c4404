"""The plain materialized computation: the test oracle and the benchmark baseline.

It forms the whole ``[N, V]`` float32 logits and lets JAX's autodiff produce the
gradients, so it shares no gradient code with the fast paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusedloss import _ce_math
from fusedloss.linear_cross_entropy._common import (
    Hyper,
    ImplOutput,
    TokenStats,
    loss_from_stats,
)


def reference_stats(x, w, bias, labels, hp: Hyper, vocab_offset=0) -> TokenStats:
    dt = _ce_math.acc_dtype(x.dtype)
    logits = jnp.dot(x, w, preferred_element_type=dt)
    if bias is not None:
        logits = logits + bias.astype(dt)[None, :]
    s = _ce_math.softcap(logits, hp.softcap)
    lse = jax.nn.logsumexp(s, axis=-1)
    cols = vocab_offset + jnp.arange(w.shape[1], dtype=labels.dtype)
    label_logit = jnp.sum(jnp.where(labels[:, None] == cols[None, :], s, 0.0), axis=-1)
    sum_logits = jnp.sum(s, axis=-1) if hp.need_sum else jnp.zeros_like(lse)
    return TokenStats(
        lse=lse,
        label_logit=label_logit,
        sum_logits=sum_logits,
        max_logit=jnp.max(s, axis=-1),
        argmax=(vocab_offset + jnp.argmax(s, axis=-1)).astype(jnp.int32),
    )


def linear_cross_entropy_reference(
    x, w, bias, labels, valid, coef, *, hp: Hyper, per_token: bool, config=None
) -> ImplOutput:
    """Materializes ``x @ w``; gradients by autodiff."""
    del config
    with jax.named_scope("fusedloss_lce_reference"):
        # Excluded rows are zeroed so a NaN there cannot reach the gradients of w.
        x = jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))
        stats = reference_stats(x, w, bias, labels, hp)
        return loss_from_stats(stats, labels, valid, coef, hp, w.shape[1], per_token)
