"""Compiled temporaries at the real LM-head shapes: the suite's headline table.

For every head of :data:`~benchmarks.shapes.DEFAULT_MODELS` at ``N`` tokens (8192 by
default) and every contender, forward+backward (``value_and_grad`` w.r.t. ``x`` and
``w``) is lowered from ``ShapeDtypeStruct`` inputs and compiled; nothing runs, so a
head whose logits would need tens of GiB costs one compile (about a second). The
number reported is the compiled ``temp_size_in_bytes``: the scratch memory the
program needs besides its inputs and outputs.

Besides the cross-entropy contenders, each fused head is compiled next to its
materialized equivalent: log-probabilities plus entropy (``linear_log_probs``) against
``log_softmax(x @ w)``, and top-K distillation (``linear_topk_distillation_loss``)
against the same KL computed from materialized logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import fusedloss
from benchmarks import contenders, shapes
from benchmarks.measure import temp_bytes_of

TOKENS = 8192
TOPK = 64
# Extra (fused, materialized) head pairs; `None` for "the baseline of this head".
HEADS: tuple[tuple[str, str], ...] = (
    ("log_probs", "fusedloss.linear_log_probs(..., return_entropy=True)"),
    ("log_probs_materialized", "jax.nn.log_softmax(x @ w) at the labels, plus entropy"),
    ("topk_distill", f"fusedloss.linear_topk_distillation_loss, K={TOPK}"),
    ("topk_distill_materialized", f"top-{TOPK} KL from materialized log_softmax(x @ w)"),
)
HEAD_DESCRIPTIONS = dict(HEADS)
DEFAULT_DESCRIPTION = "fusedloss implementation=None (the library's default choice)"


def _softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def _log_probs(fused: bool, cap: float | None) -> Callable[..., jax.Array]:
    def loss(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
        if fused:
            lp, ent = fusedloss.linear_log_probs(
                x, w, labels, logit_softcap=cap, return_entropy=True
            )
        else:
            logp = jax.nn.log_softmax(_softcap((x @ w).astype(jnp.float32), cap), axis=-1)
            lp = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
            ent = -(jnp.exp(logp) * logp).sum(-1)
        # A scalar that depends on both outputs, so both have a backward.
        return lp.sum() + 0.01 * ent.sum()

    return loss


def _topk(fused: bool, cap: float | None) -> Callable[..., jax.Array]:
    def loss(x: jax.Array, w: jax.Array, ids: jax.Array, t_lp: jax.Array) -> jax.Array:
        if fused:
            return fusedloss.linear_topk_distillation_loss(x, w, ids, t_lp, logit_softcap=cap)
        logq = jax.nn.log_softmax(_softcap((x @ w).astype(jnp.float32), cap), axis=-1)
        q_k = jnp.take_along_axis(logq, ids, axis=-1)
        p_k = jnp.exp(t_lp)
        r_p = jnp.clip(1.0 - p_k.sum(-1), 0.0, None)
        r_q = jnp.clip(1.0 - jnp.exp(q_k).sum(-1), 1e-30, None)
        kl = (p_k * (t_lp - q_k)).sum(-1) + jnp.where(
            r_p > 0, r_p * (jnp.log(jnp.where(r_p > 0, r_p, 1.0)) - jnp.log(r_q)), 0.0
        )
        return kl.mean()

    return loss


def _compile_temp(loss: Callable[..., jax.Array], args: Sequence[Any]) -> int | None:
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return temp_bytes_of(fn.lower(*args).compile())


def contender_names() -> list[str]:
    """Rows of the table, in order: the CE contenders, the default, then the heads."""
    ce = [n for n in contenders.CONTENDERS if n != "sharded"]
    ce.insert(ce.index("xla_recompute") + 1, "default")
    return ce + [name for name, _ in HEADS]


def description(name: str) -> str:
    """One line describing a row of the table."""
    if name == "default":
        return DEFAULT_DESCRIPTION
    if name in HEAD_DESCRIPTIONS:
        return HEAD_DESCRIPTIONS[name]
    return contenders.CONTENDERS[name].description


def _prepare(name: str, case: shapes.Case, dtype: Any) -> tuple[Callable[..., Any], list[Any]]:
    s = jax.ShapeDtypeStruct
    x, w = s((case.n, case.d), dtype), s((case.d, case.v), dtype)
    labels = s((case.n,), jnp.int32)
    if name.startswith("log_probs"):
        return _log_probs(name == "log_probs", case.softcap), [x, w, labels]
    if name.startswith("topk_distill"):
        ids, t_lp = s((case.n, TOPK), jnp.int32), s((case.n, TOPK), jnp.float32)
        return _topk(name == "topk_distill", case.softcap), [x, w, ids, t_lp]
    if name == "default":
        cap = case.softcap

        def loss(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
            return fusedloss.linear_cross_entropy(x, w, labels, logit_softcap=cap)

        return loss, [x, w, labels]
    prepared = contenders.CONTENDERS[name].make(case, w)
    return prepared.loss, [x, prepared.w, labels]


def real_cases(models: Sequence[str] | None = None, tokens: int = TOKENS) -> list[shapes.Case]:
    """One case per real head, at its real ``D`` and ``V``."""
    out = []
    for name in models or shapes.DEFAULT_MODELS:
        m = shapes.MODEL_SHAPES[name]
        out.append(shapes.Case(m.name, "models", m.name, tokens, m.d, m.v, m.softcap))
    return out


def run_real_shapes(
    models: Sequence[str] | None = None,
    tokens: int = TOKENS,
    dtype: Any = jnp.float32,
    names: Sequence[str] | None = None,
    advance: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Compiles forward+backward of every contender at every real head.

    Returns one record per (head, contender): ``case``, ``n``, ``d``, ``v``,
    ``softcap``, ``contender``, ``dtype``, ``status`` (``ok``/``skipped``/``failed``),
    ``temp_bytes`` and ``reason``.
    """
    records = []
    for case in real_cases(models, tokens):
        for name in names or contender_names():
            advance(f"compile {case.name} / {name}")
            rec: dict[str, Any] = {
                "case": case.name,
                "n": case.n,
                "d": case.d,
                "v": case.v,
                "softcap": case.softcap,
                "contender": name,
                "dtype": jnp.dtype(dtype).name,
                "status": "ok",
                "temp_bytes": None,
                "reason": None,
            }
            try:
                loss, args = _prepare(name, case, dtype)
            except contenders.Unavailable as e:
                rec.update(status="skipped", reason=str(e))
            except Exception as e:  # a contender may fail in any way; the table goes on
                rec.update(status="skipped", reason=f"{type(e).__name__}: {e}"[:160])
            else:
                try:
                    rec["temp_bytes"] = _compile_temp(loss, args)
                except Exception as e:
                    rec.update(status="failed", reason=f"{type(e).__name__}: {e}"[:160])
            records.append(rec)
    return records


