"""Data- and vocabulary-parallel fused heads on a device mesh.

Entry points:

:func:`vocab_parallel_linear_cross_entropy`
    Called *inside* the user's ``jax.shard_map``: ``w`` is the device's ``[D, V/tp]``
    column shard (global ids ``k * V/tp ...`` on the ``k``-th device of the model axis),
    ``labels`` are global ids, and the tokens may be split over a data axis.

:func:`sharded_linear_cross_entropy` (and ``_log_probs``, ``_topk_distillation_loss``)
    Take global arrays (under ``jax.jit`` or eagerly), write the ``shard_map``
    for a ``data x model`` mesh and return the same values as
    :func:`~fusedloss.linear_cross_entropy`, :func:`~fusedloss.linear_log_probs`
    and :func:`~fusedloss.linear_topk_distillation_loss` on one device.

How the vocabulary is split: every device computes its tokens' statistics over its
own columns with the statistics core chosen for its chip (the Pallas kernels on GPU
and TPU meshes, the chunked ``xla`` core elsewhere; never a ``[tokens, V/tp]``
buffer), then the model axis combines them (:func:`_global_stats`)::

    lse            = m + log(psum(exp(lse_k - m))),  m = pmax(lse_k)  (a constant)
    label_logit    = psum(label_logit_k)    ([N] or [N, K]; 0 on shards without the id)
    sum_logits     = psum(sum_logits_k)     (label smoothing only)
    expected_logit = psum(exp(lse_k - lse) * expected_logit_k)   (entropy only)

and a head forms its outputs from them with the global vocabulary size. JAX's
autodiff through ``psum`` gives each shard its cotangents, so the gradients of
``x``, the ``w`` shard and the ``bias`` shard come out where they belong; nothing
vocabulary-sized is ever gathered. Per device, the temporaries are those of a
``[tokens/dp, D] @ [D, V/tp]`` problem.

A reduced loss is reduced over the whole mesh: ``"mean"`` divides the psum over the
data axis of the weighted per-token losses by the psum of the weights, so it is the
global weighted mean, not a mean of per-device means.

Adding a head: one ``shard_map`` writer, :func:`run_sharded`, serves every head. A
head is a :class:`ShardedHead`: the statistics it wants (``hp``), a per-device
``apply(tokens, stats, extras, ctx)`` from the prepared tokens and the student's
global statistics to its outputs, and the ``out_specs`` of those outputs. Arrays
other than ``x``, ``w``, ``labels``, ``bias``, ``where`` and ``weights`` are passed
to :func:`run_sharded` as ``extras={name: Extra(array, role, axis)}``: role
``"tokens"`` splits the first axis over the data axes (teacher ids, a teacher's
hidden states), role ``"columns"`` splits ``axis`` over the model axes, padded like
``w`` (a teacher's kernel or bias). ``ctx.stats`` gives the global statistics of
another ``(x, w)`` pair over the same split vocabulary, and ``ctx.rows`` shifts and
flattens a ``"tokens"`` extra like the labels (or like ``x``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedloss import _ce_math
from fusedloss.heads import _distill
from fusedloss.heads._ce_head import LinearCrossEntropyAux, finish
from fusedloss.heads._engine import (
    HeadOutput,
    Hyper,
    Problem,
    TokenStats,
    cdiv,
    cross_entropy_from_stats,
)
from fusedloss.heads._registry import candidates, check_config, choose_for, dispatch
from fusedloss.heads._targets import mesh_target
from fusedloss.heads._tokens import (
    HeadArgs,
    Tokens,
    check_head_args,
    check_label_values,
    check_options,
    check_shift,
    prepare_tokens,
    psum_over,
)
from fusedloss.heads.distillation import (
    check_distillation,
    check_topk,
    distillation_result,
    topk_loss_from_stats,
)
from fusedloss.heads.log_probs import check_log_probs, log_probs_from_stats
from fusedloss.heads.transposed import Transposed

AxisName = str | tuple[str, ...]


def _axes(name: AxisName | None) -> tuple[str, ...]:
    if name is None:
        return ()
    axes = (name,) if isinstance(name, str) else name
    if not isinstance(axes, tuple) or not all(isinstance(a, str) for a in axes) or not axes:
        raise TypeError(f"A mesh axis must be a name, a tuple of names or None, got {name!r}.")
    return axes


def _check_distinct(data_axis, model_axis) -> tuple[tuple[str, ...], tuple[str, ...]]:
    data, model = _axes(data_axis), _axes(model_axis)
    if set(data) & set(model):
        raise ValueError(
            f"`data_axis`={data_axis!r} and `model_axis`={model_axis!r} must name "
            "different mesh axes."
        )
    return data, model


# --------------------------------------------------------------------------------------
# inside shard_map
# --------------------------------------------------------------------------------------


def _bound_axis_size(name: str, axes: tuple[str, ...]) -> int:
    size = 1
    for a in axes:
        try:
            size *= jax.lax.axis_size(a)
        except NameError as e:
            raise ValueError(
                f"`{name}`={a!r} is not a mesh axis of the enclosing `jax.shard_map`; call "
                "this function inside shard_map (or use `sharded_linear_cross_entropy` with "
                "global arrays)."
            ) from e
    return size


def _varying(v) -> frozenset:
    """Mesh axes over which ``v`` varies inside ``shard_map`` (empty if unchecked)."""
    aval = jax.typeof(v)
    vma = getattr(aval, "vma", None)  # JAX < 0.10
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
    return frozenset(vma)


def _vary(v, axes: frozenset):
    """Marks ``v`` as varying over ``axes`` (free; transposes to a psum).

    The chunked core's loops need every operand to carry the same varying axes
    under ``check_vma=True``; without the check this is a no-op.
    """
    missing = tuple(sorted(axes - _varying(v)))
    return jax.lax.pcast(v, missing, to="varying") if missing else v


def _pmax(v, axes: tuple[str, ...]):
    for a in axes:
        v = jax.lax.pmax(v, a)
    return v


def _pmin(v, axes: tuple[str, ...]):
    for a in axes:
        v = jax.lax.pmin(v, a)
    return v


def _empty_stats(labels, dtype, hp: Hyper) -> TokenStats:
    # In the cores' accumulation dtype (float64 for float64 inputs), so that a shard
    # without columns or tokens meets the other shards' statistics without promotion.
    # ``labels`` is [N], or [N, K] ids (``hp.picked``): their logits are 0 here.
    acc = _ce_math.acc_dtype(dtype)
    rows = labels if labels.ndim == 1 else labels[:, 0]
    return TokenStats(
        lse=jnp.full_like(rows, -jnp.inf, dtype=acc),
        label_logit=jnp.zeros_like(labels, dtype=acc),
        sum_logits=jnp.zeros_like(rows, dtype=acc),
        max_logit=jnp.full_like(rows, -jnp.inf, dtype=acc),
        argmax=jnp.zeros_like(rows, dtype=jnp.int32),
        expected_logit=jnp.zeros_like(rows, dtype=acc) if hp.entropy else None,
    )


def _shard_stats(x, w, bias, labels, valid, offset, *, width, w_vd, hp, implementation, config):
    """Statistics over the first ``width`` columns of the shard (the rest is padding),
    with the statistics core chosen for the mesh's chip; (stats, its name)."""
    if width == 0:
        return _empty_stats(labels, x.dtype, hp), "none"
    v_local = w.shape[0] if w_vd else w.shape[1]
    if width < v_local:
        w = w[:width] if w_vd else w[:, :width]
        bias = None if bias is None else bias[:width]
    problem = Problem(max(x.shape[0], 1), x.shape[1], width, x.dtype, w_vd, True, hp)

    def run(choice):
        if x.shape[0] == 0:
            return _empty_stats(labels, x.dtype, hp)
        with jax.named_scope(f"fusedloss_{choice.name}"):
            return choice.backend.stats(x, w, bias, labels, valid, offset, hp, choice.plan)

    return dispatch(implementation, config, problem, run, x, w)


