"""Console output while the suite runs: a progress bar and a table per finished case.

Uses ``rich`` when installed, else ``tqdm`` for the bar and plain text tables, else
plain text only. ``quiet`` prints nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.report import skipped_lines, table
from benchmarks.shapes import Case


def _plain_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(*rows, strict=True)]
    lines = ("  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(lines)


class Console:
    """A :class:`benchmarks.runner.Listener` that draws progress and case tables.

    Args:
      total: number of ``(case, contender)`` steps, for the progress bar (None: no
        bar, tables and lines only).
      quiet: print nothing.
    """

    def __init__(self, total: int | None, quiet: bool = False) -> None:
        self.quiet = quiet
        self._rich: Any = None
        self._out: Any = None  # rich.console.Console
        self._progress: Any = None
        self._task: Any = None
        self._tqdm: Any = None
        if quiet:
            return
        try:
            import rich.console
            import rich.progress
            import rich.table
        except ImportError:
            pass
        else:
            self._rich = rich
            self._out = rich.console.Console()
            if not self._out.is_terminal:  # logs and CI: do not squeeze tables to 80 columns
                self._out = rich.console.Console(width=160)
            if total is not None:
                self._progress = rich.progress.Progress(
                    rich.progress.TextColumn("{task.description}"),
                    rich.progress.BarColumn(),
                    rich.progress.MofNCompleteColumn(),
                    rich.progress.TimeElapsedColumn(),
                    console=self._out,
                    transient=True,
                )
                self._progress.start()
                self._task = self._progress.add_task("starting", total=total)
            return
        if total is None:
            return
        try:
            import tqdm
        except ImportError:
            return
        self._tqdm = tqdm.tqdm(total=total, file=sys.stderr, leave=False)

    def log(self, message: str) -> None:
        """Prints a line above the bar."""
        if self.quiet:
            return
        if self._out is not None:
            self._out.print(message, markup=False, highlight=False)
        elif self._tqdm is not None:
            self._tqdm.write(message)
        else:
            print(message, flush=True)

    def advance(self, description: str) -> None:
        """Moves the bar by one step."""
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=description)
        elif self._tqdm is not None:
            self._tqdm.set_description_str(description)
            self._tqdm.update(1)
        elif not self.quiet:
            print(f"  done: {description}", flush=True)

    def case_done(self, case: Case, records: Sequence[dict[str, Any]]) -> None:
        """Prints the case's table (and why contenders were skipped)."""
        if self.quiet:
            return
        header, rows = table(records, with_case=False)
        self.print_table(case.name, header, rows)
        for line in skipped_lines(records):
            self.log(f"  skipped {line}")

    def print_table(
        self,
        title: str,
        header: Sequence[str],
        rows: Sequence[Sequence[str]],
        name_columns: int = 2,
    ) -> None:
        """Prints a titled table; the first ``name_columns`` are left-aligned."""
        if self.quiet:
            return
        if self._out is not None:
            grid = self._rich.table.Table(title=title, title_justify="left")
            for i, h in enumerate(header):
                # Names on the left, numbers on the right.
                grid.add_column(h, justify="left" if i < name_columns else "right")
            for cells in rows:
                grid.add_row(*cells)
            self._out.print(grid)
            return
        self.log(title)
        for line in _plain_table([list(header), *rows]).splitlines():
            self.log(line)

    def close(self) -> None:
        """Stops the bar."""
        if self._progress is not None:
            self._progress.stop()
        if self._tqdm is not None:
            self._tqdm.close()
