"""The table of heads (:data:`HEADS`), each with its contenders, and the one input builder.

A head's first row is the materialized baseline: ratios are taken against it and its
float32 ``precision="highest"`` result is the error reference. Adding a head is one
``_pair(...)`` entry (``benchmarks/README.md``). A contender that is not installed or
does not support the case or platform raises :class:`Unavailable`: skipped, with why."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fusedloss
from benchmarks.cases import Case
from benchmarks.harness import first_line

LossFn = Callable[..., jax.Array]
TOPK = 64


class Unavailable(Exception):
    """The contender cannot run this case here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Contender:
    """A row: ``make(case, platform) -> loss(x, w, *extras)`` (raises
    :class:`Unavailable`); ``vd``: the loss takes ``w`` as ``[V, D]``. ``rank``: run
    order inside a case, leanest first, so that a GPU's monotone ``peak_bytes_in_use``
    is raised (hence exact) as often as possible."""

    name: str
    description: str
    make: Callable[[Case, str], LossFn]
    rank: int = 5
    vd: bool = False


@dataclasses.dataclass(frozen=True)
class Head:
    """A loss and its rows (``rows[0]``: the materialized baseline); ``extras(case,
    dtype, rng)``: the inputs after ``x`` and ``w`` (``rng`` None: shapes only)."""

    name: str
    rows: tuple[Contender, ...]
    extras: Callable[[Case, Any, np.random.Generator | None], tuple[Any, ...]]

    @property
    def baseline(self) -> str:
        return self.rows[0].name


def _softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def _logits32(x: jax.Array, w: jax.Array, case: Case) -> jax.Array:
    return _softcap((x @ w).astype(jnp.float32), case.softcap)