def _first(stats_fn, width, *operands):
    return stats_fn(*operands, width=width)[0]


def _global_stats(x, w, bias, labels, valid, *, w_vd, hp, impl, vocab_size, model, tp):
    """Per-token statistics over the whole (model-sharded) vocabulary; (stats, name)."""
    v_local = w.shape[0] if w_vd else w.shape[1]
    offset = jnp.int32(0)
    if tp > 1:
        offset = (jax.lax.axis_index(model) * v_local).astype(jnp.int32)
    operands = (x, w, bias, labels, valid, offset)
    axes = frozenset().union(*(_varying(a) for a in operands if a is not None))
    operands = tuple(None if a is None else _vary(a, axes) for a in operands)

    widths = [min(max(vocab_size - k * v_local, 0), v_local) for k in range(tp)]
    distinct = sorted(set(widths), reverse=True)
    stats_fn = functools.partial(_shard_stats, w_vd=w_vd, hp=hp, **impl)
    if len(distinct) == 1:
        local, name = stats_fn(*operands, width=distinct[0])
    else:
        # Only with a padded vocabulary: the shard holding the end of the vocabulary
        # (and any shard wholly past it) runs on its real columns only, so padded
        # columns take no part in the normalizer, the logit sum or the argmax.
        branch = jnp.asarray([distinct.index(c) for c in widths], jnp.int32)
        name = stats_fn(*operands, width=distinct[0])[1]
        local = jax.lax.switch(
            branch[jax.lax.axis_index(model)],
            [functools.partial(_first, stats_fn, c) for c in distinct],
            *operands,
        )
    if not model:
        return local, name

    # Global log-sum-exp: the shift m is a constant, the gradient flows through psum.
    m = _pmax(jax.lax.stop_gradient(local.lse), model)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    lse = _ce_math.lse_finalize(m, psum_over(jnp.exp(local.lse - m_safe), model))
    # The label's logit, or [N, K] ids' logits: each shard gives 0 for ids outside its
    # (real) columns, so the sum is the logit of the one shard holding the id.
    label_logit = psum_over(local.label_logit, model)
    sum_logits = psum_over(local.sum_logits, model) if hp.need_sum else local.sum_logits
    expected = None
    if hp.entropy:
        # E_p[s] = sum_k P(shard k) E_{p_k}[s], P(shard k) = exp(lse_k - lse): 0 on a
        # shard without columns (lse_k = -inf), whose expectation is then unused.
        share = jnp.exp(local.lse - lse)
        inner = jnp.where(jnp.isneginf(local.lse), 0.0, local.expected_logit)
        expected = psum_over(share * inner, model)
    # Argmax: the smallest global id reaching the global max (as jnp.argmax does).
    local_max = jax.lax.stop_gradient(local.max_logit)
    best = _pmax(local_max, model)
    cand = jnp.where(local_max == best, local.argmax, jnp.iinfo(jnp.int32).max)
    argmax = _pmin(cand, model)
    return TokenStats(lse, label_logit, sum_logits, best, argmax, expected), name


def _check_sharded_over(name: str, v, axes: tuple[str, ...], spec: str) -> None:
    """Under ``check_vma=True``, catches an operand that is replicated over ``axes``."""
    for a in axes:
        if jax.lax.axis_size(a) == 1:
            continue
        if a in _varying(jax.lax.axis_index(a)) and a not in _varying(v):
            raise ValueError(
                f"`{name}` must be sharded over mesh axis {a!r} (e.g. in_specs {spec}), "
                "but it is replicated over it."
            )


# --------------------------------------------------------------------------------------
# heads on the sharded engine
# --------------------------------------------------------------------------------------


class Extra(NamedTuple):
    """An array a sharded head needs besides ``x``, ``w``, ``labels``, ``bias``,
    ``where`` and ``weights``, with the role that says how it is split.

    Attributes:
      array: the global array (checked by the caller).
      role: ``"tokens"``: laid out like the tokens, ``array.shape[:labels.ndim] ==
        labels.shape`` (e.g. teacher ids ``[..., K]`` or a teacher's hidden states
        ``[..., Dt]``); its first axis is split over the data axes, like ``x``.
        ``"columns"``: indexed by vocabulary id along ``axis`` (size ``V``; e.g. a
        teacher's ``[Dt, V]`` kernel with ``axis=1``, its ``[V, Dt]`` embedding or
        ``[V]`` bias with ``axis=0``); that axis is split over the model axes, like
        the columns of ``w``, and zero-padded like ``w`` when the model axis does not
        divide ``V``.
      axis: the vocabulary axis of a ``"columns"`` array (ignored for ``"tokens"``).
    """

    array: jax.Array
    role: Literal["tokens", "columns"]
    axis: int = 0


class ShardContext(NamedTuple):
    """What a head's per-device function knows about the sharded call."""

    data: tuple[str, ...]  # the mesh axes the tokens are split over (reduce over them)
    model: tuple[str, ...]  # the mesh axes the vocabulary is split over
    vocab_size: int  # the global V (without padding)
    shift: int
    implementation: str  # the statistics core that ran on this device
    # stats(x, w, bias, labels, valid, hp, w_vd=False) -> (TokenStats, core name): the
    # statistics of another head over the same model-sharded vocabulary (a teacher's
    # [N, Dt] rows against its "columns" kernel shard), combined like the student's.
    stats: Callable[..., tuple[TokenStats, str]]
    args: HeadArgs | None = None  # the device's checked student arrays (w: its shard)

    def rows(self, a: jax.Array, *, trailing: int = 0, predictor: bool = False) -> jax.Array:
        """A local ``"tokens"`` array, shifted and flattened to ``[N, *trailing dims]``:
        like the labels (``a[..., shift:, ...]``), or like ``x`` when ``predictor``
        (``a[..., :-shift, ...]``, e.g. a teacher's hidden states with ``trailing=1``)."""
        t = a.ndim - 1 - trailing
        if self.shift:
            cut = slice(None, -self.shift) if predictor else slice(self.shift, None)
            a = a[(slice(None),) * t + (cut,)]
        return a.reshape((-1, *a.shape[t + 1 :]))


