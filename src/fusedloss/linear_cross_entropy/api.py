"""Public ``linear_cross_entropy``: argument checks, implementation registry, fallback."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType

from fusedloss import _ce_math, _checks
from fusedloss.linear_cross_entropy._common import (
    ImplOutput,
    check_arrays,
    check_options,
    check_shift,
)
from fusedloss.linear_cross_entropy.reference import linear_cross_entropy_reference
from fusedloss.linear_cross_entropy.xla import XlaConfig, linear_cross_entropy_xla

Implementation = Literal["xla", "reference", "pallas_gpu", "pallas_tpu"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyAux:
    """Per-token side outputs of :func:`linear_cross_entropy` (not differentiable).

    Attributes:
      lse: float32 log-sum-exp of each token's (softcapped) logits, with the shape
        of the (shifted) labels (0 for excluded tokens); ``label logprob = -loss``
        for plain CE, and
        ``lse`` is what z-loss penalizes.
      correct: bool, the argmax of the logits equals the label (False for excluded
        tokens); ``correct.sum() / num_tokens`` is the accuracy.
      num_tokens: int32 scalar, the number of included tokens (``where`` and
        ``ignore_index`` applied); with ``reduction="sum"`` it lets gradient
        accumulation normalize by the global token count.
      weight_sum: float32 scalar, the sum of the included tokens' weights (the
        denominator of ``reduction="mean"``; equals ``num_tokens`` without weights).
      implementation: the implementation that ran (static).
    """

    lse: jax.Array
    correct: jax.Array
    num_tokens: jax.Array
    weight_sum: jax.Array
    implementation: str = dataclasses.field(default="", metadata={"static": True})


ImplFn = Callable[..., ImplOutput]


class _Impl(NamedTuple):
    fn: ImplFn
    config_type: type | None


_REGISTRY: dict[str, _Impl] = {
    "reference": _Impl(linear_cross_entropy_reference, None),
    "xla": _Impl(linear_cross_entropy_xla, XlaConfig),
}
_KNOWN = ("xla", "reference", "pallas_gpu", "pallas_tpu")
_DEFAULT_ORDER = {
    "gpu": ("pallas_gpu", "xla"),
    "cuda": ("pallas_gpu", "xla"),
    "rocm": ("pallas_gpu", "xla"),
    "tpu": ("pallas_tpu", "xla"),
}


def register_implementation(name: str, fn: ImplFn, config_type: type | None) -> None:
    """Adds an implementation (used by the optional kernel modules)."""
    _REGISTRY[name] = _Impl(fn, config_type)


def _load_optional_implementations() -> None:
    # Kernel modules register themselves on import; a missing Pallas backend must
    # not make the package unusable.
    for module in ("pallas_gpu", "pallas_tpu"):
        if module in _REGISTRY:
            continue
        try:
            __import__(f"fusedloss.linear_cross_entropy.{module}")
        except ImportError:
            pass


def _candidates(implementation) -> tuple[tuple[str, ...], bool]:
    """(names to try in order, whether the choice was a single explicit name)."""
    if implementation is None:
        backend = jax.default_backend()
        return _DEFAULT_ORDER.get(backend, ("xla",)), False
    if isinstance(implementation, str):
        names, explicit = (implementation,), True
    elif isinstance(implementation, Sequence) and all(isinstance(n, str) for n in implementation):
        names, explicit = tuple(implementation), False
        if not names:
            raise ValueError("`implementation` must not be an empty sequence.")
    else:
        raise TypeError(
            f"`implementation` must be None, a name or a sequence of names, got {implementation!r}."
        )
    for n in names:
        if n not in _KNOWN:
            raise ValueError(f"`implementation` must be one of {_KNOWN} (or None), got {n!r}.")
    return names, explicit


def _explicit_axes(a) -> tuple[Any, list[tuple[str, ...]]]:
    """(mesh, per-dimension Explicit mesh axes) of an array's type; no axes if none."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None, [() for _ in range(a.ndim)]
    explicit = {
        n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Explicit
    }
    dims = []
    for entry in tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec)):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        dims.append(tuple(n for n in names if n in explicit))
    return mesh, dims


