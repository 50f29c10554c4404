"""PNG plots of a results document (matplotlib, Agg backend; optional).

* ``vocab_sweep.png`` / ``token_sweep.png``: forward+backward time and compiled temp
  memory against the vocabulary size / the number of tokens, one line per contender.
* ``models.png``: time and temp-memory ratio to the materialized optax baseline per
  model head and contender (forward+backward).

Without matplotlib, :func:`write_plots` returns no paths and the caller says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.contenders import BASELINE

_SWEEPS: dict[str, tuple[str, str]] = {
    "vocab_sweep": ("v", "vocabulary size V"),
    "token_sweep": ("n", "tokens N"),
}


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = ("o", "^", "v", "D", "P", "X", "*", "<", ">")


def _style(name: str, index: int) -> dict[str, Any]:
    # Distinct markers and decreasing widths, so coinciding lines stay visible.
    if name == BASELINE:
        return {"color": "black", "linestyle": "--", "marker": "s", "linewidth": 2.5, "zorder": 1}
    return {
        "marker": _MARKERS[index % len(_MARKERS)],
        "linewidth": max(0.8, 2.2 - 0.25 * index),
        "markersize": max(4.0, 8.0 - 0.6 * index),
        "zorder": 2 + index,
    }


def _sweep_plot(doc: dict[str, Any], group: str, path: Path) -> bool:
    key, xlabel = _SWEEPS[group]
    recs = [
        r
        for r in doc["results"]
        if r["group"] == group and r["mode"] == "fwd_bwd" and r["status"] == "ok"
    ]
    if not recs:
        return False
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(dict.fromkeys(r["contender"] for r in recs))
    for i, name in enumerate(names):
        pts = sorted(((r[key], r) for r in recs if r["contender"] == name), key=lambda p: p[0])
        xs = [x for x, _ in pts]
        style = _style(name, i)
        ax_t.plot(xs, [r["time_s"] * 1e3 for _, r in pts], label=name, **style)
        mem = [(x, r["temp_bytes"] / 2**20) for x, r in pts if r["temp_bytes"]]
        if mem:
            ax_m.plot(*zip(*mem, strict=True), label=name, **style)
    first = recs[0]
    fixed = (
        f"N={first['n']}, D={first['d']}"
        if group == "vocab_sweep"
        else f"D={first['d']}, V={first['v']}"
    )
    meta = doc["meta"]
    for ax, ylabel in ((ax_t, "forward+backward time (ms)"), (ax_m, "compiled temp memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(
        f"{group.replace('_', ' ')} ({fixed}, {meta['dtype']}) on {meta['device_kind']},"
        f" jax {meta['jax_version']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _models_plot(doc: dict[str, Any], path: Path) -> bool:
    recs = [
        r
        for r in doc["results"]
        if r["group"] == "models" and r["mode"] == "fwd_bwd" and r["status"] == "ok"
    ]
    if not recs:
        return False
    plt = _pyplot()
    cases = list(dict.fromkeys(r["case"] for r in recs))
    names = list(dict.fromkeys(r["contender"] for r in recs))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, ylabel in (
        (axes[0], "time_ratio", "fwd+bwd time / optax"),
        (axes[1], "temp_ratio", "compiled temp bytes / optax"),
    ):
        for j, name in enumerate(names):
            by_case = {r["case"]: r[key] for r in recs if r["contender"] == name}
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(cases))]
            ys = [by_case.get(c) or math.nan for c in cases]
            bars = ax.bar(xs, ys, width, label=name, color="black" if name == BASELINE else None)
            ax.bar_label(bars, fmt="%.2g", fontsize=7, rotation=90, padding=2)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylim(0, 1.15 * max([1.0] + [r[key] for r in recs if r[key] is not None]))
        ax.set_xticks(range(len(cases)), cases)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=9)
    meta = doc["meta"]
    fig.suptitle(
        f"model heads, fwd+bwd, ratio to materialized optax ({meta['dtype']},"
        f" {meta['device_kind']}; lower is better; skipped contenders have no bar)"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _real_shapes_plot(doc: dict[str, Any], path: Path) -> bool:
    recs = [r for r in doc.get("real_shapes") or [] if r["status"] == "ok" and r["temp_bytes"]]
    if not recs:
        return False
    plt = _pyplot()
    cases = list(dict.fromkeys(r["case"] for r in recs))
    names = list(dict.fromkeys(r["contender"] for r in recs))
    width = 0.85 / len(names)
    fig, ax = plt.subplots(figsize=(14, 5.5))
    for j, name in enumerate(names):
        by_case = {r["case"]: r["temp_bytes"] / 2**30 for r in recs if r["contender"] == name}
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(cases))]
        ys = [by_case.get(c, math.nan) for c in cases]
        hatch = "//" if "materialized" in name or name in (BASELINE, "reference") else None
        ax.bar(xs, ys, width, label=name, hatch=hatch, edgecolor="white", linewidth=0.3)
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("compiled temporaries, fwd+bwd (GiB, log scale)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    r0, meta = recs[0], doc["meta"]
    ax.set_title(
        f"compiled temporaries at the real heads, N={r0['n']} {r0['dtype']}"
        f" ({meta['device_kind']}; compiled, not run; hatched = materialized logits)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(doc: dict[str, Any], out_dir: Path) -> list[str]:
    """Writes the plots that the document has data for; returns their file names."""
    if not matplotlib_available():
        return []
    written: list[str] = []
    jobs: Sequence[tuple[str, Any]] = (
        ("real_shapes.png", lambda p: _real_shapes_plot(doc, p)),
        ("models.png", lambda p: _models_plot(doc, p)),
        *((f"{g}.png", lambda p, g=g: _sweep_plot(doc, g, p)) for g in _SWEEPS),
    )
    for name, job in jobs:
        if job(out_dir / name):
            written.append(name)
    return written