class ShardedHead(NamedTuple):
    """A fused head's part of a sharded call: what :func:`run_sharded` (and the
    in-shard entry) run on every device after the student's global statistics.

    Attributes:
      hp: the statistics wanted of the student's row (temperature, entropy, K ids),
        or None for a head that computes its own from ``ctx.args`` (``stats`` None).
      apply: ``apply(tokens, stats, extras, ctx) -> outputs`` on one device:
        ``tokens`` the prepared local :class:`~._tokens.Tokens`, ``stats`` the
        student's :class:`~._engine.TokenStats` over the whole vocabulary, ``extras``
        the local shards of the :class:`Extra` arrays by name, ``ctx`` a
        :class:`ShardContext`. Reduced outputs are summed over ``ctx.data`` here.
      out_specs: ``out_specs(token_spec, implementation) -> PartitionSpec pytree`` of
        ``apply``'s outputs; ``token_spec`` splits per-token outputs like the tokens.
      reduction: the reduction whose per-token coefficients ``tokens.coef`` holds.
      ignore_index: labels equal to it are excluded from ``tokens.valid``.
      stat_labels: ``stat_labels(tokens, extras, ctx) -> [N] or [N, K] int32`` ids
        whose logits ``stats.label_logit`` holds; default ``tokens.labels``.
    """

    hp: Hyper | None
    apply: Callable[[Tokens, TokenStats | None, Mapping[str, jax.Array], ShardContext], Any]
    out_specs: Callable[[P, str], Any]
    reduction: str = "none"
    ignore_index: int | None = None
    stat_labels: Callable[[Tokens, Mapping[str, jax.Array], ShardContext], jax.Array] | None = None


def cross_entropy_head(
    hp: Hyper, *, reduction: str, ignore_index: int | None, return_aux: bool
) -> ShardedHead:
    """``linear_cross_entropy`` (and its aux outputs) as a :class:`ShardedHead`."""
    per_token = reduction == "none"

    def apply(tokens, stats, extras, ctx):
        out: HeadOutput = cross_entropy_from_stats(
            stats, tokens.labels, tokens.valid, tokens.coef, hp, ctx.vocab_size, per_token
        )
        return finish(
            out,
            tokens,
            ctx.implementation,
            per_token=per_token,
            dtype=tokens.x.dtype,
            return_aux=return_aux,
            data_axes=ctx.data,
        )

    def out_specs(tok: P, implementation: str):
        loss_spec = tok if per_token else P()
        if not return_aux:
            return loss_spec
        aux = LinearCrossEntropyAux(
            lse=tok,
            correct=tok,
            num_tokens=P(),
            weight_sum=P(),
            label_logit=tok,
            predicted=tok,
            token_weights=tok,
            implementation=implementation,
        )
        return loss_spec, aux

    return ShardedHead(hp, apply, out_specs, reduction, ignore_index)


def log_probs_head(hp: Hyper, *, return_entropy: bool) -> ShardedHead:
    """``linear_log_probs`` as a :class:`ShardedHead` (per-token outputs only)."""

    def apply(tokens, stats, extras, ctx):
        return log_probs_from_stats(stats, tokens, ctx.vocab_size, return_entropy)

    return ShardedHead(hp, apply, lambda tok, _: (tok, tok) if return_entropy else tok)


def topk_distillation_head(hp: Hyper, *, reduction: str, mode: str = "k_plus_one") -> ShardedHead:
    """``linear_topk_distillation_loss`` as a :class:`ShardedHead`; its extras are the
    ``"tokens"`` arrays ``teacher_ids`` and ``teacher_log_probs`` (``[..., K]``)."""

    def ids(tokens, extras, ctx):
        return ctx.rows(extras["teacher_ids"], trailing=1).astype(jnp.int32)

    def apply(tokens, stats, extras, ctx):
        tlp = ctx.rows(extras["teacher_log_probs"], trailing=1).astype(tokens.coef.dtype)
        ids_ = ids(tokens, extras, ctx)
        tlp = jax.lax.stop_gradient(tlp)
        loss = topk_loss_from_stats(stats, tokens, ids_, tlp, ctx.vocab_size, mode)
        if reduction == "none":
            return loss.reshape(tokens.shape).astype(tokens.x.dtype)
        return psum_over(jnp.sum(loss), ctx.data)

    out_specs = lambda tok, _: tok if reduction == "none" else P()
    return ShardedHead(hp, apply, out_specs, reduction, None, ids)


def distillation_head(
    dh: _distill.Distill, a: float, *, reduction: str, ignore_index, implementation, config
) -> ShardedHead:
    """``linear_distillation_loss`` as a :class:`ShardedHead`: it computes both heads'
    statistics itself (``hp=None``) from the extras ``teacher_x`` (``"tokens"``),
    ``teacher_w`` and ``teacher_bias`` (``"columns"``), exchanging per-token scalars."""
    per_token = reduction == "none"

    def apply(tokens, _, extras, ctx):
        args = ctx.args
        student = _distill.Head(tokens.x, args.w, args.bias)
        teacher = _distill.Head(
            ctx.rows(extras["teacher_x"], trailing=1, predictor=True),
            extras["teacher_w"],
            extras.get("teacher_bias"),
        )
        needs_stats = per_token or bool(ctx.model)
        choice = _distill.plan_for(implementation, config, student, dh, needs_stats=needs_stats)
        if choice[1] is None:  # the materialized reference cannot split the vocabulary
            choice = _distill.plan_for("xla", None, student, dh, needs_stats=True)
        offset = jax.lax.axis_index(ctx.model) * args.vocab_size if ctx.model else 0
        div, ce, total = _distill.distillation_losses(
            student, teacher, tokens.labels, tokens.valid,
            ((1 - a) * tokens.coef, a * tokens.coef), dh._replace(vocab_size=ctx.vocab_size),
            choice, offset=offset, axes=ctx.model,
        )  # fmt: skip
        loss = distillation_result(div, ce, total, tokens, a, ctx.vocab_size, dh.hard, per_token)[0]
        return loss.astype(tokens.x.dtype) if per_token else psum_over(loss, ctx.data)

    out_specs = lambda tok, _: tok if per_token else P()
    return ShardedHead(None, apply, out_specs, reduction, ignore_index)