def _sharded_layout(x, w):
    """(mesh, data axes, model axes) when ``x`` or ``w`` is split over Explicit mesh
    axes (``jax.set_mesh`` with ``AxisType.Explicit``), else None."""
    mesh_x, dims_x = _explicit_axes(x)
    mesh_w, dims_w = _explicit_axes(w)
    if not any(dims_x) and not any(dims_w):
        return None
    mesh = mesh_x if any(dims_x) else mesh_w
    return mesh, dims_x[0] if x.ndim > 1 else (), dims_w[1]


def linear_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: Literal["none", "sum", "mean"] = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    shift: int = 0,
    return_aux: bool = False,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
) -> jax.Array | tuple[jax.Array, LinearCrossEntropyAux]:
    r"""Softmax cross-entropy of ``x @ w (+ bias)`` without materializing the logits.

    Equal to ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels)``
    reduced as asked, but the chunked implementations never hold the
    ``[tokens, vocab]`` logits, forward or backward. Matmuls take the inputs' dtype
    and accumulate in float32; all softmax math is float32.

    Args:
      x: hidden states ``[..., D]``, float32 / bfloat16 / float16.
      w: classifier kernel ``[D, V]`` with ``x``'s dtype (flax ``Dense`` layout);
        tied embeddings pass ``embedding.T`` (no copy is made).
      labels: integer target ids with shape ``x.shape[:-1]``.
      bias: optional ``[V]`` float bias.
      where: optional bool mask with the shape of ``labels``; True = include.
      weights: optional float per-token weights with the shape of ``labels``
        (treated as constants: no gradient flows to them).
      ignore_index: tokens whose label equals it are excluded (e.g. ``-100``).
      reduction: ``"none"`` (per-token losses times weights, 0 where excluded, in
        ``x``'s dtype), ``"sum"`` or ``"mean"`` (weighted mean over included
        tokens, 0 if none is included), both float32 scalars.
      label_smoothing: in ``[0, 1)``; the target mixes in ``label_smoothing / V``
        on every class.
      z_loss: adds ``z_loss * lse**2`` per included token.
      logit_softcap: if set, logits become ``c * tanh(logits / c)``.
      shift: ``x[..., :-shift, :]`` predicts ``labels[..., shift:]`` (next-token
        prediction with ``shift=1``); ``where``/``weights`` align with ``labels``.
      return_aux: also return a :class:`LinearCrossEntropyAux`.
      implementation: ``None`` (best for the backend, falling back in order),
        ``"xla"`` (chunked, every backend), ``"reference"`` (materialized),
        ``"pallas_gpu"``, ``"pallas_tpu"``, or a sequence tried in order.
      config: the implementation's tuning dataclass, e.g. :class:`XlaConfig`.

    Inputs split over ``Explicit`` mesh axes (the first axis of ``x`` over data axes,
    the columns of ``w`` over model axes) run per shard, as
    :func:`~fusedloss.linear_cross_entropy.sharded.sharded_linear_cross_entropy` on
    those axes (the ``xla`` core's ``recompute`` strategy on each device).

    Returns:
      The loss (``labels``' shape for ``"none"``, else a scalar), and the aux
      outputs if ``return_aux``. An included token whose label lies outside
      ``[0, V)`` makes the loss NaN under ``jit``; an eager call raises instead.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> kx, kw, kl = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(kx, (2, 8, 16))  # [batch, seq, D]
      >>> w = jax.random.normal(kw, (16, 1000)) / 4  # [D, V]
      >>> labels = jax.random.randint(kl, (2, 8), 0, 1000)
      >>> loss = fusedloss.linear_cross_entropy(x, w, labels, shift=1)
      >>> ref = fusedloss.softmax_cross_entropy_with_integer_labels(
      ...     x[:, :-1] @ w, labels[:, 1:]).mean()
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5))
      True
      >>> loss, grads = jax.value_and_grad(fusedloss.linear_cross_entropy, (0, 1))(x, w, labels)
      >>> grads[1].shape
      (16, 1000)
    """
    # ---- argument checks (trace time) -------------------------------------------------
    x, w, labels, bias, where, weights = check_arrays(
        x, w, labels, bias, where, weights, "[V], V = w.shape[1]"
    )
    v = w.shape[1]
    hp = check_options(reduction, label_smoothing, z_loss, logit_softcap, ignore_index, shift)
    check_shift(x, shift)
    if shift:
        x = x[..., :-shift, :]
        labels = labels[..., shift:]
        where = None if where is None else where[..., shift:]
        weights = None if weights is None else weights[..., shift:]
    names, explicit = _candidates(implementation)

    # ---- inputs split over Explicit mesh axes: run per shard ---------------------------
    layout = None if names == ("reference",) else _sharded_layout(x, w)
    if layout is not None:
        if "xla" not in names:
            raise NotImplementedError(
                f"`x`/`w` are split over Explicit mesh axes; implementation={implementation!r} "
                "does not run per shard there. Use implementation=None or 'xla' (per-shard "
                "chunked core), or 'reference'."
            )
        if isinstance(config, XlaConfig) and config.strategy == "grad_in_forward":
            raise ValueError(
                "`x`/`w` are split over Explicit mesh axes, where each shard runs the "
                "'recompute' strategy; got XlaConfig(strategy='grad_in_forward'). Use "
                "strategy='auto' or 'recompute'."
            )
        from fusedloss.linear_cross_entropy.sharded import sharded_linear_cross_entropy

        mesh, data_axes, model_axes = layout
        return sharded_linear_cross_entropy(
            x,
            w,
            labels,
            mesh=mesh,
            data_axis=data_axes or None,
            model_axis=model_axes or None,
            bias=bias,
            where=where,
            weights=weights,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            logit_softcap=logit_softcap,
            shift=0,  # already applied above
            return_aux=return_aux,
            config=config if isinstance(config, XlaConfig) else None,
        )

    # ---- flatten tokens, build masks and per-token factors -----------------------------
    token_shape = labels.shape
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    lab = labels.reshape(-1)
    valid = jnp.ones(lab.shape, bool) if where is None else where.reshape(-1)
    if ignore_index is not None:
        valid = valid & (lab != ignore_index)
    _checks.check_labels_in_range("labels", lab, v, ignore_index=ignore_index, mask=valid)
    lab = lab.astype(jnp.int32)
    acc = _ce_math.acc_dtype(x.dtype)
    wts = (
        jnp.ones(lab.shape, acc)
        if weights is None
        else jax.lax.stop_gradient(weights.reshape(-1).astype(acc))
    )
    wts = jnp.where(valid, wts, 0.0)
    weight_sum = jnp.sum(wts)
    if reduction == "mean":
        safe = jnp.where(weight_sum == 0, 1.0, weight_sum)
        coef = jnp.where(weight_sum == 0, 0.0, wts / safe)
    else:
        coef = wts
    per_token = reduction == "none"

    # ---- dispatch ------------------------------------------------------------------------
    _load_optional_implementations()
    errors = []
    for name in names:
        impl = _REGISTRY.get(name)
        if impl is None:
            errors.append(f"{name}: not available in this installation")
            continue
        if config is not None and impl.config_type is not None and explicit:
            if not isinstance(config, impl.config_type):
                raise TypeError(
                    f"`config` for implementation {name!r} must be a "
                    f"{impl.config_type.__name__}, got {type(config).__name__}."
                )
        cfg = (
            config
            if impl.config_type is not None and isinstance(config, impl.config_type)
            else None
        )
        try:
            out = impl.fn(x2, w, bias, lab, valid, coef, hp=hp, per_token=per_token, config=cfg)
        except NotImplementedError as e:
            if explicit:
                raise
            errors.append(f"{name}: {e}")
            continue
        break
    else:
        raise NotImplementedError(
            "No linear_cross_entropy implementation could run: " + "; ".join(errors)
        )

    loss = out.loss.reshape(token_shape).astype(x.dtype) if per_token else out.loss
    if not return_aux:
        return loss
    aux = LinearCrossEntropyAux(
        lse=out.lse.reshape(token_shape),
        correct=out.correct.reshape(token_shape),
        num_tokens=jnp.sum(valid, dtype=jnp.int32),
        weight_sum=jax.lax.stop_gradient(weight_sum),
        implementation=name,
    )
    return loss, aux
