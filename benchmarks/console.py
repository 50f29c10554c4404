"""Console output: a progress bar (``rich``, from the ``bench`` extra; without it, plain
lines) and titled markdown tables, ready to paste."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from benchmarks.report import md_table


class Console:
    """``total`` steps for the bar (None: no bar); ``quiet`` prints nothing.
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
            self._print = lambda *a: self._bar.console.print(*a, markup=False, highlight=False)
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
            elif not self.quiet and self.total:
                print(f"[{self.done}/{self.total}] {description}", flush=True)

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A titled markdown table (nothing when there are no rows)."""
        if rows:
            self.log("", title, "", *md_table((list(header), [list(r) for r in rows])))

    def close(self) -> None:
        """Stops the bar."""
        if self._bar is not None:
            self._bar.stop()
