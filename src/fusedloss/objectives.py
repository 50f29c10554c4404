"""Optax-ready objectives: ``loss_fn(params, batch) -> (loss, aux)`` for training loops.

An objective wraps a model's apply function and a loss into the function that
``jax.value_and_grad(loss_fn, has_aux=True)`` and every optax optimizer expect:

- :func:`causal_lm_objective` -- next-token prediction with the fused
  :func:`~fusedloss.linear_cross_entropy` (the ``[tokens, vocab]`` logits are never
  materialized), with padding masks, per-token weights, ``ignore_index``, z-loss,
  label smoothing and softcapping;
- :func:`classification_objective` -- any per-example classification loss on
  logits, with a mask and weights;
- :func:`accumulate_gradients` -- gradient accumulation over micro-batches that
  normalizes by the *global* (weighted) token count, so that it equals one step on
  the concatenated batch even when micro-batches hold different numbers of tokens
  (averaging per-micro-batch means does not).

The aux outputs hold weighted *sums* (``loss_sum``, ``weight_sum``, ...), which add
up across micro-batches and devices; the means (``loss``, ``accuracy``,
``perplexity``, ...) are properties computed from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from fusedloss import _ce_math, _checks
from fusedloss._softmax_ce import softmax_cross_entropy_with_integer_labels
from fusedloss.heads.cross_entropy import linear_cross_entropy

Params = Any
Batch = Mapping[str, Any]
ObjectiveReduction = Literal["sum", "mean"]
_OBJECTIVE_REDUCTIONS = ("sum", "mean")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 (not NaN) where ``den`` is 0: an empty batch has mean 0."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def _sg(x: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(x)


def _static_field(default: str) -> Any:
    return dataclasses.field(default=default, metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CausalLMAux:
    """Statistics of a :func:`causal_lm_objective` call (no gradient flows through them).

    Every array field is a float32 (``num_tokens``: int32) scalar that is a *sum* over
    the included tokens, weighted by the per-token weights, so that auxes of
    micro-batches or devices combine by adding them (``jax.tree.map(jnp.add, a, b)``).
    The properties turn them into means; an empty batch gives 0 (perplexity 1).

    Attributes:
      loss_sum: sum of the weighted per-token objective (cross-entropy with label
        smoothing, plus z-loss).
      nll_sum: sum of the weighted negative log-likelihoods ``lse - label_logit``
        (no smoothing, no z-loss): what perplexity is computed from.
      correct_sum: weighted count of tokens whose argmax prediction is the label.
      lse_sum: weighted sum of the log-sum-exp of each token's logits.
      lse_sq_sum: weighted sum of ``lse**2`` (what z-loss penalizes).
      num_tokens: number of included tokens (mask, ``ignore_index``, shift).
      weight_sum: sum of the included tokens' weights (``num_tokens`` without
        weights): the denominator of every mean.
      reduction: the reduction of the loss returned beside this aux (static).
      implementation: the ``linear_cross_entropy`` implementation that ran (static).
    """

    loss_sum: jax.Array
    nll_sum: jax.Array
    correct_sum: jax.Array
    lse_sum: jax.Array
    lse_sq_sum: jax.Array
    num_tokens: jax.Array
    weight_sum: jax.Array
    reduction: str = _static_field("mean")
    implementation: str = _static_field("")

    @property
    def loss(self) -> jax.Array:
        """Weighted mean of the objective over the included tokens."""
        return _safe_div(self.loss_sum, self.weight_sum)

    @property
    def nll(self) -> jax.Array:
        """Weighted mean negative log-likelihood (nats per token)."""
        return _safe_div(self.nll_sum, self.weight_sum)

    @property
    def perplexity(self) -> jax.Array:
        """``exp(nll)``: independent of label smoothing and z-loss."""
        return jnp.exp(self.nll)

    @property
    def accuracy(self) -> jax.Array:
        """Weighted fraction of included tokens whose argmax is the label."""
        return _safe_div(self.correct_sum, self.weight_sum)

    @property
    def lse_mean(self) -> jax.Array:
        """Weighted mean log-sum-exp of the logits (the log-normalizer)."""
        return _safe_div(self.lse_sum, self.weight_sum)

    @property
    def lse_sq_mean(self) -> jax.Array:
        """Weighted mean of ``lse**2``: the z-loss term is ``z_loss * lse_sq_mean``."""
        return _safe_div(self.lse_sq_sum, self.weight_sum)

    def metrics(self) -> dict[str, jax.Array]:
        """The means, as a flat dict of scalars for logging."""
        return {
            "loss": self.loss,
            "nll": self.nll,
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "lse": self.lse_mean,
            "lse_sq": self.lse_sq_mean,
            "num_tokens": self.num_tokens,
        }


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassificationAux:
    """Statistics of a :func:`classification_objective` call (no gradient).

    Array fields are float32 (``num_examples``: int32) scalar *sums* over the
    included examples, weighted by their weights, so they add up across
    micro-batches and devices.

    Attributes:
      loss_sum: sum of the weighted per-example losses.
      correct_sum: weighted count of examples whose argmax is the label.
      num_examples: number of included examples.
      weight_sum: sum of the included examples' weights: the denominator of the means.
      reduction: the reduction of the loss returned beside this aux (static).
    """

    loss_sum: jax.Array
    correct_sum: jax.Array
    num_examples: jax.Array
    weight_sum: jax.Array
    reduction: str = _static_field("mean")

    @property
    def loss(self) -> jax.Array:
        """Weighted mean loss over the included examples."""
        return _safe_div(self.loss_sum, self.weight_sum)

    @property
    def accuracy(self) -> jax.Array:
        """Weighted fraction of included examples whose argmax is the label."""
        return _safe_div(self.correct_sum, self.weight_sum)

    def metrics(self) -> dict[str, jax.Array]:
        """The means, as a flat dict of scalars for logging."""
        return {"loss": self.loss, "accuracy": self.accuracy, "num_examples": self.num_examples}


def _check_objective_reduction(reduction: Any) -> None:
    if reduction not in _OBJECTIVE_REDUCTIONS:
        raise ValueError(
            f"`reduction` must be one of {_OBJECTIVE_REDUCTIONS} for an objective, got "
            f"{reduction!r} (use linear_cross_entropy(..., reduction='none') for per-token "
            "losses)."
        )


def _batch_entry(batch: Any, key: str, what: str) -> jax.Array:
    if not isinstance(batch, Mapping) or key not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"`batch` must be a mapping with a {key!r} entry ({what}), got {got}.")
    return jnp.asarray(batch[key])


def _batch_mask_and_weights(
    batch: Batch, shape: tuple[int, ...], shape_name: str
) -> tuple[jax.Array | None, jax.Array | None]:
    """The optional ``"mask"`` (bool, or 0/1 integers as in HF ``attention_mask``) and
    ``"weights"`` entries of a batch, checked against ``shape``."""
    mask = batch.get("mask")
    if mask is not None:
        mask = jnp.asarray(mask)
        if jnp.issubdtype(mask.dtype, jnp.integer):
            mask = mask != 0
        _checks.check_bool("batch['mask']", mask)
        _checks.check_shape("batch['mask']", mask, shape, shape_name)
    weights = batch.get("weights")
    if weights is not None:
        _checks.check_floating("batch['weights']", weights)
        weights = jnp.asarray(weights)
        _checks.check_shape("batch['weights']", weights, shape, shape_name)
    return mask, weights


def _check_objective(reduction: str, apply_fn) -> None:
    _check_objective_reduction(reduction)
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be callable, got {apply_fn!r}.")


def _model_output(out: jax.Array, ids: jax.Array, what: str) -> jax.Array:
    """``apply_fn``'s output, checked to be ``[*ids.shape, features]``."""
    if out.ndim != ids.ndim + 1 or out.shape[:-1] != ids.shape:
        raise ValueError(
            f"`apply_fn` must return {what} [..., F] with [...] = {ids.shape} (the shape of "
            f"the batch's ids), got {out.shape}."
        )
    return out