def _import(module: str, dist: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # an optional dependency may fail in any way on import
        raise Unavailable(f"{dist} not installed ({first_line(e, 160)})") from e


def _needs(platform: str, wanted: str | None) -> None:
    if wanted is not None and platform != wanted:
        raise Unavailable(f"{wanted.upper()} only (this platform is {platform})")


def _no_softcap(case: Case, who: str) -> None:
    if case.softcap is not None:
        raise Unavailable(f"{who} has no logit softcap (case needs {case.softcap:g})")


def _transpose(w: Any) -> Any:
    if isinstance(w, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(w.shape[::-1], w.dtype, sharding=w.sharding)
    return jax.block_until_ready(jnp.array(w.T))  # a real [V, D] copy, outside timing


# ---- inputs -------------------------------------------------------------------------------


def draw(rng: np.random.Generator | None, shape: tuple[int, ...], dtype: Any, fn: Any) -> Any:
    """``fn(rng)`` as a device array of ``dtype`` (NumPy on the host: threefry on a CPU
    backend takes seconds for a head); a ``ShapeDtypeStruct`` when ``rng`` is None."""
    if rng is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.block_until_ready(jnp.asarray(np.asarray(fn(rng), np.float32)).astype(dtype))


def _normal(rng: Any, shape: tuple[int, int], dtype: Any, scale: float = 1.0) -> Any:
    return draw(rng, shape, dtype, lambda r: r.standard_normal(shape, np.float32) * scale)


def inputs(case: Case, head: Head, dtype: Any, seed: int | None = 0) -> tuple[Any, ...]:
    """``x [N, D]`` ~ N(0, 1), ``w [D, V]`` (logits of std ~2), then the head's extras;
    ``seed`` None gives ``ShapeDtypeStruct``s (nothing allocated)."""
    rng = None if seed is None else np.random.default_rng(seed)
    x = _normal(rng, (case.n, case.d), dtype)
    w = _normal(rng, (case.d, case.v), dtype, 2.0 / math.sqrt(case.d))
    return (x, w, *head.extras(case, dtype, rng))


def _labels(case: Case, dtype: Any, rng: np.random.Generator | None) -> tuple[Any, ...]:
    return (draw(rng, (case.n,), jnp.int32, lambda r: r.integers(0, case.v, case.n)),)


def _teacher_topk(case: Case, dtype: Any, rng: np.random.Generator | None) -> tuple[Any, ...]:
    n, v, k = case.n, case.v, TOPK

    def ids(r: np.random.Generator) -> np.ndarray:  # distinct per token, spread over V
        picks = r.permuted(np.tile(np.arange(4 * k), (n, 1)), axis=1)[:, :k]
        return (picks * (v // (4 * k))) % v

    def log_probs(r: np.random.Generator) -> np.ndarray:  # teacher mass 0.9 on its top K
        z = r.standard_normal((n, k))
        return z - np.log(np.exp(z).sum(-1, keepdims=True)) + np.log(0.9)

    return draw(rng, (n, k), jnp.int32, ids), draw(rng, (n, k), jnp.float32, log_probs)


def _teacher_head(case: Case, dtype: Any, rng: np.random.Generator | None) -> tuple[Any, ...]:
    """A teacher of the student's width: hidden states and a head of logits std ~3."""
    xt = _normal(rng, (case.n, case.d), dtype)
    return xt, _normal(rng, (case.d, case.v), dtype, 3.0 / math.sqrt(case.d))


# ---- cross-entropy contenders -------------------------------------------------------------


def _optax(case: Case, platform: str) -> LossFn:
    optax = _import("optax", "optax")

    def loss(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
        # What a training loop writes: logits in the input dtype, then optax.
        logits = _softcap(x @ w, case.softcap)
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss


def _fused(impl: str | None, config: Any = None, only: str | None = None, mesh: bool = False):
    def make(case: Case, platform: str) -> LossFn:
        _needs(platform, only)
        if not mesh:
            kw = dict(implementation=impl, config=config)
            fn = fusedloss.linear_cross_entropy
        elif jax.device_count() < 2:
            raise Unavailable("needs more than one device (vocab-parallel over a 1 x n mesh)")
        else:
            kw = dict(mesh=jax.make_mesh((1, jax.device_count()), ("data", "model")))
            fn = fusedloss.sharded_linear_cross_entropy
        return functools.partial(fn, logit_softcap=case.softcap, **kw)

    return make


def _jax_cce(case: Case, platform: str) -> LossFn:
    _no_softcap(case, "jax-cce")
    return _import("jax_cce", "jax-cce").linear_cross_entropy


def _tokamax(impl: str, only: str | None) -> Any:
    def make(case: Case, platform: str) -> LossFn:
        tokamax = _import("tokamax", "tokamax")
        flags = _import("absl.flags", "absl-py")
        if not flags.FLAGS.is_parsed():  # tokamax would parse *our* sys.argv
            flags.FLAGS.mark_as_parsed()
        _no_softcap(case, "tokamax")
        _needs(platform, only)
        fn = functools.partial(tokamax.linear_softmax_cross_entropy_loss, implementation=impl)
        return lambda x, w, labels: fn(x, labels, w, reduction="mean")

    return make


_gif = fusedloss.XlaConfig(strategy="grad_in_forward")
_recompute = fusedloss.XlaConfig(strategy="recompute")
_TOKAMAX = "tokamax.linear_softmax_cross_entropy_loss(implementation="
CROSS_ENTROPY = Head(
    "cross_entropy",
    (
        Contender("optax", "optax.losses.softmax_cross_entropy_with_integer_labels("
                  "x @ w, labels).mean()", _optax, 9),
        Contender("reference", "implementation='reference' (materialized, float32 logits)",
                  _fused("reference"), 8),
        Contender("xla_gif", "implementation='xla', strategy='grad_in_forward'",
                  _fused("xla", _gif), 1),
        Contender("xla_recompute", "implementation='xla', strategy='recompute'",
                  _fused("xla", _recompute), 0),
        Contender("default", "implementation=None (the library's choice for the platform)",
                  _fused(None), 0),
        Contender("pallas_gpu", "implementation='pallas_gpu'", _fused("pallas_gpu", only="gpu"), 0),
        Contender("pallas_tpu", "implementation='pallas_tpu'", _fused("pallas_tpu", only="tpu"), 0),
        Contender("sharded", "sharded_linear_cross_entropy, vocab-parallel over all devices",
                  _fused(None, mesh=True), 0),
        # jax-cce takes w as [V, D]: a copy made once (a tied embedding has one for free).
        Contender("jax_cce", "jax_cce.linear_cross_entropy(x, w.T, labels)", _jax_cce, 2, True),
        Contender("tokamax_xla", _TOKAMAX + "'xla')", _tokamax("xla", None), 9),
        Contender("tokamax_mosaic_tpu", _TOKAMAX + "'mosaic_tpu')",
                  _tokamax("mosaic_tpu", "tpu"), 0),
    ),
    _labels,
)  # fmt: skip


# ---- the other heads: fused against materialized ------------------------------------------


def _pair(name: str, fused: tuple[str, Any], materialized: tuple[str, Any], extras: Any) -> Head:
    """A head with two rows, ``<name>_materialized`` (the baseline) and ``<name>``, from
    ``(description, loss(case, x, w, *extras) -> scalar)``."""

    def row(suffix: str, desc: str, loss: Any, rank: int) -> Contender:
        make = lambda case, platform: functools.partial(loss, case)
        return Contender(name + suffix, desc, make, rank)

    return Head(name, (row("_materialized", *materialized, 9), row("", *fused, 0)), extras)


def _log_probs_fused(case: Case, x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
    lp, ent = fusedloss.linear_log_probs(
        x, w, labels, logit_softcap=case.softcap, return_entropy=True
    )
    return lp.sum() + 0.01 * ent.sum()  # both outputs get a backward


def _log_probs_materialized(case: Case, x: jax.Array, w: jax.Array, labels: Any) -> jax.Array:
    logp = jax.nn.log_softmax(_logits32(x, w, case), axis=-1)
    lp = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return lp.sum() + 0.01 * (-(jnp.exp(logp) * logp).sum(-1)).sum()


def _topk_fused(case: Case, x: jax.Array, w: jax.Array, ids: Any, t_lp: Any) -> jax.Array:
    return fusedloss.linear_topk_distillation_loss(x, w, ids, t_lp, logit_softcap=case.softcap)


def _topk_materialized(case: Case, x: jax.Array, w: jax.Array, ids: Any, t_lp: Any) -> jax.Array:
    q_k = jnp.take_along_axis(jax.nn.log_softmax(_logits32(x, w, case), -1), ids, axis=-1)
    p_k = jnp.exp(t_lp)
    r_p = jnp.clip(1.0 - p_k.sum(-1), 0.0, None)  # the teacher's mass off its top K
    r_q = jnp.clip(1.0 - jnp.exp(q_k).sum(-1), 1e-30, None)
    rest = jnp.where(r_p > 0, r_p * (jnp.log(jnp.where(r_p > 0, r_p, 1.0)) - jnp.log(r_q)), 0)
    return ((p_k * (t_lp - q_k)).sum(-1) + rest).mean()


def _distill_fused(case: Case, x: jax.Array, w: jax.Array, xt: Any, wt: Any) -> jax.Array:
    cap = case.softcap
    return fusedloss.linear_distillation_loss(
        x, w, xt, wt, logit_softcap=cap, teacher_logit_softcap=cap
    )


def _distill_materialized(case: Case, x: jax.Array, w: jax.Array, xt: Any, wt: Any) -> jax.Array:
    log_q = jax.nn.log_softmax(_logits32(x, w, case), -1)
    log_p = jax.lax.stop_gradient(jax.nn.log_softmax(_logits32(xt, wt, case), -1))
    return (jnp.exp(log_p) * (log_p - log_q)).sum(-1).mean()


# The objectives score sequences of _SEQ tokens (N = 8192 as 16 x 512 at the real heads).
_SEQ = 512


def _rows_of(case: Case) -> tuple[int, int]:
    """(rows, tokens a row): an even number of rows (chosen and rejected pairs) of at
    most _SEQ tokens; the first rows x tokens of the case's N are scored."""
    b = 2 * max(1, case.n // (2 * _SEQ))
    return b, case.n // b


def _rows(case: Case, *arrays: Any) -> list[Any]:
    b, t = _rows_of(case)
    return [a[: b * t].reshape(b, t, *a.shape[1:]) for a in arrays]


def _grpo_extras(case: Case, dtype: Any, rng: np.random.Generator | None) -> tuple[Any, ...]:
    """Sampled tokens, per-sequence advantages and the sampler's log-probs."""
    b, _ = _rows_of(case)
    old = lambda r: -np.abs(r.standard_normal(case.n)) - 5.0
    return (*_labels(case, dtype, rng), _normal(rng, (b,), jnp.float32),
            draw(rng, (case.n,), jnp.float32, old))  # fmt: skip


def _dpo_extras(case: Case, dtype: Any, rng: np.random.Generator | None) -> tuple[Any, ...]:
    """Chosen then rejected completions and the reference's per-sequence log-probs."""
    b, t = _rows_of(case)
    ref = lambda r: -t * (5.0 + r.random(b))
    return (*_labels(case, dtype, rng), draw(rng, (b,), jnp.float32, ref))


def _grpo_options(case: Case, old: jax.Array) -> dict[str, Any]:
    return dict(old_log_probs=_rows(case, old)[0], loss_type="grpo", entropy_coef=0.01)


def _grpo_fused(case: Case, x: jax.Array, w: jax.Array, tokens: Any, adv: Any, old: Any):
    x, tokens = _rows(case, x, tokens)
    return fusedloss.linear_policy_gradient_loss(
        x, w, tokens, adv, logit_softcap=case.softcap, **_grpo_options(case, old)
    )


def _materialized_log_probs(case: Case, x: jax.Array, w: jax.Array, tokens: Any):
    """Per-token log-probs and entropies from the whole float32 logits (as Tunix)."""
    logp = jax.nn.log_softmax(_logits32(x, w, case), axis=-1)
    lp = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return lp, -(jnp.exp(logp) * logp).sum(-1)


def _grpo_materialized(case: Case, x: jax.Array, w: jax.Array, tokens: Any, adv: Any, old: Any):
    lp, ent = _rows(case, *_materialized_log_probs(case, x, w, tokens))
    return fusedloss.policy_gradient_loss(lp, adv, entropy=ent, **_grpo_options(case, old))


def _dpo_fused(case: Case, x: jax.Array, w: jax.Array, tokens: Any, ref: Any):
    x, tokens = _rows(case, x, tokens)
    return fusedloss.linear_preference_loss(
        x, w, tokens, ref_log_probs=ref, logit_softcap=case.softcap, nll_coef=1.0
    )


def _dpo_materialized(case: Case, x: jax.Array, w: jax.Array, tokens: Any, ref: Any):
    (lp,) = _rows(case, _materialized_log_probs(case, x, w, tokens)[0])
    return fusedloss.preference_loss(lp, ref_log_probs=ref, nll_coef=1.0)


HEADS: dict[str, Head] = {
    h.name: h
    for h in (
        CROSS_ENTROPY,
        _pair("log_probs",
              ("fusedloss.linear_log_probs(..., return_entropy=True)", _log_probs_fused),
              ("log_softmax(x @ w) at the labels, plus entropy", _log_probs_materialized),
              _labels),
        _pair("topk_distill",
              (f"fusedloss.linear_topk_distillation_loss, K={TOPK}", _topk_fused),
              (f"top-{TOPK} KL from materialized log_softmax(x @ w)", _topk_materialized),
              _teacher_topk),
        _pair("distill",
              ("fusedloss.linear_distillation_loss (forward KL, teacher of the same width)",
               _distill_fused),
              ("KL(softmax(xt @ wt) || softmax(x @ w)), both logits materialized",
               _distill_materialized),
              _teacher_head),
        _pair("grpo",
              ("fusedloss.linear_policy_gradient_loss (GRPO, entropy bonus; 512-token rows)",
               _grpo_fused),
              ("the same loss on log_softmax(x @ w) (materialized, as Tunix)",
               _grpo_materialized),
              _grpo_extras),
        _pair("dpo",
              ("fusedloss.linear_preference_loss (DPO + NLL, chosen and rejected in one pass)",
               _dpo_fused),
              ("the same loss on log_softmax(x @ w) (materialized)", _dpo_materialized),
              _dpo_extras),
    )
}  # fmt: skip
CONTENDERS: dict[str, Contender] = {c.name: c for c in CROSS_ENTROPY.rows}
ROWS: dict[str, tuple[Head, Contender]] = {c.name: (h, c) for h in HEADS.values() for c in h.rows}


def prepare(row: Contender, case: Case, platform: str, args: tuple) -> tuple:
    """``(fn, args, dw_out)`` of a row bound to a case and inputs ``(x, w, *extras)``:
    ``w`` passed as ``[V, D]`` to a tied case (the loss sees its ``.T``) or a ``vd`` row,
    ``dw_out`` maps the gradient back to ``[D, V]``. Raises :class:`Unavailable`."""
    try:
        loss = row.make(case, platform)
    except Unavailable:
        raise
    except Exception as e:  # whatever a contender raises, the suite goes on
        raise Unavailable(first_line(e, 160)) from e
    x, w, *extras = args
    if not (case.tied or row.vd):
        return loss, args, lambda dw: dw
    fn = (lambda x, e, *rest: loss(x, e.T, *rest)) if case.tied and not row.vd else loss
    return fn, (x, _transpose(w), *extras), lambda dw: dw.T


def third_party_versions() -> dict[str, str | None]:
    """Installed versions of the optional contenders (None: missing)."""
    out: dict[str, str | None] = {}
    for dist in ("optax", "jax-cce", "tokamax"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out
