"""Runs heads x cases x contenders x modes; returns flat records (one per measurement).

Every record, skipped and compile-only ones included, carries every key of
:data:`RESULT_KEYS`, so every table and plot is made from the JSON alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.cases import Case
from benchmarks.contenders import HEADS, ROWS, Head, Unavailable, draw, inputs, prepare

Advance = Callable[[str], None]
RESULT_KEYS: tuple[str, ...] = (
    "case", "group", "head", "contender", "mode", "status", "reason", "n", "d", "v",
    "softcap", "dtype", "time_s", "times_s", "compile_s", "temp_bytes", "device_peak_bytes",
    "device_peak_exact", "flops", "tflops", "peak_fraction", "err_loss", "err_dx", "err_dw",
    "time_ratio", "temp_ratio", "within_budget",
)  # fmt: skip
# A fused row is within its error budget when each of its errors (loss, dx, dw) is no
# larger than the materialized baseline's in the same dtype, up to this slack.
BUDGET_SLACK = (1.05, 1e-6)


def _record(case: Case, head: str, contender: str, mode: str, dtype: Any) -> dict[str, Any]:
    """A record of :data:`RESULT_KEYS`, skipped until measured."""
    rec = dict.fromkeys(RESULT_KEYS) | {"case": case.name, "group": case.group, "head": head}
    rec.update(contender=contender, mode=mode, n=case.n, d=case.d, v=case.v, status="skipped")
    rec.update(softcap=case.softcap, dtype=jnp.dtype(dtype).name, reason="")
    return rec | {"device_peak_exact": False}


def _fill(rec: dict[str, Any], measured: dict[str, Any], flops: int | None) -> None:
    """``rec`` from :func:`harness.measure`'s figures, with the TFLOP/s of ``flops``."""
    rec.update(measured)
    if rec["status"] == "ok" and flops:
        rec.update(flops=flops, tflops=flops / rec["time_s"] / 1e12)


def ratios(records: Sequence[dict[str, Any]]) -> None:
    """Time and temp ratios and the error budget of every record that ran, against its
    baseline in the same case and mode: the first row of its head that ran (optax for
    the cross-entropy, else ``reference``; optax for a standard loss)."""
    ok = {(r["case"], r["mode"], r["contender"]): r for r in records if r["status"] == "ok"}
    for (case, mode, _), r in ok.items():
        rows = [c.name for c in HEADS[r["head"]].rows] if r["head"] in HEADS else ["optax"]
        b = next((ok[k] for k in ((case, mode, n) for n in rows) if k in ok), None)
        if b is None:
            continue
        r["time_ratio"] = b["time_s"] and r["time_s"] / b["time_s"]
        if b["temp_bytes"] and r["temp_bytes"] is not None:
            r["temp_ratio"] = r["temp_bytes"] / b["temp_bytes"]
        if r is not b and b["err_loss"] is not None:
            keys = [k for k in ("err_loss", "err_dx", "err_dw") if b[k] is not None]
            scale, floor = BUDGET_SLACK
            r["within_budget"] = all(r[k] <= scale * b[k] + floor for k in keys)


