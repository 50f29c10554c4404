"""The output of a run: ``<stem>.json``, tables (console and ``<stem>.md``), PNG plots
and the progress bar.

Plots (matplotlib, Agg backend; skipped without it): ``real_shapes.png``, compiled
temporaries per head and contender (log scale); ``models.png``, fwd+bwd time and temp
ratios to optax per model head; ``vocab_sweep.png`` / ``token_sweep.png``, fwd+bwd
time and temporaries against V / N.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.contenders import ROWS

SCHEMA_VERSION = 4
DOCUMENT_KEYS = ("schema_version", "meta", "real_shapes", "targets", "results")
Table = tuple[list[str], list[list[str]]]
Records = Sequence[dict[str, Any]]
ERRS = ("err_loss", "err_dx", "err_dw")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity; keep them visible
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return [_json_safe(v) for v in value] if isinstance(value, list | tuple) else value


def write(doc: dict[str, Any], out: Path, plots: bool, stem: str = "results") -> list[str]:
    """Strict JSON (non-finite floats as strings), markdown and (``plots``) the PNGs;
    returns the PNGs' names."""
    out.mkdir(parents=True, exist_ok=True)
    written = write_plots(doc, out) if plots else []
    text = json.dumps(_json_safe(doc), indent=1, allow_nan=False)
    (out / f"{stem}.json").write_text(text + "\n")
    (out / f"{stem}.md").write_text(to_markdown(doc, written))
    return written


def fmt_bytes(n: int | None) -> str:
    """``1.5 GiB``, ``260 MiB``, ``12 KiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n is not None and n >= size:
            return f"{n / size:.3g} {unit}"
    return "n/a" if n is None else f"{n} B"


def _f(value: Any, spec: str, suffix: str = "", prefix: str = "") -> str:
    return "" if value is None else f"{prefix}{value:{spec}}{suffix}"


def _ms(s: float | None) -> str:
    return "" if s is None else f"{s * 1e3:.3g}" if s < 1 else f"{s * 1e3:.0f}"


# ---- tables ---------------------------------------------------------------------------------


def _pivot(records: Records, cell: Any, column: Any) -> Table:
    """Rows: contenders; columns: cases, headed ``column(record)``; ``cell(record or None)``."""
    cases = {r["case"]: r for r in records}
    by = {(r["contender"], r["case"]): r for r in records}
    names = dict.fromkeys(r["contender"] for r in records)
    rows = [[n, *(cell(by.get((n, c))) for c in cases)] for n in names]
    return ["contender", *map(column, cases.values())], rows


def compiled_table(records: Records) -> Table:
    """Rows: contenders; columns: heads; cells: temporaries and ratio, or why not."""

    def cell(r: dict[str, Any] | None) -> str:
        if r is None or r["status"] == "ok":
            return (
                ""
                if r is None
                else fmt_bytes(r["temp_bytes"]) + _f(r["temp_ratio"], ".2g", "x)", " (")
            )
        return r["reason"].split(" (")[0] if r["status"] == "skipped" else r["status"]

    cap = lambda r: f", softcap {r['softcap']:g}" if r["softcap"] else ""
    return _pivot(records, cell, lambda r: f"{r['case']} ({r['d']}x{r['v']}{cap(r)})")


def reasons(records: Records) -> list[str]:
    """``contender (cases): reason`` for the records that did not run, deduplicated."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in (r for r in records if r["status"] != "ok"):
        cases = seen.setdefault((r["contender"], r["reason"]), [])
        cases += [] if r["case"] in cases else [r["case"]]
    return [f"{c} ({', '.join(cases)}): {why}" for (c, why), cases in seen.items()]


HEADER = (
    "case", "contender", "mode", "time (ms)", "vs base", "temp", "vs base", "device peak",
    "TFLOP/s", "% peak", "err loss", "err dx", "err dw", "budget",
)  # fmt: skip