def _token_weights(
    shape: tuple[int, ...],
    mask: jax.Array | None,
    weights: jax.Array | None,
    labels: jax.Array,
    ignore_index: int | None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Weight of every token in the reduction (``dtype``), 0 where excluded."""
    w = jnp.ones(shape, dtype) if weights is None else _sg(weights).astype(dtype)
    if mask is not None:
        w = jnp.where(mask, w, 0.0)
    if ignore_index is not None:
        w = jnp.where(labels != ignore_index, w, 0.0)
    return w


def causal_lm_objective(
    apply_fn: Callable[..., jax.Array],
    *,
    head: Callable[[Params], jax.Array],
    head_bias: Callable[[Params], jax.Array] | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: ObjectiveReduction = "mean",
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
) -> Callable[..., tuple[jax.Array, CausalLMAux]]:
    """Next-token-prediction objective built on the fused linear cross-entropy.

    Returns ``loss_fn(params, batch, *args, **kwargs) -> (loss, aux)``, which runs
    ``hidden = apply_fn(params, batch["tokens"], *args, **kwargs)`` (hidden states
    ``[..., T, D]`` before the output projection) and then
    ``linear_cross_entropy(hidden, head(params), tokens, shift=1, ...)``: position
    ``t`` predicts token ``t + 1`` and the ``[tokens, vocab]`` logits are never
    materialized. ``loss_fn`` plugs into ``jax.value_and_grad(loss_fn,
    has_aux=True)``, :func:`accumulate_gradients` and any optax optimizer.

    The batch is a mapping with:

    - ``"tokens"``: integer ids ``[..., T]`` (``T >= 2``), the model input and,
      shifted by one, the targets;
    - ``"mask"`` (optional): bool or 0/1 integers ``[..., T]``, True for real
      tokens; token ``t`` is a target only if ``mask[..., t]`` (padding is never
      predicted);
    - ``"weights"`` (optional): float per-token weights ``[..., T]``, aligned like
      ``mask`` (no gradient flows to them).

    Args:
      apply_fn: ``apply_fn(params, tokens, *args, **kwargs)`` returning the hidden
        states ``[..., T, D]``. Extra arguments of ``loss_fn`` (e.g. a dropout key)
        are passed on to it.
      head: ``head(params)`` returning the classifier kernel ``[D, V]`` with the
        hidden states' dtype; for tied embeddings return
        :class:`~fusedloss.Transposed` ``(params[...])`` of the ``[V, D]`` embedding
        (no copy is made).
      head_bias: optional ``head_bias(params)`` returning a ``[V]`` bias.
      ignore_index: targets equal to it are excluded (e.g. ``-100``).
      label_smoothing: in ``[0, 1)``, as in :func:`~fusedloss.linear_cross_entropy`.
      z_loss: adds ``z_loss * lse**2`` per included token.
      logit_softcap: if set, logits become ``c * tanh(logits / c)``.
      reduction: ``"mean"`` (weighted mean over the included tokens, 0 if none) or
        ``"sum"`` (weighted sum; normalize it yourself, e.g. by a global token count).
      implementation: passed to :func:`~fusedloss.linear_cross_entropy`
        (``None``, ``"xla"``, ``"reference"``, ...).
      config: the implementation's tuning dataclass (e.g. ``fusedloss.XlaConfig``).

    Returns:
      ``loss_fn(params, batch, *args, **kwargs) -> (loss, aux)``: ``loss`` a float32
      scalar, ``aux`` a :class:`CausalLMAux` (``aux.perplexity``, ``aux.accuracy``,
      ``aux.num_tokens``, ``aux.metrics()``, ...).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import fusedloss
      >>> from fusedloss import objectives
      >>> V, D = 64, 16
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> params = {"embed": jax.random.normal(k1, (V, D)) * 0.1,
      ...           "w": jax.random.normal(k2, (D, D)) * 0.1}
      >>> def hidden(params, tokens):  # [B, T] -> [B, T, D]
      ...     return jnp.tanh(params["embed"][tokens] @ params["w"])
      >>> loss_fn = objectives.causal_lm_objective(  # a tied embedding as the head
      ...     hidden, head=lambda p: fusedloss.Transposed(p["embed"]), z_loss=1e-4)
      >>> batch = {"tokens": jnp.arange(16).reshape(2, 8) % V,
      ...          "mask": jnp.array([[1] * 8, [1] * 5 + [0] * 3])}  # right padding
      >>> grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
      >>> (loss, aux), grads = grad_fn(params, batch)
      >>> int(aux.num_tokens)  # 7 + 4 targets
      11
      >>> bool(jnp.allclose(aux.perplexity, V, rtol=0.01))  # ~uniform at init
      True
      >>> opt = optax.sgd(0.1, momentum=0.9)
      >>> updates, opt_state = opt.update(grads, opt.init(params), params)
      >>> params = optax.apply_updates(params, updates)
    """
    _check_objective(reduction, apply_fn)
    if not callable(head):
        raise TypeError(
            f"`head` must be a callable params -> [D, V] kernel (e.g. `lambda p: "
            f"fusedloss.Transposed(p['embed'])` for tied embeddings), got {head!r}."
        )
    if head_bias is not None and not callable(head_bias):
        raise TypeError(f"`head_bias` must be None or a callable params -> [V], got {head_bias!r}.")

    def loss_fn(params: Params, batch: Batch, *args: Any, **kwargs: Any):
        tokens = _batch_entry(batch, "tokens", "integer ids [..., T]")
        _checks.check_integer("batch['tokens']", tokens)
        if tokens.ndim < 1 or tokens.shape[-1] < 2:
            raise ValueError(
                f"`batch['tokens']` must have shape [..., T] with T >= 2, got {tokens.shape}."
            )
        mask, weights = _batch_mask_and_weights(batch, tokens.shape, "the shape of the tokens")
        hidden = _model_output(apply_fn(params, tokens, *args, **kwargs), tokens, "hidden states")
        # int32 targets: uint8/int16 ids must not meet ignore_index=-100 in their own dtype.
        total, lce = linear_cross_entropy(
            hidden,
            head(params),
            tokens.astype(jnp.int32),
            bias=None if head_bias is None else head_bias(params),
            where=mask,
            weights=weights,
            ignore_index=ignore_index,
            reduction="sum",
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            logit_softcap=logit_softcap,
            shift=1,
            return_aux=True,
            implementation=implementation,
            config=config,
        )

        # Statistics over the targets, all constants for the gradient, from the aux:
        # the nll is lse - label logit whatever the smoothing and z-loss.
        tw, lse = lce.token_weights, lce.lse
        aux = CausalLMAux(
            loss_sum=_sg(total),
            nll_sum=jnp.sum(tw * (lse - lce.label_logit)),
            correct_sum=jnp.sum(jnp.where(lce.correct, tw, 0.0)),
            lse_sum=jnp.sum(tw * lse),
            lse_sq_sum=jnp.sum(tw * lse * lse),
            num_tokens=lce.num_tokens,
            weight_sum=lce.weight_sum,
            reduction=reduction,
            implementation=lce.implementation,
        )
        loss = total if reduction == "sum" else _safe_div(total, _sg(lce.weight_sum))
        return loss, aux

    return loss_fn


def classification_objective(
    apply_fn: Callable[..., jax.Array],
    *,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy_with_integer_labels,
    reduction: ObjectiveReduction = "mean",
) -> Callable[..., tuple[jax.Array, ClassificationAux]]:
    """Objective for classifiers with integer labels: ``(loss, aux)`` from a batch.

    Returns ``loss_fn(params, batch, *args, **kwargs) -> (loss, aux)`` computing
    ``logits = apply_fn(params, batch["inputs"], *args, **kwargs)`` (``[..., C]``)
    and ``loss(logits, batch["labels"])`` per example, reduced over the examples
    with the batch's optional ``"mask"`` (bool or 0/1, ``[...]``, True = include)
    and ``"weights"`` (float ``[...]``). For a large number of classes behind a
    linear layer, prefer :func:`~fusedloss.linear_cross_entropy` directly (it never
    forms ``logits``).

    Args:
      apply_fn: ``apply_fn(params, inputs, *args, **kwargs)`` returning logits
        ``[..., C]``.
      loss: per-example loss ``loss(logits, labels) -> [...]`` with integer labels,
        e.g. ``fusedloss.softmax_cross_entropy_with_integer_labels`` (default),
        ``optax.losses.multiclass_hinge_loss``; bind hyperparameters with
        ``functools.partial``.
      reduction: ``"mean"`` (weighted mean over included examples, 0 if none) or
        ``"sum"``.

    Returns:
      ``loss_fn(params, batch, *args, **kwargs) -> (loss, aux)``: ``loss`` a float32
      scalar, ``aux`` a :class:`ClassificationAux`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fusedloss import objectives
      >>> def logits_fn(params, x):
      ...     return x @ params["w"] + params["b"][None, :]
      >>> params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
      >>> batch = {"inputs": jnp.array([[1.0, 0.0], [0.0, 1.0]]), "labels": jnp.array([0, 2])}
      >>> loss_fn = objectives.classification_objective(logits_fn)
      >>> loss, aux = jax.jit(loss_fn)(params, batch)
      >>> print(f"{loss:.4f} {float(jnp.log(3.0)):.4f}")
      1.0986 1.0986
      >>> int(aux.num_examples)
      2
    """
    _check_objective(reduction, apply_fn)

    def loss_fn(params: Params, batch: Batch, *args: Any, **kwargs: Any):
        inputs = _batch_entry(batch, "inputs", "the model input")
        labels = _batch_entry(batch, "labels", "integer class ids [...]")
        _checks.check_integer("batch['labels']", labels)
        mask, weights = _batch_mask_and_weights(batch, labels.shape, "the shape of the labels")
        logits = _model_output(apply_fn(params, inputs, *args, **kwargs), labels, "logits")
        per_example = loss(logits, labels)
        _checks.check_shape("loss(logits, labels)", per_example, labels.shape, "labels.shape")
        per_example = per_example.astype(_ce_math.acc_dtype(per_example.dtype))
        tw = _token_weights(labels.shape, mask, weights, labels, None)
        # jnp.where, not a product: an excluded example's loss is never read (NaN-safe).
        total = jnp.sum(jnp.where(tw != 0, per_example * tw.astype(per_example.dtype), 0.0))
        correct = jnp.argmax(logits, axis=-1) == labels.astype(jnp.int32)
        included = jnp.ones(labels.shape, bool) if mask is None else mask
        aux = ClassificationAux(
            loss_sum=_sg(total).astype(jnp.float32),
            correct_sum=jnp.sum(jnp.where(correct, tw, 0.0)),
            num_examples=jnp.sum(included, dtype=jnp.int32),
            weight_sum=jnp.sum(tw),
            reduction=reduction,
        )
        out = total if reduction == "sum" else _safe_div(total, aux.weight_sum.astype(total.dtype))
        return out, aux

    return loss_fn


def accumulate_gradients(
    loss_fn: Callable[..., tuple[jax.Array, Any]],
    params: Params,
    micro_batches: Any,
    *args: Any,
    **kwargs: Any,
) -> tuple[tuple[jax.Array, Any], Params]:
    """Gradient accumulation normalized by the global (weighted) token count.

    A drop-in for ``jax.value_and_grad(loss_fn, has_aux=True)(params, batch)`` that
    processes the batch as ``M`` micro-batches with :func:`jax.lax.scan` (peak
    memory of one micro-batch) and returns the loss and gradient of the *whole*
    batch: per-micro-batch sums divided once by the total ``aux.weight_sum``. This
    equals one step on the concatenated batch even when micro-batches hold
    different numbers of tokens (padding), unlike averaging per-micro-batch means
    (``optax.MultiSteps`` does the latter).

    Args:
      loss_fn: an objective of this module (``loss_fn(params, batch, *args,
        **kwargs) -> (loss, aux)``), or any function returning an aux with a
        float ``weight_sum`` scalar, a static ``reduction`` (``"sum"``, or ``"mean"``
        meaning ``loss = sum / weight_sum``) and only additive leaves.
        ``reduction="sum"`` objectives avoid a per-micro-batch rescaling.
      params: the parameters to differentiate with respect to.
      micro_batches: the batch pytree with a leading micro-batch axis ``[M, ...]``
        on every leaf (stack a list with ``jax.tree.map(lambda *b: jnp.stack(b),
        *batches)``).
      *args: passed on to ``loss_fn`` for every micro-batch (put per-micro-batch
        values such as dropout keys in the batch instead).
      **kwargs: passed on to ``loss_fn`` likewise.

    Returns:
      ``((loss, aux), grads)``: the weighted mean loss over all micro-batches
      (float32 scalar), the summed aux (its ``reduction`` set to ``"mean"``), and the
      gradients with the structure and dtypes of ``params`` (accumulated in float32).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> from fusedloss import objectives
      >>> params = {"embed": jax.random.normal(jax.random.key(0), (32, 8))}
      >>> tied = lambda p: fusedloss.Transposed(p["embed"])
      >>> loss_fn = objectives.causal_lm_objective(
      ...     lambda p, t: p["embed"][t], head=tied, reduction="sum")
      >>> tokens = jnp.arange(24).reshape(4, 6) % 32
      >>> mask = jnp.arange(6)[None, :] < jnp.array([[6], [2], [4], [6]])  # [4, 6] padding
      >>> batch = {"tokens": tokens, "mask": mask}
      >>> micro = jax.tree.map(lambda x: x.reshape(2, 2, 6), batch)  # 2 micro-batches of 2
      >>> accumulate = jax.jit(objectives.accumulate_gradients, static_argnums=0)
      >>> (loss, aux), grads = accumulate(loss_fn, params, micro)
      >>> full = objectives.causal_lm_objective(lambda p, t: p["embed"][t], head=tied)  # mean
      >>> (loss_ref, _), grads_ref = jax.jit(jax.value_and_grad(full, has_aux=True))(params, batch)
      >>> int(aux.num_tokens), bool(jnp.allclose(loss, loss_ref, rtol=1e-5))
      (14, True)
      >>> bool(jnp.allclose(grads["embed"], grads_ref["embed"], rtol=1e-5, atol=1e-7))
      True
    """
    leaves = jax.tree.leaves(micro_batches)
    if not leaves:
        raise ValueError("`micro_batches` must be a pytree of arrays with a leading [M] axis.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            "every leaf of `micro_batches` must have the same leading micro-batch axis "
            f"M >= 1, got leading sizes {sorted(map(str, sizes))}."
        )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(mb):
        (loss, aux), grads = grad_fn(params, mb, *args, **kwargs)
        reduction = getattr(aux, "reduction", None)
        if not hasattr(aux, "weight_sum") or reduction not in _OBJECTIVE_REDUCTIONS:
            raise TypeError(
                "`loss_fn` must return (loss, aux) with an aux that has a `weight_sum` "
                "and a `reduction` of 'sum' or 'mean' (as the objectives of "
                f"fusedloss.objectives do), got aux {type(aux).__name__}."
            )
        loss = loss.astype(_ce_math.acc_dtype(loss.dtype))
        grads = jax.tree.map(lambda g: g.astype(_ce_math.acc_dtype(g.dtype)), grads)
        if reduction == "mean":  # undo the per-micro-batch normalization
            ws = _sg(aux.weight_sum).astype(loss.dtype)
            loss = loss * ws
            grads = jax.tree.map(lambda g: g * ws.astype(g.dtype), grads)
        return loss, aux, grads

    first = jax.tree.map(lambda x: x[0], micro_batches)
    shapes = jax.eval_shape(step, first)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, mb):
        return jax.tree.map(jnp.add, carry, step(mb)), None

    (loss_sum, aux, grads), _ = jax.lax.scan(body, init, micro_batches)
    total = aux.weight_sum
    grads = jax.tree.map(
        lambda g, p: _safe_div(g, total.astype(g.dtype)).astype(jnp.result_type(p)),
        grads,
        params,
    )
    if dataclasses.is_dataclass(aux):
        aux = dataclasses.replace(aux, reduction="mean")
    loss = _safe_div(loss_sum, total.astype(loss_sum.dtype))
    return (loss, aux), grads