def _shard_body(
    args: HeadArgs,
    head: ShardedHead,
    *,
    data: tuple[str, ...],
    model: tuple[str, ...],
    vocab_size: int | None,
    shift: int,
    implementation,
    config,
    extras: Mapping[str, jax.Array] | None = None,
):
    """One device's part of a sharded call (inside ``shard_map``): the tokens, the
    student's statistics over the whole vocabulary, then ``head.apply``."""
    tp = _bound_axis_size("model_axis", model)
    _bound_axis_size("data_axis", data)
    v_local = args.vocab_size
    if vocab_size is None:
        vocab_size = tp * v_local
    if not isinstance(vocab_size, int | np.integer) or not 0 < vocab_size <= tp * v_local:
        raise ValueError(
            f"`vocab_size` must be an int in [1, {tp * v_local}] for {tp} shard(s) of "
            f"{v_local} columns, got {vocab_size!r}."
        )
    vocab_size = int(vocab_size)
    _check_sharded_over("w", args.w, model, f"P(None, {model!r})")
    _check_sharded_over("labels", args.labels, data, f"P({data!r})")
    tokens = prepare_tokens(
        args.x,
        args.labels,
        args.where,
        args.weights,
        shift=shift,
        ignore_index=head.ignore_index,
        reduction=head.reduction,
        vocab_size=vocab_size,
        data_axes=data,
        check_labels=False,
    )
    extras = dict(extras or {})
    impl = dict(implementation=implementation, config=config)

    def stats(x, w, bias, labels, valid, hp: Hyper, w_vd: bool = False):
        return _global_stats(
            x, w, bias, labels, valid, w_vd=w_vd, hp=hp, impl=impl,
            vocab_size=vocab_size, model=model, tp=tp,
        )  # fmt: skip

    ctx = ShardContext(data, model, vocab_size, shift, "", stats, args)
    with jax.named_scope("fusedloss_sharded"):
        if head.hp is None:
            return head.apply(tokens, None, extras, ctx._replace(implementation="xla"))
        labels = tokens.labels
        if head.stat_labels is not None:
            labels = head.stat_labels(tokens, extras, ctx)
        student, name = stats(tokens.x, args.w, args.bias, labels, tokens.valid, head.hp, args.w_vd)
        return head.apply(tokens, student, extras, ctx._replace(implementation=name))


def vocab_parallel_linear_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike | Transposed,
    labels: jax.typing.ArrayLike,
    *,
    model_axis: AxisName | None = "model",
    data_axis: AxisName | None = None,
    vocab_size: int | None = None,
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
    implementation: str | tuple[str, ...] | None = None,
    config: Any = None,
) -> jax.Array | tuple[jax.Array, LinearCrossEntropyAux]:
    r"""``linear_cross_entropy`` on one device's shards, inside ``jax.shard_map``.

    The vocabulary is split over ``model_axis``: device ``k`` of that axis holds
    columns ``[k * Vs, (k + 1) * Vs)`` of the global ``[D, V]`` kernel as its ``w``
    (``in_specs=P(None, model_axis)``). Tokens may be split over ``data_axis``
    (``in_specs=P(data_axis)`` for ``x``, ``labels``, ``where`` and ``weights``).
    Each device computes its tokens' statistics over its own columns with the core
    chosen for its chip and combines them across ``model_axis`` with ``psum``/``pmax`` of
    per-token scalars, so nothing ``[tokens, V]``-sized is formed or gathered.

    The result equals :func:`~fusedloss.linear_cross_entropy` on the global arrays,
    and its gradients w.r.t. ``x``, ``w`` and ``bias`` are the local shards of the
    global gradients, whether ``jax.grad`` is taken inside the ``shard_map`` (needs
    the default ``check_vma=True``) or outside it.

    Args:
      x: this device's hidden states ``[..., D]`` (float32 / bfloat16 / float16),
        replicated over ``model_axis``.
      w: this device's kernel shard ``[D, Vs]`` with ``x``'s dtype, or a
        :class:`~fusedloss.Transposed` of its ``[Vs, D]`` embedding rows.
      labels: integer *global* target ids with shape ``x.shape[:-1]``.
      model_axis: mesh axis name(s) the vocabulary is split over, or None (the
        whole vocabulary is local).
      data_axis: mesh axis name(s) the tokens are split over, or None. With it,
        ``"sum"``/``"mean"`` and the aux counts are global over the data axis;
        without it they cover this device's tokens only.
      vocab_size: the global number of classes ``V``; default ``Vs`` times the size
        of ``model_axis``. A smaller value marks the columns with ids ``>= V`` as
        padding: they take no part in the loss (how a vocabulary that does not
        divide evenly, or one padded for speed, is sharded).
      bias: optional ``[Vs]`` bias shard (``in_specs=P(model_axis)``).
      where: optional bool mask with the shape of ``labels``; True = include.
      weights: optional float per-token weights with the shape of ``labels``.
      ignore_index: tokens whose label equals it are excluded (e.g. ``-100``).
      reduction: ``"none"`` (this device's per-token losses), ``"sum"`` or
        ``"mean"`` (weighted mean over the included tokens of all ``data_axis``
        shards), replicated on every device.
      label_smoothing: in ``[0, 1)``; mixes ``label_smoothing / V`` into every
        class of the global vocabulary.
      z_loss: adds ``z_loss * lse**2`` per included token (global ``lse``).
      logit_softcap: if set, logits become ``c * tanh(logits / c)``.
      shift: ``x[..., :-shift, :]`` predicts ``labels[..., shift:]``, applied to
        this device's arrays (so the shifted axis must not be split).
      return_aux: also return a :class:`~fusedloss.LinearCrossEntropyAux`: ``lse``
        and ``correct`` for this device's tokens, ``num_tokens`` and ``weight_sum``
        summed over ``data_axis``.
      implementation: as in :func:`~fusedloss.linear_cross_entropy`, for the
        per-device statistics core (``None``: the best for the mesh's chip).
      config: the per-device core's config (e.g. an :class:`~fusedloss.XlaConfig`,
        strategy ``"auto"`` or ``"recompute"``; chunk sizes refer to the local shard).

    Returns:
      The loss (``labels``' local shape for ``"none"``, else a scalar), and the aux
      outputs if ``return_aux``. An included token whose label lies outside
      ``[0, V)`` makes the loss NaN.

    Examples:
      On a mesh of one device (the same code runs on any ``data x model`` mesh):

      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import fusedloss
      >>> from fusedloss.heads.sharded import (
      ...     vocab_parallel_linear_cross_entropy)
      >>> kx, kw, kl = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(kx, (8, 16))  # [tokens, D]
      >>> w = jax.random.normal(kw, (16, 1000)) / 4  # [D, V]
      >>> labels = jax.random.randint(kl, (8,), 0, 1000)
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> specs = (P("data"), P(None, "model"), P("data"))
      >>> def loss_fn(x, w, labels):
      ...     return vocab_parallel_linear_cross_entropy(
      ...         x, w, labels, model_axis="model", data_axis="data")
      >>> sharded_loss = jax.jit(jax.shard_map(
      ...     loss_fn, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))
      >>> placed = [jax.device_put(a, NamedSharding(mesh, s))
      ...           for a, s in zip((x, w, labels), specs)]
      >>> loss = sharded_loss(*placed)
      >>> bool(jnp.allclose(loss, fusedloss.linear_cross_entropy(x, w, labels), rtol=1e-5))
      True
    """
    args = check_head_args(
        x, w, labels, bias, where, weights, "[Vs], Vs = w.shape[1], this device's shard"
    )
    hp = check_options(reduction, label_smoothing, z_loss, logit_softcap, ignore_index, shift)
    check_shift(args.x, shift)
    data, model = _check_distinct(data_axis, model_axis)
    head = cross_entropy_head(
        hp, reduction=reduction, ignore_index=ignore_index, return_aux=return_aux
    )
    return _shard_body(
        args,
        head,
        data=data,
        model=model,
        vocab_size=vocab_size,
        shift=shift,
        implementation=implementation,
        config=config,
    )