def results_table(records: Records) -> Table:
    """The measured records; the device-peak column only where a device reports it."""
    rows = []
    for r in (r for r in records if r["status"] == "ok"):
        peak = "" if r["device_peak_bytes"] is None else fmt_bytes(r["device_peak_bytes"])
        rows.append(
            [
                r["case"] if r["group"] == "standard" else
                f"{r['case']} ({r['n']}x{r['d']}x{r['v']})",
                r["contender"], r["mode"], _ms(r["time_s"]),
                _f(r["time_ratio"], ".2g", "x"), fmt_bytes(r["temp_bytes"]),
                _f(r["temp_ratio"], ".2g", "x"),
                peak if r["device_peak_exact"] or not peak else f"≤{peak}",
                _f(r["tflops"], ".3g"), _f(r["peak_fraction"] and 100 * r["peak_fraction"], ".0f"),
                *(_f(r[k], ".1e") if not isinstance(r[k], str) else r[k] for k in ERRS),
                {True: "ok", False: "MISS", None: ""}[r["within_budget"]],
            ]
        )  # fmt: skip
    keep = [i for i, h in enumerate(HEADER) if h != "device peak" or any(row[i] for row in rows)]
    return [HEADER[i] for i in keep], [[row[i] for i in keep] for row in rows]


def summary(results: Records) -> Table:
    """Cross-entropy contenders x model heads: fwd+bwd ``time ratio / temp ratio``."""
    recs = [r for r in results if group(r) == "models" and r["mode"] == "fwd_bwd"]
    ran = {r["contender"] for r in recs if r["status"] == "ok"}

    def cell(r: dict[str, Any] | None) -> str:
        if r is None or r["status"] != "ok":
            return "skipped"
        return f"{_f(r['time_ratio'], '.2g', 'x')} / {_f(r['temp_ratio'], '.2g', 'x')}"

    column = lambda r: f"{r['case']} (N={r['n']}, D={r['d']}, V={r['v']})"
    return _pivot([r for r in recs if r["contender"] in ran], cell, column)


def md_table(table: Table) -> list[str]:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


# ---- markdown -------------------------------------------------------------------------------

COMPILED_TEXT = (
    "`temp_size_in_bytes` of `jax.jit(jax.value_and_grad(loss, (0, 1)))` compiled from"
    " `ShapeDtypeStruct`s; nothing is executed, so the materialized rows show what they"
    " *would* need. Lower is better; `(0.03x)` = ratio to the materialized equivalent"
    " (optax for cross-entropy, or `reference` where optax is not installed; the"
    " `_materialized` row of the other heads)."
)
TIMED_TEXT = (
    "- FLOPs 2·N·D·V (fwd), 6·N·D·V (fwd_bwd); `vs base` = ratio to the materialized"
    " baseline (optax; a head's `_materialized` row); temp = compiled temporaries;"
    " device peak = `peak_bytes_in_use` above the live inputs during the warm-up"
    " (GPU/TPU; `≤`: an upper bound, the process-wide peak was set earlier)",
    "- err = ‖got - want‖ / ‖want‖ against the baseline in float32 at"
    " `precision='highest'`; budget `ok`: every error ≤ 1.05 x the baseline's own"
    " error in the run dtype + 1e-6",
)
GROUPS = {
    "models": "Model heads: cross-entropy",
    "heads": "Fused heads against their materialized equivalents (forward+backward)",
    "vocab_sweep": "Vocabulary sweep (forward+backward)",
    "token_sweep": "Token sweep (forward+backward)",
    "standard": "Standard losses against optax (value_and_grad w.r.t. the logits)",
    "gpu-check": "Error budget at real heads (forward and forward+backward)",
}


def group(r: dict[str, Any]) -> str:
    """The section of a record: a model case of a head other than cross-entropy is "heads"."""
    return "heads" if r["head"] != "cross_entropy" and r["group"] == "models" else r["group"]


def compiled_section(title: str, records: Records, plot: str | None, note: Any = None) -> list[str]:
    """A compiled-temporaries table with its rows' descriptions and what did not compile."""
    if not records:
        return []
    lines = [f"## {title}", "", COMPILED_TEXT, "", *md_table(compiled_table(records)), ""]
    lines += [f"Rows left out: {note}.", ""] if note else []
    lines += [
        f"- `{n}`: {ROWS[n][1].description}" for n in dict.fromkeys(r["contender"] for r in records)
    ]
    why = reasons(records)
    lines += (["", "Not compiled:", ""] + [f"- {s}" for s in why]) if why else []
    return lines + [""] + ([f"![{plot}]({plot})", ""] if plot else [])


