"""Argument checks and token preparation, shared by every fused entry point.

Every entry point (single-device and sharded) checks its arguments once with
:func:`check_head_args` / :func:`check_options` and prepares its tokens once with
:func:`prepare_tokens`: shift, ``where``, ``ignore_index``, weights, the reduction's
per-token coefficients and the counts reported in the aux outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusedloss import _ce_math, _checks
from fusedloss.heads._engine import Hyper
from fusedloss.heads.transposed import Transposed


class HeadArgs(NamedTuple):
    """Checked arrays of a fused call; ``w`` is the stored array (``[V, D]`` if
    ``w_vd``, the ``array`` of a :class:`Transposed`)."""

    x: jax.Array
    w: jax.Array
    w_vd: bool
    labels: jax.Array
    bias: jax.Array | None
    where: jax.Array | None
    weights: jax.Array | None

    @property
    def vocab_size(self) -> int:
        return self.w.shape[0] if self.w_vd else self.w.shape[1]


def check_head_args(x, w, labels, bias, where, weights, bias_what: str) -> HeadArgs:
    """dtype/shape checks with messages naming the argument."""
    w_vd = isinstance(w, Transposed)
    stored = w.array if w_vd else w
    _checks.check_floating("x", x)
    _checks.check_floating("w", stored)
    _checks.check_integer("labels", labels)
    x, stored, labels = jnp.asarray(x), jnp.asarray(stored), jnp.asarray(labels)
    _checks.check_ndim_at_least("x", x, 1)
    shape = stored.shape[::-1] if w_vd else stored.shape
    what = "Transposed(array) with array of shape [V, D]" if w_vd else "[D, V]"
    if stored.ndim != 2:
        raise ValueError(f"`w` must have shape {what}, got {stored.shape}.")
    if shape[0] != x.shape[-1]:
        raise ValueError(
            f"`w` must have shape {what} with D = x.shape[-1] = {x.shape[-1]}, got {stored.shape}."
        )
    if stored.dtype != x.dtype:
        raise TypeError(
            f"`x` and `w` must have the same dtype, got {x.dtype} and {stored.dtype}; cast one "
            "(e.g. `w.astype(x.dtype)` for mixed precision)."
        )
    _checks.check_shape("labels", labels, x.shape[:-1], "x.shape[:-1]")
    if bias is not None:
        _checks.check_floating("bias", bias)
        bias = jnp.asarray(bias)
        _checks.check_shape("bias", bias, (shape[1],), bias_what)
    if where is not None:
        _checks.check_bool("where", where)
        where = jnp.asarray(where)
        _checks.check_shape("where", where, labels.shape, "the shape of `labels`")
    if weights is not None:
        _checks.check_floating("weights", weights)
        weights = jnp.asarray(weights)
        _checks.check_shape("weights", weights, labels.shape, "the shape of `labels`")
    return HeadArgs(x, stored, w_vd, labels, bias, where, weights)


def static_float(name, value, low, high, *, low_inclusive=True, high_inclusive=False) -> float:
    if not _checks.is_concrete(value):
        raise TypeError(
            f"`{name}` must be a Python number (a static hyperparameter), got a traced value; "
            "pass it as a static argument of `jax.jit`."
        )
    _checks.check_scalar_range(
        name, value, low, high, low_inclusive=low_inclusive, high_inclusive=high_inclusive
    )
    return float(value)


def check_options(reduction, label_smoothing, z_loss, logit_softcap, ignore_index, shift) -> Hyper:
    """Checks the scalar options; returns the static hyperparameters."""
    _checks.check_reduction(reduction)
    hp = Hyper(
        label_smoothing=static_float("label_smoothing", label_smoothing, 0.0, 1.0),
        z_loss=static_float("z_loss", z_loss, 0.0, None),
        softcap=None
        if logit_softcap is None
        else static_float("logit_softcap", logit_softcap, 0.0, None, low_inclusive=False),
    )
    if ignore_index is not None and not isinstance(ignore_index, int | np.integer):
        raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")
    if not isinstance(shift, int | np.integer) or shift < 0:
        raise ValueError(f"`shift` must be a non-negative int, got {shift!r}.")
    return hp


def check_shift(x, shift: int) -> None:
    if shift and (x.ndim < 2 or shift > x.shape[-2]):
        raise ValueError(
            f"`shift`={shift} needs `x` of shape [..., T, D] with T >= shift, got {x.shape}."
        )


def check_label_values(labels, valid, vocab_size: int, ignore_index: int | None) -> None:
    """Eager calls: included labels outside ``[0, vocab_size)`` raise (under ``jit``
    their loss is NaN instead). Across hosts only local shards are readable: skipped."""
    if _checks.is_concrete(labels) and labels.is_fully_addressable:
        _checks.check_labels_in_range(
            "labels", labels, vocab_size, ignore_index=ignore_index, mask=valid
        )


class Tokens(NamedTuple):
    """Flattened, prepared tokens of one device."""

    x: jax.Array  # [N, D]
    labels: jax.Array  # [N] int32
    valid: jax.Array  # [N] bool: included
    coef: jax.Array  # [N] the token's factor in the reduced loss (0 if excluded)
    weight_sum: jax.Array  # scalar, over the data axes
    num_tokens: jax.Array  # int32 scalar, over the data axes
    shape: tuple[int, ...]  # the (shifted) token shape
    weights: jax.Array | None = None  # [N] the token's weight, 0 if excluded (a constant)


def psum_over(v, axes: tuple[str, ...]):
    # One axis at a time: a multi-axis psum rejects operands that vary over only some.
    for a in axes:
        v = jax.lax.psum(v, a)
    return v


def prepare_tokens(
    x,
    labels,
    where,
    weights,
    *,
    shift: int,
    ignore_index: int | None,
    reduction: str,
    vocab_size: int,
    data_axes: tuple[str, ...] = (),
    check_labels: bool = True,
) -> Tokens:
    """Shift, flatten, mask and weigh the tokens; the reduction's coefficients.

    ``data_axes`` (inside ``shard_map``) are the mesh axes the tokens are split over:
    the denominator of ``"mean"`` and the counts are summed over them, so the result
    is the global weighted mean, not a mean of per-device means. Concrete labels of
    included tokens outside ``[0, vocab_size)`` raise (``check_labels``).
    """
    if shift:
        x = x[..., :-shift, :]
        labels = labels[..., shift:]
        where = None if where is None else where[..., shift:]
        weights = None if weights is None else weights[..., shift:]
    shape = labels.shape
    x2 = x.reshape(-1, x.shape[-1])
    lab = labels.reshape(-1)
    valid = jnp.ones_like(lab, dtype=bool) if where is None else where.reshape(-1)
    if ignore_index is not None:
        valid = valid & (lab != ignore_index)
    if check_labels:
        check_label_values(lab, valid, vocab_size, ignore_index)
    lab = lab.astype(jnp.int32)
    acc = _ce_math.acc_dtype(x.dtype)
    wts = (
        jnp.ones_like(lab, dtype=acc)
        if weights is None
        else jax.lax.stop_gradient(weights.reshape(-1).astype(acc))
    )
    wts = jnp.where(valid, wts, jnp.zeros((), acc))
    weight_sum = psum_over(jnp.sum(wts), data_axes)
    if reduction == "mean":
        safe = jnp.where(weight_sum == 0, jnp.ones((), acc), weight_sum)
        coef = jnp.where(weight_sum == 0, jnp.zeros((), acc), wts / safe)
    else:
        coef = wts
    num_tokens = psum_over(jnp.sum(valid, dtype=jnp.int32), data_axes)
    weight_sum = jax.lax.stop_gradient(weight_sum)
    return Tokens(x2, lab, valid, coef, weight_sum, num_tokens, shape, wts)
