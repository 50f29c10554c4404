"""The fixed table of backends and the choice among them for a compilation target.

Built once, here, at import; importing a backend module registers nothing. A Pallas
backend that cannot be imported in this installation is simply absent from the table
(``implementation=None`` then falls back to ``xla``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fusedloss.heads import reference, xla
from fusedloss.heads._engine import Problem, TokenStats
from fusedloss.heads._targets import PLATFORMS, Target, known_target, platform_target


class Backend(NamedTuple):
    """A backend: its config type, its plan and its differentiable stats core."""

    config_type: type | None
    plan: Callable[[Any, Problem, Target], Any]  # raises NotImplementedError if unsupported
    stats: Callable[..., Any]


BACKENDS: dict[str, Backend] = {
    "reference": Backend(None, reference.plan, reference.reference_stats_core),
    "xla": Backend(xla.XlaConfig, xla.plan, xla.xla_stats),
}
try:  # Pallas is part of jax, but a stripped-down installation may lack a lowering.
    from fusedloss.heads import pallas_gpu

    BACKENDS["pallas_gpu"] = Backend(
        pallas_gpu.PallasGpuConfig, pallas_gpu.plan, pallas_gpu.pallas_gpu_stats
    )
except ImportError:  # pragma: no cover - depends on the installation
    pass
try:
    from fusedloss.heads import pallas_tpu

    BACKENDS["pallas_tpu"] = Backend(
        pallas_tpu.PallasTpuConfig, pallas_tpu.plan, pallas_tpu.pallas_tpu_stats
    )
except ImportError:  # pragma: no cover - depends on the installation
    pass

NAMES = ("xla", "reference", "pallas_gpu", "pallas_tpu")
# Best first, per platform family; "xla" runs everywhere.
DEFAULT_ORDER = {"gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}
_HOME = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}  # the platform a kernel is written for


class Choice(NamedTuple):
    name: str
    backend: Backend
    plan: Any


def candidates(implementation) -> tuple[tuple[str, ...] | None, bool]:
    """(names to try in order or None for "best for the target", explicit single name)."""
    if implementation is None:
        return None, False
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
        if n not in NAMES:
            raise ValueError(f"`implementation` must be one of {NAMES} (or None), got {n!r}.")
    return names, explicit


def check_config(config, names: tuple[str, ...] | None) -> None:
    """A config must be of a type one of the candidate backends takes."""
    if config is None:
        return
    pool = NAMES if names is None else names
    types = {BACKENDS[n].config_type for n in pool if n in BACKENDS} - {None}
    if not types:
        raise TypeError(
            f"`config` must be None for implementation(s) {pool}, which take no config; "
            f"got {type(config).__name__}."
        )
    if not any(isinstance(config, t) for t in types):
        expected = " or ".join(sorted(t.__name__ for t in types))
        raise TypeError(
            f"`config` must be a {expected} for implementation(s) {pool}, "
            f"got {type(config).__name__}."
        )


def order_for(target: Target, problem: Problem | None = None, config=None) -> tuple[str, ...]:
    """The default order for a target. A problem whose whole float32 logits fit one
    ``xla`` block goes to ``xla`` first, which computes them at once: a kernel's
    fixed buffers (a padded copy of an unaligned ``w``, a ``[D, chunk]`` float32
    ``dw`` product) would exceed the materialized path's at small N (no regret)."""
    order = DEFAULT_ORDER.get(target.platform, ("xla",))
    if (
        problem is None
        or order[0] == "xla"
        or not (config is None or isinstance(config, xla.XlaConfig))
    ):
        return order
    try:
        small = xla.plan(config, problem, target).strategy == "materialized"
    except ValueError:
        small = False
    return ("xla", *(n for n in order if n != "xla")) if small else order


def choose(names: tuple[str, ...], explicit: bool, config, problem: Problem, target: Target):
    """The first backend in ``names`` whose plan supports the problem on the target."""
    errors = []
    for name in names:
        backend = BACKENDS.get(name)
        if backend is None:
            if explicit:
                raise NotImplementedError(f"{name!r} is not available in this installation.")
            errors.append(f"{name}: not available in this installation")
            continue
        cfg = config if backend.config_type and isinstance(config, backend.config_type) else None
        try:
            return Choice(name, backend, backend.plan(cfg, problem, target))
        except NotImplementedError as e:
            if explicit:
                raise
            errors.append(f"{name}: {e}")
    raise NotImplementedError("No implementation could run: " + "; ".join(errors))


def choose_for(
    names: tuple[str, ...] | None, explicit: bool, config, problem: Problem, target: Target | None
) -> Choice:
    """The static choice for a target; an explicit name with an unseen target is
    planned for the platform its backend is written for."""
    if explicit:
        return choose(names, True, config, problem, target or Target(_HOME.get(names[0], "cpu")))
    target = target or Target("cpu")
    return choose(names or order_for(target, problem, config), False, config, problem, target)


def dispatch(
    implementation, config, problem: Problem, run: Callable[[Choice], Any], *arrays
) -> tuple[Any, str]:
    """Runs ``run(choice)`` with the backend chosen for the compilation target.

    Returns ``(outputs, implementation name)``. With ``implementation=None`` and a
    target tracing cannot see, the choice is staged with
    :func:`jax.lax.platform_dependent`: each platform's branch is traced and the
    compiler keeps the one of the platform it compiles for.
    """
    names, explicit = candidates(implementation)
    check_config(config, names)
    target = known_target(*arrays)
    if explicit or target is not None:
        choice = choose_for(names, explicit, config, problem, target)
        return run(choice), choice.name
    order = (lambda t: order_for(t, problem, config)) if names is None else (lambda _: names)
    choices = {}
    errors = {}
    for p in PLATFORMS:
        t = platform_target(p)
        try:
            choices[p] = choose(order(t), False, config, problem, t)
        except (NotImplementedError, ValueError) as e:  # that platform falls to the default
            errors[p] = e
    if "cpu" not in choices:
        raise errors["cpu"]
    default = choices["cpu"]
    if all(c.name == default.name and c.plan == default.plan for c in choices.values()):
        return run(default), default.name
    branches = {p: functools.partial(run, c) for p, c in choices.items()}
    out = jax.lax.platform_dependent(default=functools.partial(run, default), **branches)
    label = ",".join(f"{p}={c.name}" for p, c in choices.items())
    return out, f"platform_dependent({label})"


def run_stats(tokens, w, w_vd: bool, bias, hp, *, implementation, config):
    """The statistics of one device's tokens over all of ``w``, with the core chosen
    for the compilation target: ``(TokenStats, implementation name)``."""
    n, d = tokens.x.shape
    v = w.shape[0] if w_vd else w.shape[1]
    problem = Problem(max(n, 1), d, v, tokens.x.dtype, w_vd, True, hp)

    def run(choice: Choice):
        if n == 0:  # nothing to stream: empty statistics, zero gradients
            zeros = jnp.zeros((0,), tokens.coef.dtype)
            ids = jnp.zeros((0,), jnp.int32)
            return TokenStats(zeros, zeros, zeros, zeros, ids, zeros if hp.entropy else None)
        with jax.named_scope(f"fusedloss_{choice.name}"):
            args = (tokens.x, w, bias, tokens.labels, tokens.valid, jnp.int32(0))
            return choice.backend.stats(*args, hp, choice.plan)

    return dispatch(implementation, config, problem, run, tokens.x, w)