def _mesh_or_context(mesh):
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                "`mesh` is None and no mesh is set: pass `mesh=` (e.g. "
                "`jax.make_mesh((2, 4), ('data', 'model'))`) or enter `jax.set_mesh(mesh)`."
            )
    return mesh


def _axes_size(mesh, name: str, axes: tuple[str, ...]) -> int:
    size = 1
    for a in axes:
        if a not in mesh.axis_names:
            raise ValueError(
                f"`{name}`={a!r} is not an axis of the mesh, whose axes are {mesh.axis_names}."
            )
        size *= mesh.shape[a]
    return size


def _spec_axis(axes: tuple[str, ...]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def explicit_split(args: HeadArgs):
    """(mesh, data axes, model axes) when ``x``'s batch axis or ``w``'s vocabulary
    axis is split over ``Explicit`` mesh axes (``jax.set_mesh``), else None."""

    def axes_of(a):
        sharding = getattr(jax.typeof(a), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty:
            return None, [() for _ in range(a.ndim)]
        explicit = {
            n
            for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
            if t == AxisType.Explicit
        }
        dims = []
        for entry in tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec)):
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            dims.append(tuple(n for n in names if n in explicit))
        return mesh, dims

    mesh_x, dims_x = axes_of(args.x)
    mesh_w, dims_w = axes_of(args.w)
    data = dims_x[0] if args.x.ndim > 1 else ()
    model = dims_w[0 if args.w_vd else 1]
    if not data and not model:
        return None
    return (mesh_x if data else mesh_w), data, model


def _per_shard_name(
    args: HeadArgs, hp: Hyper, mesh, dp: int, tp: int, implementation, config
) -> str:
    """The statistics core each device runs (static, for the aux outputs)."""
    names, explicit = candidates(implementation)
    check_config(config, names)
    n_local = max(1, int(np.prod(args.x.shape[:-1])) // dp)
    v_local = cdiv(args.vocab_size, tp)
    problem = Problem(n_local, args.x.shape[-1], v_local, args.x.dtype, args.w_vd, True, hp)
    return choose_for(names, explicit, config, problem, mesh_target(mesh)).name


def _check_extras(extras: Mapping[str, Extra], labels, vocab_size: int) -> None:
    for name, e in extras.items():
        if name in _RESERVED:
            raise ValueError(f"An extra array must not be named {name!r}.")
        a = e.array
        if e.role == "tokens":
            if a.shape[: labels.ndim] != labels.shape:
                raise ValueError(
                    f"`{name}` must have shape labels.shape + (...) = {labels.shape} + (...), "
                    f"got {a.shape}."
                )
        elif e.role == "columns":
            if not -a.ndim <= e.axis < a.ndim or a.shape[e.axis] != vocab_size:
                raise ValueError(
                    f"`{name}` must have V = {vocab_size} entries along axis {e.axis}, "
                    f"got shape {a.shape}."
                )
        else:
            raise ValueError(f"The role of `{name}` must be 'tokens' or 'columns', got {e.role!r}.")


_RESERVED = frozenset({"x", "w", "labels", "bias", "where", "weights"})


def run_sharded(
    args: HeadArgs,
    head: ShardedHead,
    mesh,
    data: tuple[str, ...],
    model: tuple[str, ...],
    *,
    shift: int,
    implementation,
    config,
    extras: Mapping[str, Extra] | None = None,
):
    """Writes the ``shard_map`` of a sharded call over global (checked) arrays.

    ``x``, ``labels``, ``where``, ``weights`` and the ``"tokens"`` extras are split
    over the ``data`` axes (their first axis), the columns of ``w``, ``bias`` and the
    ``"columns"`` extras over the ``model`` axes (padded to a multiple of the model
    axis size if needed); every device runs ``head`` (:func:`_shard_body`) on its
    shards, and ``head.out_specs`` says how its outputs are laid out.
    """
    x, labels = args.x, args.labels
    extras = dict(extras or {})
    dp = _axes_size(mesh, "data_axis", data)
    tp = _axes_size(mesh, "model_axis", model)
    if x.ndim < 2 and dp > 1:
        raise ValueError(
            f"`x` of shape {x.shape} has no token axis to split over `data_axis`={data!r}; "
            "pass data_axis=None."
        )
    if dp > 1 and x.shape[0] % dp:
        raise ValueError(
            f"The first axis of `x` ({x.shape[0]}) must be divisible by the size of "
            f"`data_axis`={data!r} ({dp}); pad it (excluding the padding with `where`) "
            "or choose another mesh."
        )
    if shift and dp > 1 and x.ndim < 3:
        raise ValueError(
            f"`shift`={shift} with `data_axis`={data!r} of size {dp} needs `x` of shape "
            f"[B, T, D] (the batch axis is split, the shifted one is not), got {x.shape}."
        )
    v = args.vocab_size
    _check_extras(extras, labels, v)
    # The per-device core's choice (and the config's fit) is settled before tracing it.
    impl_name = "xla"
    if head.hp is not None:
        impl_name = _per_shard_name(args, head.hp, mesh, dp, tp, implementation, config)
    labels_s = labels[..., shift:]
    valid = jnp.ones(labels_s.shape, bool) if args.where is None else args.where[..., shift:]
    check_label_values(labels_s, valid, v, head.ignore_index)
    v_pad = cdiv(v, tp) * tp

    def pad_columns(a, axis: int):
        if a is None or v_pad == v:
            return a
        return jnp.pad(a, [(0, v_pad - v) if d == axis % a.ndim else (0, 0) for d in range(a.ndim)])

    # Tied embeddings travel as the [V, D] embedding, split by rows: no copy of w.
    vocab_axis = 0 if args.w_vd else 1
    w, bias = pad_columns(args.w, vocab_axis), pad_columns(args.bias, 0)

    # The shard_map is manual over the data and model axes. A replicated input's
    # gradient is summed over the manual axes its spec leaves out, so the size-1 axes
    # are named in every spec (a sum over them would be a trivial all-reduce holding a
    # second w-sized gradient buffer). Leaving them automatic instead would make the
    # shard_map partly manual, where XLA:CPU aborts compiling the bf16 sum of a
    # replicated input's gradient. On a 1x1 mesh the per-device code thus sees the
    # same unsharded types as on a multi-device mesh.
    split_data = tuple(a for a in data if mesh.shape[a] > 1)
    split_model = tuple(a for a in model if mesh.shape[a] > 1)
    if not np.prod((*labels.shape[:-1], labels.shape[-1] - shift) if shift else labels.shape):
        # No tokens at all (x of shape [B, 0, D], or nothing left after the shift):
        # the loss is 0 (or empty) and nothing needs splitting. It runs unsplit: a
        # zero-sized output of the shard_map would come back with shards sized like
        # the whole array.
        data = model = split_data = split_model = ()
    idle = tuple(a for a in data + model if mesh.shape[a] == 1)
    tok, col = _spec_axis(split_data + idle), _spec_axis(split_model + idle)

    def columns_spec(ndim: int, axis: int):
        return P(*(col if d == axis % ndim else None for d in range(ndim)))

    arrays = {"x": x, "w": w, "labels": labels}
    specs = {"x": P(tok), "w": columns_spec(2, vocab_axis), "labels": P(tok)}
    for name, value, spec in (
        ("bias", bias, P(col)),
        ("where", args.where, P(tok)),
        ("weights", args.weights, P(tok)),
    ):
        if value is not None:
            arrays[name], specs[name] = value, spec
    for name, e in extras.items():
        if e.role == "tokens":
            arrays[name], specs[name] = e.array, P(tok)
        else:
            arrays[name] = pad_columns(e.array, e.axis)
            specs[name] = columns_spec(e.array.ndim, e.axis)
    if (data or model) and any(t == AxisType.Explicit for t in mesh.axis_types):
        arrays = {
            k: jax.sharding.reshard(a, NamedSharding(mesh, specs[k])) for k, a in arrays.items()
        }

    def body(a: dict[str, Any]):
        local = HeadArgs(
            a["x"], a["w"], args.w_vd, a["labels"], a.get("bias"), a.get("where"), a.get("weights")
        )
        return _shard_body(
            local,
            head,
            data=split_data,
            model=split_model,
            vocab_size=v,
            shift=shift,
            implementation=implementation,
            config=config,
            extras={name: a[name] for name in extras},
        )

    if not data and not model:
        return body(arrays)
    # check_vma=False: this shard_map is only ever differentiated from outside, where
    # JAX's transpose rules sum the cotangents of replicated inputs without needing
    # replication types.
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(specs,),
        out_specs=head.out_specs(P(tok), impl_name),
        axis_names=frozenset(split_data + split_model + idle),
        check_vma=False,
    )
    return fn(arrays)