def table(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows: contenders; columns: heads; cells: temporaries (MiB / GiB) or the reason."""
    cases = list(dict.fromkeys(r["case"] for r in records))
    by = {(r["case"], r["contender"]): r for r in records}
    head0 = {r["case"]: r for r in records}
    header = ["contender"] + [
        f"{c} ({head0[c]['d']}x{head0[c]['v']}"
        + (f", softcap {head0[c]['softcap']:g}" if head0[c]["softcap"] else "")
        + ")"
        for c in cases
    ]
    rows = []
    for name in dict.fromkeys(r["contender"] for r in records):
        cells = [name]
        for c in cases:
            r = by.get((c, name))
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                base = by.get((c, materialized_of(name)))
                ratio = ""
                if base and base["temp_bytes"] and r["temp_bytes"] is not None and base is not r:
                    ratio = f" ({r['temp_bytes'] / base['temp_bytes']:.2g}x)"
                cells.append(fmt_bytes(r["temp_bytes"]) + ratio)
            elif "not importable" in (r["reason"] or ""):
                cells.append("not installed")
            elif (r["reason"] or "").startswith("needs a "):
                cells.append(r["reason"].split()[2] + " only")
            else:
                cells.append(r["status"])
        rows.append(cells)
    return header, rows


def materialized_of(name: str) -> str:
    """The materialized equivalent a row is compared with."""
    for head, _ in HEADS:
        if not head.endswith("_materialized") and name == head:
            return head + "_materialized"
    return name if name.endswith("_materialized") else contenders.BASELINE


def fmt_bytes(n: int | None) -> str:
    """``1.5 GiB``, ``260 MiB``, ``12 KiB``."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def skipped_reasons(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per contender that did not compile, with the (first) reason."""
    out: dict[str, str] = {}
    for r in records:
        if r["status"] != "ok" and r["contender"] not in out:
            out[r["contender"]] = f"{r['contender']} ({r['status']}): {r['reason']}"
    return list(out.values())


def _head_inputs(case: shapes.Case, dtype: Any, seed: int = 0) -> dict[str, list[jax.Array]]:
    from benchmarks.runner import make_inputs

    x, w, labels = make_inputs(case, dtype, seed)
    kt = jax.random.key(seed + 1)
    # Distinct top-K ids per token, and a teacher distribution over them (mass < 1).
    ids = jnp.argsort(jax.random.uniform(kt, (case.n, 4 * TOPK)), axis=-1)[:, :TOPK]
    ids = ((ids * (case.v // (4 * TOPK))) % case.v).astype(jnp.int32)
    t_lp = jax.nn.log_softmax(jax.random.normal(kt, (case.n, TOPK)), axis=-1) + jnp.log(0.9)
    return {"log_probs": [x, w, labels], "topk_distill": [x, w, ids, t_lp]}


def time_heads(
    cases: Sequence[shapes.Case],
    dtype: Any,
    *,
    reps: int,
    max_seconds: float,
    peak_tflops: float | None = None,
    advance: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Times forward+backward of each fused head and its materialized equivalent.

    Returns one record per (case, head): ``case``, ``n``, ``d``, ``v``, ``head``,
    ``time_s``, ``temp_bytes``, ``time_ratio`` and ``temp_ratio`` (to the
    materialized row of the same case), ``err_loss`` (fused vs materialized) and
    ``status``/``reason``.
    """
    from benchmarks import measure

    records = []
    for case in cases:
        inputs = _head_inputs(case, dtype)
        for head in ("log_probs", "topk_distill"):
            make = _log_probs if head == "log_probs" else _topk
            pair = {}
            for fused in (False, True):
                name = head if fused else head + "_materialized"
                advance(f"time {case.name} / {name}")
                rec: dict[str, Any] = {
                    "case": case.name,
                    "n": case.n,
                    "d": case.d,
                    "v": case.v,
                    "head": name,
                    "status": "ok",
                    "reason": None,
                    "time_s": None,
                    "temp_bytes": None,
                    "tflops": None,
                    "time_ratio": None,
                    "temp_ratio": None,
                    "err_loss": None,
                }
                try:
                    fn = jax.value_and_grad(make(fused, case.softcap), argnums=(0, 1))
                    t = measure.time_compiled(
                        fn, tuple(inputs[head]), reps=reps, max_seconds=max_seconds
                    )
                except Exception as e:  # the table goes on
                    rec.update(status="failed", reason=f"{type(e).__name__}: {e}"[:160])
                else:
                    rec.update(time_s=t.median_s, temp_bytes=t.temp_bytes)
                    rec["tflops"] = case.flops_fwd_bwd / t.median_s / 1e12
                    pair[fused] = (rec, float(t.output[0]))
                records.append(rec)
            if len(pair) == 2:
                (base, want), (rec, got) = pair[False], pair[True]
                rec["time_ratio"] = rec["time_s"] / base["time_s"]
                if rec["temp_bytes"] is not None and base["temp_bytes"]:
                    rec["temp_ratio"] = rec["temp_bytes"] / base["temp_bytes"]
                rec["err_loss"] = abs(got - want) / max(1.0, abs(want))
    return records


def heads_table(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The timed heads as table rows."""
    header = ["case", "head", "time (ms)", "vs mat.", "temp", "vs mat.", "TFLOP/s", "rel err"]
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["case"], r["head"], r["status"], "", "", "", "", ""])
            continue
        rows.append(
            [
                f"{r['case']} ({r['n']}x{r['d']}x{r['v']})",
                r["head"],
                f"{1e3 * r['time_s']:.3g}",
                "" if r["time_ratio"] is None else f"{r['time_ratio']:.2g}x",
                fmt_bytes(r["temp_bytes"]),
                "" if r["temp_ratio"] is None else f"{r['temp_ratio']:.2g}x",
                f"{r['tflops']:.3g}",
                "" if r["err_loss"] is None else f"{r['err_loss']:.1e}",
            ]
        )
    return header, rows
