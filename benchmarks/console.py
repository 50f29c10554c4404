"""Console output: a progress bar and titled tables (``rich`` if installed, else plain)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any


class Console:
    """``total`` steps for the bar (None: no bar); ``quiet`` prints nothing.
    :meth:`advance` may be called from another thread (the targets' reader)."""

    def __init__(self, total: int | None = None, quiet: bool = False) -> None:
        self.quiet, self.done, self.total = quiet, 0, total
        self._lock = threading.Lock()
        self._rich: Any = None
        self._bar: Any = None
        if quiet:
            return
        try:
            import rich.console
            import rich.progress
            import rich.table
        except ImportError:
            return
        self._rich = rich
        self._out = rich.console.Console()
        if not self._out.is_terminal:  # logs and CI: do not squeeze tables to 80 columns
            self._out = rich.console.Console(width=170)
        if total:
            self._bar = rich.progress.Progress(
                rich.progress.TextColumn("{task.description}"),
                rich.progress.BarColumn(),
                rich.progress.MofNCompleteColumn(),
                rich.progress.TimeElapsedColumn(),
                console=self._out,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("starting", total=total)

    def log(self, message: str) -> None:
        """A line above the bar."""
        if self.quiet:
            return
        if self._rich:
            self._out.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def advance(self, description: str) -> None:
        """One step done."""
        with self._lock:
            self.done += 1
            if self._bar is not None:
                self._bar.update(self._task, advance=1, description=description[:60])
            elif not self.quiet and self.total:
                print(f"[{self.done}/{self.total}] {description}", flush=True)

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A titled table; the first two columns (names) left-aligned."""
        if self.quiet or not rows:
            return
        if self._rich:
            grid = self._rich.table.Table(title=title, title_justify="left")
            for i, h in enumerate(header):
                grid.add_column(h, justify="left" if i < 2 else "right")
            for cells in rows:
                grid.add_row(*cells)
            self._out.print(grid)
            return
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
        self.log(title)
        for cells in (header, *rows):
            self.log("  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)))

    def close(self) -> None:
        """Stops the bar."""
        if self._bar is not None:
            self._bar.stop()
