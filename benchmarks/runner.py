"""Runs cases x contenders x modes and returns one flat record per measurement.

A record (a ``dict`` with the keys of :data:`RESULT_KEYS`) is written for every
``(case, contender, mode)``, including the skipped ones, so every table and plot can
be produced from the JSON alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

import fusedloss
from benchmarks import measure
from benchmarks.contenders import BASELINE, Contender, Prepared, Unavailable
from benchmarks.shapes import Case

MODES: tuple[str, ...] = ("fwd", "fwd_bwd")
RESULT_KEYS: tuple[str, ...] = (
    "case",
    "group",
    "contender",
    "mode",
    "status",  # "ok" | "skipped"
    "reason",  # why it was skipped ("" when ok)
    "n",
    "d",
    "v",
    "dtype",
    "time_s",  # median of the timed calls
    "times_s",
    "compile_s",
    "temp_bytes",
    "device_peak_bytes",
    "device_peak_exact",
    "flops",
    "tflops",
    "peak_fraction",  # tflops / matmul peak of the same run
    "err_loss",  # max |loss - float32 reference|
    "err_dx",
    "err_dw",
    "time_ratio",  # time / baseline time (same case and mode)
    "temp_ratio",  # temp bytes / baseline temp bytes
)


class Listener(Protocol):
    """Receives progress from :func:`run_cases` (console output)."""

    def log(self, message: str) -> None:
        """A free-form line."""

    def advance(self, description: str) -> None:
        """One ``(case, contender)`` pair is done."""

    def case_done(self, case: Case, records: Sequence[dict[str, Any]]) -> None:
        """Every contender of ``case`` is done (ratios filled in)."""


def make_inputs(case: Case, dtype: Any, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x [N, D]``, ``w [D, V]`` (logits with std ~2) and ``labels [N]`` int32.

    Drawn with NumPy on the host (threefry on a CPU backend takes seconds for a
    ``[D, V]`` head) and cast to ``dtype`` on the device.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.n, case.d), dtype=np.float32)
    w = rng.standard_normal((case.d, case.v), dtype=np.float32)
    w *= np.float32(2.0 / math.sqrt(case.d))
    labels = rng.integers(0, case.v, size=case.n, dtype=np.int32)
    out = (jnp.asarray(x).astype(dtype), jnp.asarray(w).astype(dtype), jnp.asarray(labels))
    del x, w
    return jax.block_until_ready(out)


def reference_outputs(
    case: Case, x: jax.Array, w: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Loss, ``dx`` and ``dw`` of the materialized loss in float32, highest precision."""

    def loss(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
        return fusedloss.linear_cross_entropy(
            x, w, labels, logit_softcap=case.softcap, implementation="reference"
        )

    # The context must be active while tracing: it sets the precision of the dots.
    with jax.default_matmul_precision("highest"):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        value, (dx, dw) = fn(x.astype(jnp.float32), w.astype(jnp.float32), labels)
    return jax.block_until_ready((value, dx, dw))


def empty_record(case: Case, contender: str, mode: str, dtype: str) -> dict[str, Any]:
    """A record with every key, the figures unset."""
    rec: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    rec.update(
        case=case.name,
        group=case.group,
        contender=contender,
        mode=mode,
        status="skipped",
        reason="",
        n=case.n,
        d=case.d,
        v=case.v,
        dtype=dtype,
        device_peak_exact=False,
    )
    return rec


def _measure_mode(
    prepared: Prepared,
    mode: str,
    case: Case,
    x: jax.Array,
    labels: jax.Array,
    ref: tuple[jax.Array, jax.Array, jax.Array],
    rec: dict[str, Any],
    *,
    reps: int,
    max_seconds: float,
    peak_tflops: float | None,
) -> None:
    fn: Callable[..., Any] = prepared.loss
    if mode == "fwd_bwd":
        fn = jax.value_and_grad(prepared.loss, argnums=(0, 1))
    timing = measure.time_compiled(fn, (x, prepared.w, labels), reps=reps, max_seconds=max_seconds)
    flops = case.flops_fwd if mode == "fwd" else case.flops_fwd_bwd
    median = timing.median_s
    tflops = flops / median / 1e12
    rec.update(
        status="ok",
        time_s=median,
        times_s=timing.times_s,
        compile_s=timing.compile_s,
        temp_bytes=timing.temp_bytes,
        device_peak_bytes=timing.device_peak_bytes,
        device_peak_exact=timing.device_peak_exact,
        flops=flops,
        tflops=tflops,
        peak_fraction=None if not peak_tflops else tflops / peak_tflops,
    )
    ref_loss, ref_dx, ref_dw = ref
    if mode == "fwd":
        rec["err_loss"] = measure.max_abs_error(timing.output, ref_loss)
    else:
        value, (dx, dw) = timing.output
        rec["err_loss"] = measure.max_abs_error(value, ref_loss)
        rec["err_dx"] = measure.max_abs_error(dx, ref_dx)
        rec["err_dw"] = measure.max_abs_error(prepared.dw_to_dv(dw), ref_dw)


def _failure(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return f"failed: {type(e).__name__}: {line[:200]}"


def fill_ratios(records: Sequence[dict[str, Any]]) -> None:
    """Sets ``time_ratio`` / ``temp_ratio`` against the baseline of the same case+mode."""
    base = {
        (r["case"], r["mode"]): r
        for r in records
        if r["contender"] == BASELINE and r["status"] == "ok"
    }
    for r in records:
        b = base.get((r["case"], r["mode"]))
        if r["status"] != "ok" or b is None:
            continue
        if b["time_s"]:
            r["time_ratio"] = r["time_s"] / b["time_s"]
        if r["temp_bytes"] is not None and b["temp_bytes"]:
            r["temp_ratio"] = r["temp_bytes"] / b["temp_bytes"]


def run_case(
    case: Case,
    contenders: Sequence[Contender],
    *,
    dtype: Any,
    reps: int,
    max_seconds: float,
    peak_tflops: float | None,
    listener: Listener | None = None,
) -> list[dict[str, Any]]:
    """Measures every contender on ``case``; returns the records in contender order."""
    dtype_name = jnp.dtype(dtype).name
    x, w, labels = make_inputs(case, dtype)
    ref = reference_outputs(case, x, w, labels)
    by_name: dict[str, list[dict[str, Any]]] = {}
    # Leanest first, so a GPU's monotone peak is raised (and exact) as often as possible.
    for contender in sorted(contenders, key=lambda c: c.memory_rank):
        recs = [empty_record(case, contender.name, m, dtype_name) for m in case.modes]
        by_name[contender.name] = recs
        try:
            prepared = contender.prepare(case, x, w, labels)
        except Unavailable as e:
            for r in recs:
                r["reason"] = str(e)
        else:
            for rec in recs:
                try:
                    _measure_mode(
                        prepared,
                        rec["mode"],
                        case,
                        x,
                        labels,
                        ref,
                        rec,
                        reps=reps,
                        max_seconds=max_seconds,
                        peak_tflops=peak_tflops,
                    )
                except Exception as e:  # e.g. out of memory: report, never crash
                    rec.update(status="skipped", reason=_failure(e))
            del prepared
        if listener is not None:
            listener.advance(f"{case.name} / {contender.name}")
    records = [r for c in contenders for r in by_name[c.name]]
    fill_ratios(records)
    if listener is not None:
        listener.case_done(case, records)
    return records


def run_cases(
    cases: Sequence[Case],
    contenders: Sequence[Contender],
    *,
    dtype: Any,
    reps: int,
    max_seconds: float,
    peak_tflops: float | None,
    listener: Listener | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_case` over ``cases``; one flat list of records."""
    out: list[dict[str, Any]] = []
    for case in cases:
        if listener is not None:
            scaled = f"  [{case.note}]" if case.note else ""
            listener.log(f"{case.name}: N={case.n} D={case.d} V={case.v}{scaled}")
        out.extend(
            run_case(
                case,
                contenders,
                dtype=dtype,
                reps=reps,
                max_seconds=max_seconds,
                peak_tflops=peak_tflops,
                listener=listener,
            )
        )
    return out
