"""The contenders: every way to compute ``mean(CE(x @ w, labels))`` that the suite times.

Each contender turns a :class:`~benchmarks.shapes.Case` and the shared inputs into a
:class:`Prepared` loss ``f(x, w_layout, labels) -> scalar mean CE``. Layout changes
(jax-cce takes ``w`` as ``[V, D]``) happen once in :meth:`Contender.prepare`, outside
the timed region, and gradients are mapped back to ``[D, V]`` before they are
compared with the reference.

A contender that is not installed, does not import, does not support the case (e.g.
softcap) or the backend raises :class:`Unavailable`; the runner records it as
``skipped`` with the reason and goes on.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fusedloss
from benchmarks.shapes import Case

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
BASELINE = "optax"


class Unavailable(Exception):
    """The contender cannot run this case here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A contender bound to a case.

    Attributes:
      loss: ``(x [N, D], w, labels [N]) -> float32 scalar`` mean cross-entropy.
      w: ``w`` in the layout ``loss`` takes.
      dw_to_dv: maps the gradient w.r.t. ``w`` (in that layout) to ``[D, V]``.
    """

    loss: LossFn
    w: jax.Array
    dw_to_dv: Callable[[jax.Array], jax.Array] = lambda dw: dw


@dataclasses.dataclass(frozen=True)
class Contender:
    """A named implementation of the fused linear cross-entropy.

    Attributes:
      name: command-line name (``--impls``).
      description: one line for tables.
      family: ``"fusedloss"``, ``"baseline"`` or ``"third-party"``.
      make: ``(case, w [D, V]) -> Prepared``; raises :class:`Unavailable`.
      memory_rank: run order inside a case, leanest first, so that a GPU's
        monotone ``peak_bytes_in_use`` is raised (hence exact) as often as possible.
    """

    name: str
    description: str
    family: str
    make: Callable[[Case, jax.Array], Prepared]
    memory_rank: int

    def prepare(self, case: Case, x: jax.Array, w: jax.Array, labels: jax.Array) -> Prepared:
        """Binds the contender to ``case`` and checks it traces.

        Raises:
          Unavailable: with the reason, when the contender cannot run the case.
        """
        try:
            prepared = self.make(case, w)
            # Trace once (no compile, no FLOPs) so unsupported backends or shapes
            # are caught here rather than in the middle of a timing loop.
            jax.eval_shape(prepared.loss, x, prepared.w, labels)
        except Unavailable:
            raise
        except Exception as e:  # whatever a contender raises, the suite goes on
            raise Unavailable(f"{type(e).__name__}: {_first_line(e)}") from e
        return prepared


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else cap * jnp.tanh(logits / cap)


# ---- fusedloss and the materialized baseline ------------------------------------------


def _make_optax(case: Case, w: jax.Array) -> Prepared:
    cap = case.softcap

    def loss(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
        # Exactly what a training loop writes: logits in the input dtype, then optax.
        logits = _softcap(x @ w, cap)
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return Prepared(loss, w)


def _fusedloss(implementation: str, config: Any = None) -> Callable[[Case, jax.Array], Prepared]:
    def make(case: Case, w: jax.Array) -> Prepared:
        def loss(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
            return fusedloss.linear_cross_entropy(
                x,
                w,
                labels,
                logit_softcap=case.softcap,
                implementation=implementation,
                config=config,
            )

        return Prepared(loss, w)

    return make


def _pallas(implementation: str, platform: str) -> Callable[[Case, jax.Array], Prepared]:
    inner = _fusedloss(implementation)

    def make(case: Case, w: jax.Array) -> Prepared:
        backend = jax.default_backend()
        if backend != platform:
            raise Unavailable(f"needs a {platform.upper()} backend, this one is {backend}")
        return inner(case, w)

    return make


def _make_sharded(case: Case, w: jax.Array) -> Prepared:
    n = jax.device_count()
    if n < 2:
        raise Unavailable("needs more than one device (vocab-parallel over a 1 x n mesh)")
    from fusedloss.heads.sharded import sharded_linear_cross_entropy

    mesh = jax.make_mesh((1, n), ("data", "model"))

    def loss(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
        return sharded_linear_cross_entropy(x, w, labels, mesh=mesh, logit_softcap=case.softcap)

    return Prepared(loss, w)


# ---- third party ------------------------------------------------------------------------


def _import(module: str, dist: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # an optional dependency may fail in any way on import
        raise Unavailable(f"{dist} not importable ({type(e).__name__}: {_first_line(e)})") from e


def _no_softcap(case: Case, who: str) -> None:
    if case.softcap is not None:
        raise Unavailable(f"{who} has no logit softcap (case needs softcap={case.softcap:g})")


def _make_jax_cce(case: Case, w: jax.Array) -> Prepared:
    jax_cce = _import("jax_cce", "jax-cce")
    _no_softcap(case, "jax-cce")

    def loss(x: jax.Array, w_vd: jax.Array, labels: jax.Array) -> jax.Array:
        # jax-cce computes mean(CE(x @ w_vd.T, labels)) with w_vd of shape [V, D].
        return jax_cce.linear_cross_entropy(x, w_vd, labels)

    # A real [V, D] copy (a model with tied embeddings has one for free).
    w_vd = jax.block_until_ready(jnp.array(w.T))
    return Prepared(loss, w_vd, dw_to_dv=lambda dw: dw.T)


def _tokamax(implementation: str, platform: str | None) -> Callable[[Case, jax.Array], Prepared]:
    def make(case: Case, w: jax.Array) -> Prepared:
        tokamax = _import("tokamax", "tokamax")
        # tokamax reads its absl flags lazily and would parse *our* sys.argv (and fail
        # on --shapes); its defaults are what we want.
        flags = _import("absl.flags", "absl-py")
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        _no_softcap(case, "tokamax")
        backend = jax.default_backend()
        if platform is not None and backend != platform:
            raise Unavailable(f"needs a {platform.upper()} backend, this one is {backend}")

        def loss(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
            return tokamax.linear_softmax_cross_entropy_loss(
                x, labels, w, reduction="mean", implementation=implementation
            )

        return Prepared(loss, w)

    return make


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender(
            BASELINE,
            "optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()",
            "baseline",
            _make_optax,
            memory_rank=9,
        ),
        Contender(
            "reference",
            "fusedloss implementation='reference' (materialized, float32 logits)",
            "fusedloss",
            _fusedloss("reference"),
            memory_rank=8,
        ),
        Contender(
            "xla_gif",
            "fusedloss implementation='xla', strategy='grad_in_forward'",
            "fusedloss",
            _fusedloss("xla", fusedloss.XlaConfig(strategy="grad_in_forward")),
            memory_rank=1,
        ),
        Contender(
            "xla_recompute",
            "fusedloss implementation='xla', strategy='recompute'",
            "fusedloss",
            _fusedloss("xla", fusedloss.XlaConfig(strategy="recompute")),
            memory_rank=0,
        ),
        Contender(
            "pallas_gpu",
            "fusedloss implementation='pallas_gpu'",
            "fusedloss",
            _pallas("pallas_gpu", "gpu"),
            memory_rank=0,
        ),
        Contender(
            "pallas_tpu",
            "fusedloss implementation='pallas_tpu'",
            "fusedloss",
            _pallas("pallas_tpu", "tpu"),
            memory_rank=0,
        ),
        Contender(
            "sharded",
            "fusedloss sharded_linear_cross_entropy, vocab-parallel over all devices",
            "fusedloss",
            _make_sharded,
            memory_rank=0,
        ),
        Contender(
            "jax_cce",
            "jax_cce.linear_cross_entropy(x, w.T, labels) (vocab chunks, recompute)",
            "third-party",
            _make_jax_cce,
            memory_rank=2,
        ),
        Contender(
            "tokamax_xla",
            "tokamax.linear_softmax_cross_entropy_loss(implementation='xla')",
            "third-party",
            _tokamax("xla", None),
            memory_rank=9,
        ),
        Contender(
            "tokamax_mosaic_tpu",
            "tokamax.linear_softmax_cross_entropy_loss(implementation='mosaic_tpu')",
            "third-party",
            _tokamax("mosaic_tpu", "tpu"),
            memory_rank=0,
        ),
    )
}
DEFAULT_CONTENDERS: tuple[str, ...] = tuple(CONTENDERS)


def select(names: Sequence[str] | None) -> list[Contender]:
    """The contenders named (all by default), the baseline always included first."""
    names = list(DEFAULT_CONTENDERS) if names is None else list(names)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; choose from {list(CONTENDERS)}.")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    return [CONTENDERS[n] for n in dict.fromkeys(names)]


def third_party_versions() -> dict[str, str | None]:
    """Installed versions of the optional third-party contenders (None: missing)."""
    out: dict[str, str | None] = {}
    for dist in ("jax-cce", "tokamax"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out
