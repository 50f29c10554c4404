"""PNG plots of a results document (matplotlib, Agg backend; skipped without it).

``real_shapes.png``: compiled temporaries per head and contender (log scale);
``models.png``: fwd+bwd time and temp ratios to optax per model head;
``vocab_sweep.png`` / ``token_sweep.png``: fwd+bwd time and temp against V / N.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, recs: list[dict[str, Any]], key: Any, log: bool = False) -> None:
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


def _save(plt: Any, fig: Any, title: str, path: Path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(doc: dict[str, Any], out: Path) -> list[str]:
    """Writes the plots the document has data for; returns their file names."""
    plt = _pyplot()
    if plt is None:
        return []
    m, written = doc["meta"], []
    where = f"{m['device_kind']}" + (f", {m['note']}" if "note" in m else "")
    real = [r for r in doc.get("real_shapes") or [] if r["status"] == "ok" and r["temp_bytes"]]
    if real:
        fig, ax = plt.subplots(figsize=(13, 5.5))
        _bars(ax, real, lambda r: r["temp_bytes"] / 2**30, log=True)
        ax.set_ylabel("compiled temporaries, fwd+bwd (GiB)")
        ax.legend(fontsize=8, ncol=2, loc="upper left")
        title = f"real heads, N={real[0]['n']} {real[0]['dtype']} ({where}; hatched: materialized)"
        _save(plt, fig, title, out / "real_shapes.png")
        written.append("real_shapes.png")
    results = [r for r in doc.get("results") or [] if r["status"] == "ok"]
    results = [r for r in results if r["mode"] == "fwd_bwd"]
    models = [r for r in results if r["group"] == "models" and r["head"] == "cross_entropy"]
    if models:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, key in zip(axes, ("time_ratio", "temp_ratio"), strict=True):
            _bars(ax, models, lambda r, k=key: r[k])
            ax.set_ylabel(f"fwd+bwd {key.split('_')[0]} / optax")
        axes[0].legend(fontsize=8)
        _save(plt, fig, f"model heads, ratio to optax ({m['dtype']}, {where})", out / "models.png")
        written.append("models.png")
    for group, key in (("vocab_sweep", "v"), ("token_sweep", "n")):
        recs = [r for r in results if r["group"] == group]
        if not recs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for name in dict.fromkeys(r["contender"] for r in recs):
            pts = sorted((r[key], r) for r in recs if r["contender"] == name)
            xs = [x for x, _ in pts]
            axes[0].plot(xs, [r["time_s"] * 1e3 for _, r in pts], marker="o", label=name)
            axes[1].plot(xs, [(r["temp_bytes"] or math.nan) / 2**20 for _, r in pts], marker="o")
        labels = ("fwd+bwd time (ms)", "compiled temporaries (MiB)")
        for ax, label in zip(axes, labels, strict=True):
            ax.set(xscale="log", yscale="log", xlabel=key.upper(), ylabel=label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        r0 = recs[0]
        fixed = f"N={r0['n']}, D={r0['d']}" if key == "v" else f"D={r0['d']}, V={r0['v']}"
        _save(plt, fig, f"{group} ({fixed}, {m['dtype']}, {where})", out / f"{group}.png")
        written.append(f"{group}.png")
    return written