def to_markdown(doc: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """``results.md`` of a run (host or target; the sections it has data for)."""
    m, real, results = doc["meta"], doc.get("real_shapes") or [], doc.get("results") or []
    plot = "real_shapes.png" if "real_shapes.png" in plots else None
    if "target" in m:  # a compile-only target
        title = f"Compiled temporaries at the real heads: N={real[0]['n']}, bf16 ({m['note']})"
        lines = [f"# fusedloss benchmarks: {m['device_kind']} ({m['note']})", ""]
        lines += [f"- jax {m['jax_version']}; compiled in {m['total_seconds']:.0f} s", ""]
        return "\n".join(lines + compiled_section(title, real, plot, m["rows_note"])) + "\n"
    peak, third = (
        m["matmul_peak"],
        ", ".join(f"{k} {v or '-'}" for k, v in m["third_party"].items()),
    )
    lines = [
        f"# fusedloss benchmarks: {m['device_kind']}",
        "",
        f"- date: {m['date']}; command: `{m['command']}`; total {m['total_seconds']:.0f} s",
        f"- {m['device_kind']} ({m['platform']}); jax {m['jax_version']}, fusedloss"
        f" {m['fusedloss_version']}, Python {m['python_version']}; {third}",
        f"- suite `{m['suite']}`, {m['dtype']}; median of up to {m['reps']} interleaved"
        " rounds after a warm-up, compile excluded; matmul peak in the same run"
        f" {peak['tflops']:.3g} TFLOP/s ({'x'.join(map(str, peak['shape']))} {peak['dtype']})",
        *TIMED_TEXT,
        "",
    ]
    if real:
        title = f"Compiled temporaries at the real heads: N={real[0]['n']}, {real[0]['dtype']}"
        lines += compiled_section(f"{title} ({m['device_kind']}, compiled, not run)", real, plot)
    targets = doc.get("targets") or {"docs": [], "missing": None}
    for tm, recs in ((t["meta"], t["real_shapes"]) for t in targets["docs"]):
        title = f"{tm['device_kind']}, bf16: {tm['note']} (`results/{tm['target']}/`)"
        lines += compiled_section(title, recs, None, tm["rows_note"])
    lines += [f"Targets: {targets['missing']}", ""] if targets["missing"] else []
    if summary(results)[1]:
        lines += ["## Summary: forward+backward, time ratio / temp ratio vs optax", ""]
        lines += [*md_table(summary(results)), ""]
    for g, title in GROUPS.items():
        recs = [r for r in results if group(r) == g]
        why = reasons(recs)
        lines += [f"## {title}", "", *md_table(results_table(recs)), ""] if recs else []
        lines += (["Skipped:", ""] + [f"- {s}" for s in why] + [""]) if why else []
    if m.get("notes"):
        lines += ["Scaled cases:", ""] + [f"- `{c}`: {n}" for c, n in m["notes"].items()] + [""]
    timed = [f"![{p}]({p})" for p in plots if p != "real_shapes.png"]
    return "\n".join(lines + (["## Plots", "", *timed] if timed else [])) + "\n"


# ---- console --------------------------------------------------------------------------------


class Console:
    """``total`` steps for the bar (None, or ``rich`` not installed: no bar); ``quiet``
    prints nothing.
    :meth:`advance` may be called from another thread (the targets' reader)."""

    def __init__(self, total: int | None = None, quiet: bool = False) -> None:
        self.quiet, self.done, self.total = quiet, 0, total
        self._lock, self._bar, self._print = threading.Lock(), None, print
        try:
            from rich import progress
        except ImportError:
            return
        if total and not quiet:
            cols = (progress.TextColumn("{task.description}"), progress.BarColumn(),
                    progress.MofNCompleteColumn(), progress.TimeElapsedColumn())  # fmt: skip
            self._bar: Any = progress.Progress(*cols, transient=True)
            self._print = lambda line: self._bar.console.print(line, markup=False, soft_wrap=True)
            self._bar.start()
            self._task = self._bar.add_task("starting", total=total)

    def log(self, *lines: str) -> None:
        """Lines above the bar."""
        for line in () if self.quiet else lines:
            self._print(line)

    def advance(self, description: str) -> None:
        """One step done."""
        with self._lock:
            self.done += 1
            if self._bar is not None:
                self._bar.update(self._task, advance=1, description=description[:60])

    def table(self, title: str, table: Table) -> None:
        """A titled markdown table (nothing when it has no rows)."""
        self.log(*(["", title, "", *md_table(table)] if table[1] else []))

    def close(self) -> None:
        """Stops the bar."""
        if self._bar is not None:
            self._bar.stop()


# ---- plots ----------------------------------------------------------------------------------


def _bars(ax: Any, recs: Records, key: Any, log: bool = False) -> None:
    cases = list(dict.fromkeys(r["case"] for r in recs))
    names = list(dict.fromkeys(r["contender"] for r in recs))
    width = 0.85 / len(names)
    for j, name in enumerate(names):
        by = {r["case"]: key(r) for r in recs if r["contender"] == name}
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(cases))]
        materialized = "materialized" in name or name in ("optax", "reference")
        ax.bar(xs, [by.get(c) or math.nan for c in cases], width, label=name,
               hatch="//" if materialized else None, edgecolor="white", linewidth=0.3)  # fmt: skip
    ax.set_xticks(range(len(cases)), cases)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if log:
        ax.set_yscale("log")
    else:
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")