def _on_mesh(args, head, mesh, data_axis, model_axis, shift, implementation, config, extras=None):
    """A public sharded call after its argument checks: the mesh axes' checks, then
    :func:`run_sharded` over ``mesh`` (or the mesh set with ``jax.set_mesh``)."""
    data, model = _check_distinct(data_axis, model_axis)
    return run_sharded(
        args, head, _mesh_or_context(mesh), data, model, shift=shift,
        implementation=implementation, config=config, extras=extras,
    )  # fmt: skip


def sharded_linear_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike | Transposed,
    labels: jax.typing.ArrayLike,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    data_axis: AxisName | None = "data",
    model_axis: AxisName | None = "model",
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
    implementation: str | tuple[str, ...] | None = None,
    config: Any = None,
) -> jax.Array | tuple[jax.Array, LinearCrossEntropyAux]:
    r"""``linear_cross_entropy`` of global arrays, data- and vocabulary-parallel.

    Writes the ``jax.shard_map`` over ``mesh`` for you: the first axis of ``x``,
    ``labels``, ``where`` and ``weights`` (the batch, or the tokens of a flat
    ``[N, D]`` input) is split over ``data_axis``; the columns of ``w`` and
    ``bias`` over ``model_axis``; ``x`` is replicated over ``model_axis``. Every
    device runs :func:`vocab_parallel_linear_cross_entropy` on its shards. Inputs
    already laid out that way (``NamedSharding(mesh, P(data_axis))`` and
    ``NamedSharding(mesh, P(None, model_axis))``) are used in place; on a mesh with
    ``Explicit`` axes other layouts are resharded first.

    Values and gradients equal :func:`~fusedloss.linear_cross_entropy` on one
    device. The gradients are formed where the shards live: that of ``w`` per
    vocabulary shard (all-reduced over the data axis), that of ``x`` per token shard
    (all-reduced over the model axis); nothing is gathered.

    A vocabulary size ``V`` that the model axis does not divide is padded with
    zero columns to the next multiple (a padded copy of ``w``, only in that case);
    the padded columns are excluded from the loss, and their gradient is dropped.
    The first axis of ``x`` must be divisible by the data axis size.

    Args:
      x: hidden states ``[B, ..., D]`` (float32 / bfloat16 / float16).
      w: classifier kernel ``[D, V]`` with ``x``'s dtype, or
        :class:`~fusedloss.Transposed` ``(embedding)`` (split by rows, no copy).
      labels: integer target ids with shape ``x.shape[:-1]``.
      mesh: a ``jax.sharding.Mesh`` (or abstract mesh); default: the mesh set with
        ``jax.set_mesh``.
      data_axis: mesh axis name(s) the first axis of the tokens is split over, or
        None (tokens replicated).
      model_axis: mesh axis name(s) the vocabulary is split over, or None
        (``w`` replicated).
      bias: as in :func:`~fusedloss.linear_cross_entropy`.
      where: as in :func:`~fusedloss.linear_cross_entropy`.
      weights: as in :func:`~fusedloss.linear_cross_entropy`.
      ignore_index: as in :func:`~fusedloss.linear_cross_entropy`.
      reduction: as in :func:`~fusedloss.linear_cross_entropy`.
      label_smoothing: as in :func:`~fusedloss.linear_cross_entropy`.
      z_loss: as in :func:`~fusedloss.linear_cross_entropy`.
      logit_softcap: as in :func:`~fusedloss.linear_cross_entropy`.
      return_aux: as in :func:`~fusedloss.linear_cross_entropy`.
      shift: as in :func:`~fusedloss.linear_cross_entropy`; with a data axis of
        size > 1 it needs ``x`` of shape ``[B, T, D]`` (the shifted axis ``T`` is
        not the split one).
      implementation: the per-device statistics core, as in
        :func:`vocab_parallel_linear_cross_entropy`.
      config: that core's config, as in :func:`vocab_parallel_linear_cross_entropy`.

    Returns:
      The loss (``labels``' shape for ``"none"``, split over ``data_axis``, else a
      scalar) and, if ``return_aux``, a :class:`~fusedloss.LinearCrossEntropyAux`
      over all tokens.

    Examples:
      On a mesh of one device (with 8 devices, e.g. ``jax.make_mesh((2, 4), ...)``,
      the same call splits the batch in 2 and the vocabulary in 4):

      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> from fusedloss.heads.sharded import sharded_linear_cross_entropy
      >>> kx, kw, kl = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(kx, (4, 8, 16))  # [batch, seq, D]
      >>> w = jax.random.normal(kw, (16, 1000)) / 4  # [D, V]
      >>> labels = jax.random.randint(kl, (4, 8), 0, 1000)
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> loss_fn = jax.jit(lambda x, w, labels: sharded_linear_cross_entropy(
      ...     x, w, labels, mesh=mesh, shift=1))
      >>> loss, (dx, dw) = jax.value_and_grad(loss_fn, (0, 1))(x, w, labels)
      >>> ref = fusedloss.linear_cross_entropy(x, w, labels, shift=1)
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5)), dw.shape
      (True, (16, 1000))
    """
    args = check_head_args(x, w, labels, bias, where, weights, "[V], V = w.shape[1]")
    hp = check_options(reduction, label_smoothing, z_loss, logit_softcap, ignore_index, shift)
    check_shift(args.x, shift)
    head = cross_entropy_head(
        hp, reduction=reduction, ignore_index=ignore_index, return_aux=return_aux
    )
    return _on_mesh(args, head, mesh, data_axis, model_axis, shift, implementation, config)


