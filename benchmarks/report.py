"""Results document: JSON (every figure), markdown tables, and table rows for the console."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.contenders import BASELINE, CONTENDERS

SCHEMA_VERSION = 2
DOCUMENT_KEYS: tuple[str, ...] = (
    "schema_version",
    "meta",
    "cases",
    "real_shapes",
    "results",
    "heads",
    "standard_losses",
)
META_KEYS: tuple[str, ...] = (
    "date",
    "device_kind",
    "platform",
    "device_count",
    "jax_version",
    "jaxlib_version",
    "fusedloss_version",
    "python_version",
    "third_party",
    "suite",
    "dtype",
    "reps",
    "max_seconds",
    "tokens",
    "real_tokens",
    "matmul_peak",
    "contenders",
    "command",
    "total_seconds",
)
GROUP_TITLES: dict[str, str] = {
    "models": "Model heads",
    "vocab_sweep": "Vocabulary sweep (forward+backward)",
    "token_sweep": "Token sweep (forward+backward)",
}
TABLE_HEADER: tuple[str, ...] = (
    "case",
    "contender",
    "mode",
    "time (ms)",
    "vs optax",
    "temp (MiB)",
    "vs optax",
    "device peak (MiB)",
    "TFLOP/s",
    "% peak",
    "loss err",
    "grad err",
)


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Infinity; keep them visible as strings rather than dropping them.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(doc: dict[str, Any], path: Path) -> None:
    """Writes the document as strict JSON (non-finite floats become strings)."""
    path.write_text(json.dumps(_json_safe(doc), indent=1, allow_nan=False) + "\n")


# ---- formatting ------------------------------------------------------------------------


def fmt_ms(seconds: float | None) -> str:
    """Milliseconds, 3 significant digits (whole milliseconds from 1 s up)."""
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.3g}"


def fmt_mib(n_bytes: int | None) -> str:
    """Mebibytes, 3 significant digits."""
    return "" if n_bytes is None else f"{n_bytes / 2**20:.3g}"


def fmt_ratio(ratio: float | None) -> str:
    """``0.52x``."""
    return "" if ratio is None else f"{ratio:.2g}x"


def fmt_err(err: float | str | None) -> str:
    """An error in ``%.1e``; NaN stays visible."""
    if err is None:
        return ""
    if isinstance(err, str):
        return err
    return f"{err:.1e}"


def _grad_err(r: dict[str, Any]) -> float | str | None:
    errs = [r[k] for k in ("err_dx", "err_dw") if r.get(k) is not None]
    if not errs:
        return None
    floats = [e if isinstance(e, float) else float(e) for e in errs]
    return max(floats, key=lambda e: math.inf if math.isnan(e) else e)


def _peak(r: dict[str, Any]) -> str:
    if r.get("device_peak_bytes") is None:
        return ""
    text = fmt_mib(r["device_peak_bytes"])
    return text if r.get("device_peak_exact") else f"≤{text}"


def row_cells(r: dict[str, Any]) -> list[str]:
    """One measured record as table cells (see :data:`TABLE_HEADER`)."""
    pct = "" if r.get("peak_fraction") is None else f"{100 * r['peak_fraction']:.0f}"
    tflops = "" if r.get("tflops") is None else f"{r['tflops']:.3g}"
    return [
        r["case"],
        r["contender"],
        r["mode"],
        fmt_ms(r.get("time_s")),
        fmt_ratio(r.get("time_ratio")),
        fmt_mib(r.get("temp_bytes")),
        fmt_ratio(r.get("temp_ratio")),
        _peak(r),
        tflops,
        pct,
        fmt_err(r.get("err_loss")),
        fmt_err(_grad_err(r)),
    ]


def table(
    records: Sequence[dict[str, Any]], with_case: bool = True
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the measured records; the device-peak column only where reported."""
    ok = [r for r in records if r["status"] == "ok"]
    keep = [
        i
        for i, h in enumerate(TABLE_HEADER)
        if (with_case or h != "case")
        and (h != "device peak (MiB)" or any(r.get("device_peak_bytes") is not None for r in ok))
    ]
    rows = [row_cells(r) for r in ok]
    return [TABLE_HEADER[i] for i in keep], [[cells[i] for i in keep] for cells in rows]