def write_plots(doc: dict[str, Any], out: Path) -> list[str]:
    """Writes the plots the document has data for; returns their file names."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, written = doc["meta"], []
    where = f"{m['device_kind']}" + (f", {m['note']}" if "note" in m else "")

    def save(fig: Any, title: str, name: str) -> None:
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    real = [r for r in doc.get("real_shapes") or [] if r["status"] == "ok" and r["temp_bytes"]]
    if real:
        fig, ax = plt.subplots(figsize=(13, 5.5))
        _bars(ax, real, lambda r: r["temp_bytes"] / 2**30, log=True)
        ax.set_ylabel("compiled temporaries, fwd+bwd (GiB)")
        ax.legend(fontsize=8, ncol=2, loc="upper left")
        title = f"real heads, N={real[0]['n']} {real[0]['dtype']} ({where}; hatched: materialized)"
        save(fig, title, "real_shapes.png")
    results = [
        r for r in doc.get("results") or [] if r["status"] == "ok" and r["mode"] == "fwd_bwd"
    ]
    models = [r for r in results if group(r) == "models"]
    if models:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, key in zip(axes, ("time_ratio", "temp_ratio"), strict=True):
            _bars(ax, models, lambda r, k=key: r[k])
            ax.set_ylabel(f"fwd+bwd {key.split('_')[0]} / optax")
        axes[0].legend(fontsize=8)
        save(fig, f"model heads, ratio to optax ({m['dtype']}, {where})", "models.png")
    for name, key in (("vocab_sweep", "v"), ("token_sweep", "n")):
        recs = [r for r in results if r["group"] == name]
        if not recs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for who in dict.fromkeys(r["contender"] for r in recs):
            pts = sorted((r[key], r) for r in recs if r["contender"] == who)
            xs = [x for x, _ in pts]
            axes[0].plot(xs, [r["time_s"] * 1e3 for _, r in pts], marker="o", label=who)
            axes[1].plot(xs, [(r["temp_bytes"] or math.nan) / 2**20 for _, r in pts], marker="o")
        for ax, label in zip(
            axes, ("fwd+bwd time (ms)", "compiled temporaries (MiB)"), strict=True
        ):
            ax.set(xscale="log", yscale="log", xlabel=key.upper(), ylabel=label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        r0 = recs[0]
        fixed = f"N={r0['n']}, D={r0['d']}" if key == "v" else f"D={r0['d']}, V={r0['v']}"
        save(fig, f"{name} ({fixed}, {m['dtype']}, {where})", f"{name}.png")
    return written
