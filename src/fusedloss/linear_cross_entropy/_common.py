"""What every linear_cross_entropy implementation shares.

An implementation receives flattened, validated inputs::

    x [N, D], w [D, V], bias [V] | None, labels [N] int32, valid [N] bool, coef [N] f32

(``coef`` is the token's factor in the reduced loss: its weight, divided by the
total weight for ``"mean"``; 0 for excluded tokens) and returns an
:class:`ImplOutput`. Most implementations only provide a *stats core*
``(x, w, bias, labels, valid) -> TokenStats`` that is differentiable w.r.t. ``x``,
``w`` and ``bias`` through the per-token log-sum-exp, label logit and logit sum;
:func:`loss_from_stats` turns those into the loss with the shared CE math, so label
smoothing, z-loss and the reductions are written once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fusedloss import _ce_math


class Hyper(NamedTuple):
    """Static loss hyperparameters (hashable, so they can be nondiff args)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None

    @property
    def need_sum(self) -> bool:
        return self.label_smoothing != 0.0


class TokenStats(NamedTuple):
    """Per-token float32 statistics over the (local) vocabulary."""

    lse: jax.Array  # log-sum-exp of the (softcapped) logits
    label_logit: jax.Array  # the label's (softcapped) logit, 0 if the label is not here
    sum_logits: jax.Array  # sum of the (softcapped) logits (0 unless smoothing)
    max_logit: jax.Array  # largest logit, for argmax / accuracy
    argmax: jax.Array  # int32 column of the largest logit (global id)


class ImplOutput(NamedTuple):
    loss: jax.Array  # [N] coef-weighted per-token loss, or the scalar sum of it
    lse: jax.Array  # [N]
    correct: jax.Array  # [N] bool


def loss_from_stats(
    stats: TokenStats,
    labels: jax.Array,
    valid: jax.Array,
    coef: jax.Array,
    hp: Hyper,
    num_classes: int,
    per_token: bool,
) -> ImplOutput:
    loss = _ce_math.token_loss(
        stats.lse,
        stats.label_logit,
        stats.sum_logits if hp.need_sum else None,
        num_classes=num_classes,
        label_smoothing=hp.label_smoothing,
        z_loss=hp.z_loss,
    )
    loss = jnp.where(valid, loss * coef, 0.0)
    loss = _ce_math.nan_if_bad_label(loss, labels, num_classes, valid)
    correct = valid & (stats.argmax == labels)
    return ImplOutput(
        loss if per_token else jnp.sum(loss),
        jax.lax.stop_gradient(jnp.where(valid, stats.lse, 0.0)),
        correct,
    )


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_down(value: int, multiple: int, minimum: int) -> int:
    return max(minimum, (value // multiple) * multiple)
