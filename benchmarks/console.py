"""Console output: a progress bar and titled tables (``rich``, from the ``bench`` extra;
without it plain lines)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any


class Console:
    """``total`` steps for the bar (None: no bar); ``quiet`` prints nothing.
    :meth:`advance` may be called from another thread (the targets' reader)."""

    def __init__(self, total: int | None = None, quiet: bool = False) -> None:
        self.quiet, self.done, self.total = quiet, 0, total
        self._lock, self._out, self._bar = threading.Lock(), None, None
        try:
            import rich.console
            import rich.progress
        except ImportError:
            return
        # Logs and CI are no terminal: do not squeeze tables to 80 columns there.
        self._out = rich.console.Console(quiet=quiet)
        self._out.width = self._out.width if self._out.is_terminal else 170
        if total and not quiet:
            p = rich.progress
            columns = (p.TextColumn("{task.description}"), p.BarColumn(),
                       p.MofNCompleteColumn(), p.TimeElapsedColumn())  # fmt: skip
            self._bar = p.Progress(*columns, console=self._out, transient=True)
            self._bar.start()
            self._task = self._bar.add_task("starting", total=total)

    def log(self, message: str) -> None:
        """A line above the bar."""
        if self._out is not None:
            self._out.print(message, markup=False, highlight=False)
        elif not self.quiet:
            print(message, flush=True)

    def advance(self, description: str) -> None:
        """One step done."""
        with self._lock:
            self.done += 1
            if self._bar is not None:
                self._bar.update(self._task, advance=1, description=description[:60])
            elif self._out is None and not self.quiet and self.total:
                print(f"[{self.done}/{self.total}] {description}", flush=True)

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A titled table; the first two columns (names) left-aligned."""
        if self.quiet or not rows:
            return
        if self._out is None:
            for line in (title, *("  ".join(map(str, r)) for r in (header, *rows))):
                print(line)
            return
        import rich.table

        grid: Any = rich.table.Table(title=title, title_justify="left")
        for i, h in enumerate(header):
            grid.add_column(h, justify="left" if i < 2 else "right")
        for cells in rows:
            grid.add_row(*cells)
        self._out.print(grid)

    def close(self) -> None:
        """Stops the bar."""
        if self._bar is not None:
            self._bar.stop()
