"""The performance page's tables and plots, read from ``benchmarks/results/*/`` at build time.

mkdocs hook (``mkdocs.yml``, ``hooks:``). Each committed ``results.json`` is turned into
markdown by the benchmark suite's own formatter (``benchmarks.report.to_markdown``)
and replaces the ``<!-- benchmark results -->`` line of ``performance.md``; the PNG
plots beside it are copied into the site. The host's run comes first, then each
compile-only target. Nothing is pasted by hand, so the page is as fresh as the
committed results.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

MARKER = "<!-- benchmark results -->"
PAGE = "performance.md"


def _results_dirs(config: Any) -> list[Path]:
    root = Path(config["config_file_path"]).parent / "benchmarks" / "results"
    dirs = sorted(p.parent for p in root.glob("*/results.json"))
    # The host's run (timed) first, then the compile-only targets (not run).
    return sorted(dirs, key=lambda d: "target" in _meta(d))


def _meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "results.json").read_text())["meta"]


def _section(directory: Path) -> list[str]:
    from benchmarks import report

    doc = json.loads((directory / "results.json").read_text())
    meta = doc["meta"]
    plots = sorted(p.name for p in directory.glob("*.png"))
    if "target" in meta:
        where = (
            f"**Compiled for {meta['device_kind']}, not run**: XLA's compiler for that chip "
            "ran on this project's CPU-only host; the numbers are the compiled program's "
            "planned temporaries, and say nothing about speed."
        )
    else:
        doc = {**doc, "targets": None}  # each target has a section of its own below
        where = (
            f"**Timed on the machine that ran the suite** (`{meta['device_kind']}`, platform "
            f"`{meta['platform']}`); its compiled tables were compiled for it, not run."
        )
    text = report.to_markdown(doc, plots)
    # One level below the page's title; plots relative to the page.
    text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
    measured = "compiled for the target, not run" if "target" in meta else "on the host"
    text = re.sub(
        r"!\[([^\]]*)\]\(([^)/]+\.png)\)",
        lambda m: (
            f"![{m.group(1)}: {meta['device_kind']}, {measured}]"
            f"(results/{directory.name}/{m.group(2)})"
        ),
        text,
    )
    first, _, rest = text.partition("\n")
    source = f"Source: `benchmarks/results/{directory.name}/results.json`."
    return [first, "", where, source, rest]


def on_config(config: Any) -> Any:
    # ``benchmarks`` is a package at the repository root, beside mkdocs.yml.
    root = str(Path(config["config_file_path"]).parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def on_files(files: Files, config: Any) -> Files:
    for directory in _results_dirs(config):
        for png in sorted(directory.glob("*.png")):
            uri = f"results/{directory.name}/{png.name}"
            files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lacks the line {MARKER!r} that the results replace")
    sections = ["\n".join(_section(d)) for d in _results_dirs(config)]
    return markdown.replace(MARKER, "\n".join(sections))