def skipped_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """``contender (cases): reason`` lines for the skipped records, deduplicated."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in records:
        if r["status"] != "ok":
            cases = seen.setdefault((r["contender"], r["reason"]), [])
            if r["case"] not in cases:
                cases.append(r["case"])
    return [f"{c} ({', '.join(cases)}): {reason}" for (c, reason), cases in seen.items()]


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def summary(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Contender x model-head table of forward+backward ``time ratio / temp ratio``.

    Every ratio is against the optax baseline of the same case; "skipped" where the
    contender did not run.
    """
    cases = [c for c in doc["cases"] if c["group"] == "models"]
    recs = {
        (r["contender"], r["case"]): r
        for r in doc["results"]
        if r["group"] == "models" and r["mode"] == "fwd_bwd"
    }
    names = [n for n in doc["meta"]["contenders"] if any(k[0] == n for k in recs)]
    rows = []
    for name in names:
        cells = [name]
        for c in cases:
            r = recs.get((name, c["name"]))
            if r is None or r["status"] != "ok":
                cells.append("skipped")
            else:
                cells.append(f"{fmt_ratio(r['time_ratio'])} / {fmt_ratio(r['temp_ratio'])}")
        if any(cell != "skipped" for cell in cells[1:]):
            rows.append(cells)
    header = ["contender"] + [f"{c['name']} (N={c['n']}, D={c['d']}, V={c['v']})" for c in cases]
    return header, rows


