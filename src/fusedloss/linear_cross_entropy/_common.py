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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusedloss import _ce_math, _checks


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


def is_transposed_matrix(w) -> bool:
    """Whether ``w`` is, in the program being traced, ``a.T`` of some 2-D array ``a``.

    A ``[D, V]`` weight passed as ``embedding.T`` (tied embeddings) is then better
    read as the ``[V, D]`` array it came from: chunks of its rows are contiguous and
    ``w.T`` cancels against the caller's transpose, so no copy of ``w`` is made.
    Outside ``jit`` (or when the producer cannot be seen) this is False, which is
    always correct and at worst costs that copy.
    """
    t = w
    for _ in range(16):  # unwrap differentiation tracers down to the traced value
        inner = getattr(t, "primal", None)
        if inner is None:
            break
        t = inner
    eqn = getattr(t, "parent", None)
    try:
        return eqn.primitive.name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0)
    except (AttributeError, KeyError, TypeError):
        return False


def reads_as_embedding(w, layout: str = "auto") -> bool:
    """Whether ``w`` is to be read through its ``[V, D]`` transpose: ``layout`` is
    ``"embedding"``, or ``"auto"`` and ``w`` is traced as a transpose."""
    return layout == "embedding" or (layout == "auto" and is_transposed_matrix(w))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_down(value: int, multiple: int, minimum: int) -> int:
    return max(minimum, (value // multiple) * multiple)


# ---- argument checks shared by every entry point --------------------------------------


def check_arrays(x, w, labels, bias, where, weights, bias_what: str):
    """dtype/shape checks (the same messages as the unsharded function)."""
    _checks.check_floating("x", x)
    _checks.check_floating("w", w)
    _checks.check_integer("labels", labels)
    x, w, labels = jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    _checks.check_ndim_at_least("x", x, 1)
    if w.ndim != 2:
        raise ValueError(f"`w` must have shape [D, V], got {w.shape}.")
    if w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"`w` must have shape [D, V] with D = x.shape[-1] = {x.shape[-1]}, got {w.shape}."
        )
    if w.dtype != x.dtype:
        raise TypeError(
            f"`x` and `w` must have the same dtype, got {x.dtype} and {w.dtype}; cast one "
            "(e.g. `w.astype(x.dtype)` for mixed precision)."
        )
    _checks.check_shape("labels", labels, x.shape[:-1], "x.shape[:-1]")
    if bias is not None:
        _checks.check_floating("bias", bias)
        bias = jnp.asarray(bias)
        _checks.check_shape("bias", bias, (w.shape[1],), bias_what)
    if where is not None:
        _checks.check_bool("where", where)
        where = jnp.asarray(where)
        _checks.check_shape("where", where, labels.shape, "the shape of `labels`")
    if weights is not None:
        _checks.check_floating("weights", weights)
        weights = jnp.asarray(weights)
        _checks.check_shape("weights", weights, labels.shape, "the shape of `labels`")
    return x, w, labels, bias, where, weights


def static_float(name, value, low, high, *, low_inclusive=True) -> float:
    if not _checks.is_concrete(value):
        raise TypeError(
            f"`{name}` must be a Python number (a static hyperparameter), got a traced value; "
            "pass it as a static argument of `jax.jit`."
        )
    _checks.check_scalar_range(name, value, low, high, low_inclusive=low_inclusive)
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
    if shift and (x.ndim < 2 or shift >= x.shape[-2]):
        raise ValueError(
            f"`shift`={shift} needs `x` of shape [..., T, D] with T > shift, got {x.shape}."
        )


# ---- kernel-backed statistics cores ------------------------------------------------------


def make_stats_core(forward, backward, name: str):
    """A differentiable stats core from a kernel forward and backward.

    ``forward(x, w, bias, local_labels, hp, plan) -> TokenStats`` (local column ids)
    and ``backward(x, w, bias, local_labels, valid, lse, cts, hp, plan) -> (dx, dw,
    db)`` with ``cts`` the cotangents of (lse, label logit, logit sum). The result has
    the contract of ``xla.chunked_stats``: ``labels`` are global ids and ``w``'s
    column ``j`` is vocabulary id ``vocab_offset + j``.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
    def stats_core(x, w, bias, labels, valid, vocab_offset, hp: Hyper, plan):
        return fwd(x, w, bias, labels, valid, vocab_offset, hp, plan)[0]

    def fwd(x, w, bias, labels, valid, vocab_offset, hp, plan):
        offset = jnp.asarray(vocab_offset, jnp.int32)
        local = labels.astype(jnp.int32) - offset
        stats = forward(x, w, bias, local, hp, plan)
        stats = stats._replace(argmax=stats.argmax + offset)
        return stats, (x, w, bias, local, valid, stats.lse)

    def bwd(hp, plan, res, ct):
        x, w, bias, local, valid, lse = res
        cts = (ct.lse, ct.label_logit, ct.sum_logits)
        dx, dw, db = backward(x, w, bias, local, valid, lse, cts, hp, plan)
        return dx, dw, db, None, None, None

    stats_core.defvjp(fwd, bwd)
    stats_core.__name__ = stats_core.__qualname__ = name
    return stats_core


def make_kernel_implementation(name: str, config_type: type, stats_core, check_supported):
    """The ``implementation=name`` entry point around a kernel-backed stats core.

    ``check_supported(x, config)`` raises ``NotImplementedError`` where the kernel
    cannot run (so that ``implementation=None`` falls back); ``config.resolve(n, d,
    v, dtype)`` gives the static plan handed to ``stats_core``. The plan has a field
    ``w_vd``: when set, the core receives ``w`` as its ``[V, D]`` transpose and
    returns that array's gradient.
    """

    def implementation(x, w, bias, labels, valid, coef, *, hp: Hyper, per_token: bool, config):
        config = config_type() if config is None else config
        if not isinstance(config, config_type):
            raise TypeError(
                f"`config` for implementation {name!r} must be a {config_type.__name__}, "
                f"got {config!r}."
            )
        check_supported(x, config)
        n, d = x.shape
        v = w.shape[1]
        plan = config.resolve(n, d, v, x.dtype)
        if reads_as_embedding(w):
            # Tied embeddings: the kernels read the [V, D] array behind ``w`` (``w.T``
            # cancels against the caller's transpose), so no copy of ``w`` is made.
            w, plan = w.T, plan._replace(w_vd=True)
        with jax.named_scope(f"fusedloss_lce_{name}"):
            stats = stats_core(x, w, bias, labels, valid, jnp.int32(0), hp, plan)
            return loss_from_stats(stats, labels, valid, coef, hp, v, per_token)

    implementation.__name__ = implementation.__qualname__ = f"linear_cross_entropy_{name}"
    return implementation