def _grad(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
    return jax.value_and_grad(loss, argnums=(0, 1))


def _reference(head: Head, case: Case, args: tuple, platform: str) -> tuple[Any, Any, Any]:
    """Loss, dx and dw ([D, V]) of the head's materialized baseline in float32 at
    ``precision="highest"`` (the next row where the baseline is not installed)."""
    f32 = tuple(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args)
    for row in head.rows:
        try:
            fn, a, dw_out = prepare(row, case, platform, f32)
        except Unavailable:
            continue
        with jax.default_matmul_precision("highest"):  # active while tracing
            value, (dx, dw) = jax.jit(_grad(fn))(*a)
        return jax.block_until_ready((value, dx, dw_out(dw)))
    raise RuntimeError(f"no row of {head.name} can run here")


def _errors(got: Sequence[Any], want: Sequence[Any]) -> dict[str, Any]:
    """Relative errors of (loss, dx, dw), as many as ``got`` has."""
    keys = ("err_loss", "err_dx", "err_dw")
    return {k: harness.rel_error(g, w) for k, g, w in zip(keys, got, want, strict=False)}


def _check(ref: tuple, dw_outs: dict[str, Any], key: tuple[str, str], r: Any) -> dict[str, Any]:
    """The errors of a program's output: the loss, or ``(loss, (dx, dw))``."""
    return _errors((r,) if key[1] == "fwd" else (r[0], r[1][0], dw_outs[key[0]](r[1][1])), ref)


def run_head(
    head: Head,
    cases: Sequence[Case],
    rows: Sequence[str],
    *,
    dtype: Any,
    reps: int,
    max_seconds: float,
    advance: Advance = lambda _: None,
) -> list[dict[str, Any]]:
    """Times ``rows`` of ``head`` (its baseline always included) on every case."""
    platform = jax.default_backend()
    names = [head.baseline] + [r for r in rows if r != head.baseline]
    order = sorted(names, key=lambda n: ROWS[n][1].rank)  # leanest first (device peak)
    out: list[dict[str, Any]] = []
    for case in cases:
        case_dtype = jnp.dtype(case.dtype or dtype)
        args = inputs(case, head, case_dtype)
        ref = _reference(head, case, args, platform)
        recs = {
            (n, m): _record(case, head.name, n, m, case_dtype) for n in names for m in case.modes
        }
        programs, dw_outs = {}, {}
        for name in order:
            try:
                fn, a, dw_outs[name] = prepare(ROWS[name][1], case, platform, args)
            except Unavailable as e:
                for mode in case.modes:
                    recs[name, mode]["reason"] = str(e)
                continue
            for mode in case.modes:
                programs[name, mode] = (fn if mode == "fwd" else _grad(fn), a)
        check = functools.partial(_check, ref, dw_outs)
        measured = harness.measure(programs, reps=reps, max_seconds=max_seconds, check=check)
        for (name, mode), m in measured.items():
            _fill(recs[name, mode], m, case.flops(mode))
        ratios(list(recs.values()))
        out += recs.values()
        advance(f"{head.name} {case.name}")
    return out


def compile_table(
    cases: Sequence[Case],
    rows: Sequence[str],
    *,
    dtype: Any,
    platform: str,
    sharding: Any = None,
    advance: Advance = lambda _: None,
) -> list[dict[str, Any]]:
    """Compiled temporaries of forward+backward of every row at every case, compiled
    for ``platform`` (arguments placed by ``sharding``, e.g. on a compile-only device);
    nothing runs, so heads whose logits would need tens of GiB cost one compile."""

    def place(s: Any) -> Any:
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) if sharding else s

    out = []
    for case in cases:
        for name in rows:
            head, row = ROWS[name]
            advance(f"compile {case.name} / {name}")
            out.append(rec := _record(case, head.name, name, "fwd_bwd", dtype))
            specs = tuple(place(s) for s in inputs(case, head, dtype, seed=None))
            try:
                fn, args, _ = prepare(row, case, platform, specs)
                compiled, rec["compile_s"] = harness.compile_only(_grad(fn), args)
                rec.update(status="ok", temp_bytes=harness.temp_bytes(compiled))
            except Unavailable as e:
                rec["reason"] = str(e)
            except Exception as e:  # a compiler error for this target: reported
                rec.update(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
    ratios(out)
    return out


# ---- the standard losses against their optax twins ---------------------------------------

STANDARD: tuple[str, ...] = (
    "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "kl_divergence",
)


def _standard_args(name: str, n: int, v: int, dtype: Any) -> tuple[Any, ...]:
    """Logits ~ N(0, 4) (log-probabilities for the KL), then the loss's targets."""

    def softmax(z: Any) -> Any:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    r, shape = np.random.default_rng(100), (n, v)
    logits = lambda r: 2.0 * r.standard_normal(shape, np.float32)
    targets = {
        "softmax_cross_entropy_with_integer_labels": (jnp.int32, lambda r: r.integers(0, v, n)),
        "sigmoid_binary_cross_entropy": (dtype, lambda r: r.integers(0, 2, shape)),
    }.get(name, (dtype, lambda r: softmax(r.standard_normal(shape))))
    first = (lambda r: np.log(softmax(logits(r)))) if name == "kl_divergence" else logits
    first = draw(r, shape, dtype, first)
    return first, draw(r, (n,) if targets[0] == jnp.int32 else shape, *targets)


def _mean_of(fn: Any) -> Callable[..., Any]:
    return jax.value_and_grad(lambda *a: jnp.mean(fn(*a).astype(jnp.float32)))


def run_standard(
    n: int, v: int, dtype: Any, *, reps: int, max_seconds: float, names: Sequence[str] = STANDARD
) -> list[dict[str, Any]]:
    """``value_and_grad`` of the mean loss w.r.t. ``[n, v]`` logits, fusedloss against
    optax (the baseline; its float32 result is the error reference)."""
    import optax

    import fusedloss

    out, case = [], Case(f"[{n}, {v}] logits", "standard", n, None, v)  # type: ignore[arg-type]
    for name in names:
        args = _standard_args(name, n, v, dtype)
        f32 = tuple(a.astype(jnp.float32) if a.dtype == dtype else a for a in args)
        want = jax.jit(_mean_of(getattr(optax.losses, name)))(*f32)
        mods = {"optax": optax.losses, "fusedloss": fusedloss}
        programs = {impl: (_mean_of(getattr(mod, name)), args) for impl, mod in mods.items()}
        check = lambda impl, got, want=want: _errors(got, want)
        measured = harness.measure(programs, reps=reps, max_seconds=max_seconds, check=check)
        for impl, m in measured.items():
            out.append(_record(case, name, impl, "fwd_bwd", dtype))
            _fill(out[-1], m, None)
    ratios(out)
    return out