def sharded_linear_log_probs(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike | Transposed,
    labels: jax.typing.ArrayLike,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    data_axis: AxisName | None = "data",
    model_axis: AxisName | None = "model",
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    shift: int = 0,
    return_entropy: bool = False,
    implementation: str | tuple[str, ...] | None = None,
    config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""``linear_log_probs`` of global arrays, data- and vocabulary-parallel.

    The ``jax.shard_map`` over ``mesh`` is written as in
    :func:`sharded_linear_cross_entropy`: the first axis of ``x``, ``labels`` and
    ``where`` is split over ``data_axis``, the columns of ``w`` and ``bias`` over
    ``model_axis``. Per token, the model axis exchanges scalars only: the shards'
    log-sum-exps, the label's logit and, for the entropy, each shard's expected logit
    (``E[s] = sum_k exp(lse_k - lse) E_k[s]``).

    Values and gradients (w.r.t. ``x``, ``w``, ``bias``, for any cotangents of both
    outputs) equal :func:`~fusedloss.linear_log_probs` on one device.

    Args:
      x: as in :func:`~fusedloss.linear_log_probs`.
      w: as in :func:`~fusedloss.linear_log_probs`.
      labels: as in :func:`~fusedloss.linear_log_probs`.
      bias: as in :func:`~fusedloss.linear_log_probs`.
      where: as in :func:`~fusedloss.linear_log_probs`.
      temperature: as in :func:`~fusedloss.linear_log_probs`.
      logit_softcap: as in :func:`~fusedloss.linear_log_probs`.
      return_entropy: as in :func:`~fusedloss.linear_log_probs`.
      mesh: as in :func:`sharded_linear_cross_entropy`.
      data_axis: as in :func:`sharded_linear_cross_entropy`.
      model_axis: as in :func:`sharded_linear_cross_entropy`.
      shift: as in :func:`~fusedloss.linear_log_probs`; with a data axis of size > 1
        it needs ``x`` of shape ``[B, T, D]``.
      implementation: the per-device statistics core.
      config: that core's config (e.g. an :class:`~fusedloss.XlaConfig`).

    Returns:
      float32 log-probabilities with the (shifted) shape of ``labels``, split over
      ``data_axis``, and the entropies if ``return_entropy``.

    Examples:
      On a mesh of one device (with 8 devices, ``jax.make_mesh((2, 4), ...)`` splits
      the batch in 2 and the vocabulary in 4):

      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> kx, kw, kl = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(kx, (4, 8, 16))  # [batch, seq, D]
      >>> w = jax.random.normal(kw, (16, 1000)) / 4  # [D, V]
      >>> tokens = jax.random.randint(kl, (4, 8), 0, 1000)
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> logp, ent = jax.jit(lambda x, w, t: fusedloss.sharded_linear_log_probs(
      ...     x, w, t, mesh=mesh, temperature=0.7, return_entropy=True))(x, w, tokens)
      >>> ref = fusedloss.linear_log_probs(x, w, tokens, temperature=0.7)
      >>> bool(jnp.allclose(logp, ref, atol=1e-5)), ent.shape
      (True, (4, 8))
    """
    args, hp = check_log_probs(
        x, w, labels, bias, where, temperature, logit_softcap, shift, return_entropy
    )
    head = log_probs_head(hp, return_entropy=return_entropy)
    return _on_mesh(args, head, mesh, data_axis, model_axis, shift, implementation, config)


def sharded_linear_topk_distillation_loss(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike | Transposed,
    teacher_ids: jax.typing.ArrayLike,
    teacher_log_probs: jax.typing.ArrayLike,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    data_axis: AxisName | None = "data",
    model_axis: AxisName | None = "model",
    temperature: float = 1.0,
    bias: jax.typing.ArrayLike | None = None,
    logit_softcap: float | None = None,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "mean",
    shift: int = 0,
    mode: Literal["k_plus_one", "truncated"] = "k_plus_one",
    implementation: str | tuple[str, ...] | None = None,
    config: Any = None,
) -> jax.Array:
    r"""``linear_topk_distillation_loss`` of global arrays, data- and vocabulary-parallel.

    The ``jax.shard_map`` over ``mesh`` is written as in
    :func:`sharded_linear_cross_entropy`; ``teacher_ids`` and ``teacher_log_probs``
    are split over ``data_axis`` with the tokens. Every vocabulary shard gives the
    student's logits at those of the K ids it holds (0 at the others), so the model
    axis exchanges ``[tokens, K]`` logits and per-token log-sum-exps only.

    Values and gradients (w.r.t. ``x``, ``w``, ``bias``) equal
    :func:`~fusedloss.linear_topk_distillation_loss` on one device; a ``"mean"`` is
    the weighted mean over the included tokens of the whole mesh.

    Args:
      x: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      w: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      teacher_ids: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      teacher_log_probs: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      temperature: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      bias: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      logit_softcap: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      where: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      weights: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      reduction: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      mesh: as in :func:`sharded_linear_cross_entropy`.
      data_axis: as in :func:`sharded_linear_cross_entropy`.
      model_axis: as in :func:`sharded_linear_cross_entropy`.
      shift: as in :func:`~fusedloss.linear_topk_distillation_loss`; with a data
        axis of size > 1 it needs ``x`` of shape ``[B, T, D]``.
      mode: as in :func:`~fusedloss.linear_topk_distillation_loss`.
      implementation: the per-device statistics core.
      config: that core's config (e.g. an :class:`~fusedloss.XlaConfig`).

    Returns:
      The loss: per token (``x``'s dtype, split over ``data_axis``) for ``"none"``,
      else a float32 scalar.

    Examples:
      On a mesh of one device (the same call runs on any ``data x model`` mesh):

      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> kx, kw, kt = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(kx, (4, 8, 16))
      >>> w = jax.random.normal(kw, (16, 1000)) / 4
      >>> teacher = jax.nn.log_softmax(jax.random.normal(kt, (4, 8, 1000)) * 3)
      >>> top_logp, top_ids = jax.lax.top_k(teacher, 64)
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> loss = jax.jit(lambda x, w: fusedloss.sharded_linear_topk_distillation_loss(
      ...     x, w, top_ids, top_logp, mesh=mesh))(x, w)
      >>> ref = fusedloss.linear_topk_distillation_loss(x, w, top_ids, top_logp)
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5))
      True
    """
    args, ids, tlp, hp = check_topk(
        x, w, teacher_ids, teacher_log_probs, temperature, bias, logit_softcap, where, weights,
        reduction, shift, mode,
    )  # fmt: skip
    head = topk_distillation_head(hp, reduction=reduction, mode=mode)
    extras = {"teacher_ids": Extra(ids, "tokens"), "teacher_log_probs": Extra(tlp, "tokens")}
    return _on_mesh(args, head, mesh, data_axis, model_axis, shift, implementation, config, extras)


def sharded_linear_distillation_loss(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike | Transposed,
    teacher_x: jax.typing.ArrayLike,
    teacher_w: jax.typing.ArrayLike | Transposed,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    data_axis: AxisName | None = "data",
    model_axis: AxisName | None = "model",
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    bias: jax.typing.ArrayLike | None = None,
    teacher_bias: jax.typing.ArrayLike | None = None,
    logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None,
    labels: jax.typing.ArrayLike | None = None,
    hard_label_weight: float = 0.0,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "mean",
    shift: int = 0,
    implementation: str | tuple[str, ...] | None = None,
    config: Any = None,
) -> jax.Array:
    r"""``linear_distillation_loss`` of global arrays, data- and vocabulary-parallel.

    The ``jax.shard_map`` over ``mesh`` is written as in
    :func:`sharded_linear_cross_entropy`: ``x``, ``teacher_x`` and the per-token
    arrays are split over ``data_axis``; the columns of ``w``, ``teacher_w`` and the
    biases over ``model_axis`` (both heads share the vocabulary split). Each device
    streams its vocabulary shard of both heads; the model axis exchanges per-token
    log-sum-exps and partial sums only (a second exchange for ``"jsd"``), never
    logits. On a model axis of size > 1 the chunked ``recompute`` strategy runs.

    Values and gradients (w.r.t. ``x``, ``w``, ``bias``; none to the teacher) equal
    :func:`~fusedloss.linear_distillation_loss` on one device.

    Args:
      x: as in :func:`~fusedloss.linear_distillation_loss`.
      w: as in :func:`~fusedloss.linear_distillation_loss`.
      teacher_x: as in :func:`~fusedloss.linear_distillation_loss`.
      teacher_w: as in :func:`~fusedloss.linear_distillation_loss`.
      divergence: as in :func:`~fusedloss.linear_distillation_loss`.
      beta: as in :func:`~fusedloss.linear_distillation_loss`.
      temperature: as in :func:`~fusedloss.linear_distillation_loss`.
      bias: as in :func:`~fusedloss.linear_distillation_loss`.
      teacher_bias: as in :func:`~fusedloss.linear_distillation_loss`.
      logit_softcap: as in :func:`~fusedloss.linear_distillation_loss`.
      teacher_logit_softcap: as in :func:`~fusedloss.linear_distillation_loss`.
      labels: as in :func:`~fusedloss.linear_distillation_loss`.
      hard_label_weight: as in :func:`~fusedloss.linear_distillation_loss`.
      ignore_index: as in :func:`~fusedloss.linear_distillation_loss`.
      where: as in :func:`~fusedloss.linear_distillation_loss`.
      weights: as in :func:`~fusedloss.linear_distillation_loss`.
      reduction: as in :func:`~fusedloss.linear_distillation_loss`.
      mesh: as in :func:`sharded_linear_cross_entropy`.
      data_axis: as in :func:`sharded_linear_cross_entropy`.
      model_axis: as in :func:`sharded_linear_cross_entropy`.
      shift: as in :func:`~fusedloss.linear_distillation_loss`; with a data axis of
        size > 1 it needs ``x`` of shape ``[B, T, D]``.
      implementation: ``"xla"`` (the chunked core on every device).
      config: its :class:`~fusedloss.XlaConfig`.

    Returns:
      The loss: per token (``x``'s dtype, split over ``data_axis``) for ``"none"``,
      else a float32 scalar.

    Examples:
      On a mesh of one device (the same call runs on any ``data x model`` mesh):

      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> ks = jax.random.split(jax.random.key(0), 4)
      >>> x, xt = jax.random.normal(ks[0], (4, 8, 16)), jax.random.normal(ks[1], (4, 8, 32))
      >>> w = jax.random.normal(ks[2], (16, 1000)) / 4
      >>> wt = jax.random.normal(ks[3], (32, 1000)) / 4
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> loss = jax.jit(lambda x, w: fusedloss.sharded_linear_distillation_loss(
      ...     x, w, xt, wt, mesh=mesh, divergence="jsd"))(x, w)
      >>> ref = fusedloss.linear_distillation_loss(x, w, xt, wt, divergence="jsd")
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5))
      True
    """
    args, teacher, dh, a = check_distillation(
        x, w, teacher_x, teacher_w, labels, bias=bias, teacher_bias=teacher_bias,
        where=where, weights=weights, divergence=divergence, beta=beta,
        temperature=temperature, logit_softcap=logit_softcap,
        teacher_logit_softcap=teacher_logit_softcap, hard_label_weight=hard_label_weight,
        ignore_index=ignore_index, reduction=reduction, shift=shift,
    )  # fmt: skip
    extras = {
        "teacher_x": Extra(teacher.x, "tokens"),
        "teacher_w": Extra(teacher.w, "columns", 0 if dh.teacher_vd else 1),
    }
    if teacher.bias is not None:
        extras["teacher_bias"] = Extra(teacher.bias, "columns", 0)
    head = distillation_head(
        dh, a, reduction=reduction, ignore_index=ignore_index,
        implementation=implementation, config=config,
    )  # fmt: skip
    return _on_mesh(args, head, mesh, data_axis, model_axis, shift, implementation, config, extras)
