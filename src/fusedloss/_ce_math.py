"""Per-token softmax cross-entropy math, in one place.

Both the standalone ``softmax_cross_entropy_with_integer_labels`` and every
``linear_cross_entropy`` implementation (materialized, chunked, Pallas, sharded) build
their loss and their logit gradient from the functions here, so label smoothing,
z-loss and softcapping are defined once.

Notation, per token with (softcapped) logits ``s`` over ``V`` classes, label ``y``,
smoothing ``a`` and z-loss weight ``b``::

    lse  = log sum_j exp(s_j)
    loss = lse - (1 - a) s_y - (a / V) sum_j s_j + b lse**2
    dloss/ds_j = (1 + 2 b lse) softmax(s)_j - (1 - a) [j == y] - a / V
    s = c tanh(z / c)  =>  ds/dz = 1 - (s / c)**2

All of it is evaluated in float32 (or wider) whatever the input dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def acc_dtype(dtype: Any) -> Any:
    """Accumulation dtype: float32, or float64 for float64 inputs.

    Chosen explicitly rather than by type promotion, which is an error for
    bfloat16 + float32 under ``jax_numpy_dtype_promotion="strict"``.
    """
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def softcap(z: Array, cap: Array | float | None) -> Array:
    """``cap * tanh(z / cap)``; identity when ``cap`` is None."""
    if cap is None:
        return z
    return cap * jnp.tanh(z / cap)


def head_logits(z: Array, cap: float | None, temperature: float = 1.0) -> Array:
    """The logits a head reduces: ``softcap(z) / temperature``."""
    s = softcap(z, cap)
    return s if temperature == 1.0 else s / temperature


def softcap_grad(capped: Array, cap: Array | float | None) -> Array | float:
    """d softcap(z) / dz written in terms of the capped value (no tanh recomputed)."""
    if cap is None:
        return 1.0
    r = capped / cap
    return 1.0 - r * r


def token_loss(
    lse: Array,
    label_logit: Array,
    sum_logits: Array | None,
    *,
    num_classes: Array | int,
    label_smoothing: Array | float,
    z_loss: Array | float,
) -> Array:
    """Per-token loss from the token's log-sum-exp, label logit and logit sum.

    ``sum_logits`` may be None when ``label_smoothing`` is statically 0. Integer-label
    CE subtracts the log-normalizer only from the label's logit, never from every
    logit, so nothing logits-sized is formed here.
    """
    loss = lse - (1.0 - label_smoothing) * label_logit
    if sum_logits is not None:
        loss = loss - (label_smoothing / num_classes) * sum_logits
    return loss + z_loss * lse * lse


def token_loss_cotangents(
    lse: Array,
    scale: Array,
    *,
    num_classes: Array | int,
    label_smoothing: Array | float,
    z_loss: Array | float,
) -> tuple[Array, Array, Array]:
    """Cotangents of ``scale * token_loss`` w.r.t. (lse, label logit, logit sum)."""
    return (
        scale * (1.0 + 2.0 * z_loss * lse),
        -scale * (1.0 - label_smoothing),
        -scale * (label_smoothing / num_classes),
    )


def stats_grad(
    capped: Array,
    lse: Array,
    is_label: Array,
    g_lse: Array,
    g_label: Array,
    g_sum: Array,
    *,
    cap: Array | float | None,
    include: Array | None = None,
    temperature: float = 1.0,
    g_expected: Array | None = None,
    expected: Array | None = None,
) -> Array:
    """Pulls cotangents of a token's statistics back to raw logits.

    ``d lse / d s = softmax(s)``, ``d s_y / d s = onehot(y)``, ``d sum(s) / d s = 1``,
    and for the expected logit ``E = sum(softmax(s) * s)`` (given ``g_expected``
    and ``E``): ``d E / d s = softmax(s) * (1 + s - E)``; then through
    ``s = softcap(z) / temperature``. Shapes: ``capped``/``is_label``/``include``
    ``[..., Vc]`` (a vocabulary chunk or all of it, the head's logits ``s``); ``lse``
    and the cotangents ``[..., 1]``. ``include`` marks the classes taking part in
    the normalizer and the logit sum (the label's own logit counts regardless).
    """
    p = jnp.exp(capped - lse)
    if include is not None:
        p = jnp.where(include, p, 0.0)
        g_sum = jnp.where(include, g_sum, 0.0)
    g = g_lse * p + jnp.where(is_label, g_label, 0.0) + g_sum
    if g_expected is not None:
        g = g + g_expected * p * (1.0 + capped - expected)
    if temperature == 1.0:
        return g * softcap_grad(capped, cap)
    return g * softcap_grad(capped * temperature, cap) / temperature


def logit_grad(
    capped: Array,
    lse: Array,
    is_label: Array,
    scale: Array,
    *,
    num_classes: Array | int,
    label_smoothing: Array | float,
    z_loss: Array | float,
    cap: Array | float | None,
    include: Array | None = None,
) -> Array:
    """Gradient of ``scale * token_loss`` w.r.t. the raw (pre-softcap) logits.

    ``(1 + 2 b lse) softmax - (1 - a) onehot - a / V``, through the softcap; shapes
    as in :func:`stats_grad`, ``scale`` ``[..., 1]`` being the cotangent of the
    token's loss (0 for excluded tokens).
    """
    cts = token_loss_cotangents(
        lse, scale, num_classes=num_classes, label_smoothing=label_smoothing, z_loss=z_loss
    )
    return stats_grad(capped, lse, is_label, *cts, cap=cap, include=include)


def lse_combine(m1: Array, l1: Array, m2: Array, l2: Array) -> tuple[Array, Array]:
    """Combines two partial log-sum-exps kept as (running max, sum of exp(s - max)).

    Safe when a side has seen nothing (max -inf, sum 0).
    """
    m = jnp.maximum(m1, m2)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    return m, l1 * jnp.exp(m1 - m_safe) + l2 * jnp.exp(m2 - m_safe)


def expected_combine(m_old: Array, ex: Array, m: Array, shift: Array, tile: Array) -> Array:
    """Folds a tile into the running ``sum(exp(s - max) * s)`` of an online softmax
    (what the expected logit ``E_softmax(s)[s]`` is divided out of at the end).

    ``ex`` is relative to the old running max ``m_old``, ``tile`` (the tile's sum of
    ``exp(s - shift) * s``) to the tile's ``shift``; both are rescaled to the new
    running max ``m``. Safe when a side has seen nothing (max -inf).
    """
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    old_scale = jnp.where(jnp.isneginf(m_old), 0.0, jnp.exp(m_old - m_safe))
    return ex * old_scale + tile * jnp.exp(shift - m_safe)


def lse_finalize(m: Array, l: Array) -> Array:
    """log-sum-exp from (running max, sum): -inf for an empty row, NaN propagates."""
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    return m_safe + jnp.log(l)


def label_in_range(labels: Array, num_classes: int) -> Array:
    return (labels >= 0) & (labels < num_classes)


def nan_if_bad_label(loss: Array, labels: Array, num_classes: int, valid: Array) -> Array:
    """A label outside ``[0, V)`` on an included token makes its loss NaN (loud)."""
    bad = valid & ~label_in_range(labels, num_classes)
    return jnp.where(bad, jnp.nan, loss)


def picked_in_chunk(block, local, new):
    """``block``'s entries at the chunk-local ids ``local`` (``[n]`` or ``[n, K]``) by a
    gather (a select-and-sum would write a block); 0 for ids outside the chunk or on a
    column ``new`` does not mark (a clamped last chunk's repeated ones)."""
    vc = block.shape[1]
    here = (local >= 0) & (local < vc)
    local = jnp.clip(local, 0, vc - 1)
    idx = local if local.ndim == 2 else local[:, None]
    picked = jnp.take_along_axis(block, idx, axis=1).reshape(local.shape)
    return jnp.where(here & new[local], picked, 0.0)