def to_markdown(doc: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The results as a markdown page (``results.md``)."""
    m = doc["meta"]
    peak = m.get("matmul_peak") or {}
    third = ", ".join(f"{k} {v or 'not installed'}" for k, v in m["third_party"].items())
    lines = [
        f"# fusedloss benchmarks: {m['device_kind']}",
        "",
        f"- date: {m['date']}; command: `{m['command']}`",
        f"- device: {m['device_kind']} ({m['platform']}, {m['device_count']} device(s));"
        f" jax {m['jax_version']}, jaxlib {m['jaxlib_version']},"
        f" fusedloss {m['fusedloss_version']}, Python {m['python_version']}",
        f"- third-party contenders: {third}",
        f"- suite `{m['suite']}`, dtype {m['dtype']}; median of up to {m['reps']} timed calls"
        f" (≤ {m['max_seconds']:g} s each measurement) after a warm-up; compile excluded",
        f"- matmul peak in the same run (best of its start and end):"
        f" {peak.get('tflops', float('nan')):.3g} TFLOP/s"
        f" ({'x'.join(str(s) for s in peak.get('shape', ()))}, {peak.get('dtype', '')})",
        "- loss = mean softmax CE of `x @ w`; `fwd` = loss only, `fwd_bwd` ="
        " `value_and_grad` w.r.t. x and w; FLOPs counted as 2·N·D·V (fwd) and 6·N·D·V"
        " (fwd_bwd)",
        "- `vs optax` = ratio to the materialized baseline"
        " `optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()`"
        " of the same case and mode; temp = compiled `temp_size_in_bytes`;"
        " device peak = `peak_bytes_in_use` above the live inputs (GPU/TPU; `≤` = upper"
        " bound: the process-wide peak was set earlier)",
        "- errors = max |·| difference against a float32 `precision='highest'`"
        " materialized reference (loss; grad = max over dx, dw)",
        f"- total wall time: {m['total_seconds']:.0f} s",
        "",
    ]
    real = doc.get("real_shapes") or []
    if real:
        from benchmarks import real_shapes

        r0 = real[0]
        lines += [
            f"## Compiled temporaries at the real heads (compiled, not run): N={r0['n']},"
            f" {r0['dtype']}, forward+backward",
            "",
            "`temp_size_in_bytes` of `jax.jit(jax.value_and_grad(loss, (0, 1)))` compiled"
            " from `ShapeDtypeStruct`s for this device; nothing is executed, so the"
            " materialized rows show what they *would* need. Lower is better; `(0.03x)` ="
            " ratio to the materialized equivalent (optax for cross-entropy, the"
            " `_materialized` row of the other heads).",
            "",
        ]
        header, rows = real_shapes.table(real)
        lines += _md_table(header, rows)
        lines += ["", "Rows:", ""]
        lines += [
            f"- `{name}`: {real_shapes.description(name)}"
            for name in dict.fromkeys(r["contender"] for r in real)
        ]
        skipped = real_shapes.skipped_reasons(real)
        if skipped:
            lines += ["", "Not compiled:", ""] + [f"- {s}" for s in skipped]
        lines.append("")
        if "real_shapes.png" in plots:
            lines += ["![real_shapes.png](real_shapes.png)", ""]
            plots = [p for p in plots if p != "real_shapes.png"]
    header, rows = summary(doc)
    if rows:
        lines += [
            "## Summary: forward+backward, time ratio / temp-bytes ratio vs optax",
            "",
            "Lower is better; `1x / 1x` is the materialized optax baseline itself.",
            "",
        ]
        lines += _md_table(header, rows)
        lines.append("")
    cases = {c["name"]: c for c in doc["cases"]}
    for group, title in GROUP_TITLES.items():
        recs = [r for r in doc["results"] if r["group"] == group]
        if not recs:
            continue
        lines += [f"## {title}", ""]
        for c in (c for c in doc["cases"] if c["group"] == group):
            softcap = f", softcap {c['softcap']:g}" if c.get("softcap") else ""
            note = f" — {c['note']}" if c.get("note") else ""
            lines.append(f"- `{c['name']}`: N={c['n']}, D={c['d']}, V={c['v']}{softcap}{note}")
        lines.append("")
        header, rows = table([r for r in recs if r["case"] in cases])
        lines += _md_table(header, rows)
        skipped = skipped_lines(recs)
        if skipped:
            lines += ["", "Skipped:", ""] + [f"- {s}" for s in skipped]
        lines.append("")
    heads = doc.get("heads") or []
    if heads:
        from benchmarks import real_shapes

        lines += [
            "## Fused heads vs their materialized equivalents (timed)",
            "",
            "`value_and_grad` w.r.t. x and w of `linear_log_probs(..., return_entropy=True)`"
            " (sum of log-probs + 0.01 · sum of entropies) and of"
            f" `linear_topk_distillation_loss` (K={real_shapes.TOPK}), against the same"
            " scalar computed from materialized float32 logits; rel err = |fused -"
            " materialized| / max(1, |materialized|) of the value.",
            "",
        ]
        lines += _md_table(*real_shapes.heads_table(heads))
        lines.append("")
    std = doc.get("standard_losses") or []
    if std:
        n, v, dtype = std[0]["n"], std[0]["v"], std[0]["dtype"]
        lines += [
            "## Standard losses vs optax",
            "",
            f"`value_and_grad` of the mean loss w.r.t. `[{n}, {v}]` {dtype} logits; errors"
            " against optax in float32.",
            "",
        ]
        lines += _md_table(
            (
                "loss",
                "impl",
                "time (ms)",
                "vs optax",
                "temp (MiB)",
                "vs optax",
                "loss err",
                "grad err",
            ),
            (
                (
                    r["loss"],
                    r["impl"],
                    fmt_ms(r["time_s"]),
                    fmt_ratio(r["time_ratio"]),
                    fmt_mib(r["temp_bytes"]),
                    fmt_ratio(r["temp_ratio"]),
                    fmt_err(r["err_loss"]),
                    fmt_err(r["err_grad"]),
                )
                for r in std
                if r["status"] == "ok"
            ),
        )
        skipped = [f"{r['loss']} / {r['impl']}: {r['reason']}" for r in std if r["status"] != "ok"]
        if skipped:
            lines += ["", "Skipped:", ""] + [f"- {s}" for s in skipped]
        lines.append("")
    lines += ["## Contenders", ""]
    for name in m["contenders"]:
        c = CONTENDERS[name]
        tag = " (baseline)" if name == BASELINE else ""
        lines.append(f"- `{name}`{tag}: {c.description}")
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)
