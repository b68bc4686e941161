"""Progress display for long work: one rich bar per stage, with a line per inner pass.

A stage (a capture, one concept's edit-eval conditions) opens a :class:`Progress`; work nested
inside it (the GSM8K answers of one condition, a judge's ratings) reports through
:func:`subtask`, which adds a second line under the open bar and removes it when the pass ends.
Outside an enabled bar, :func:`subtask` does nothing, so library code can always call it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from typing import Any

_ACTIVE: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("dpnle_progress", default=None)


class Progress:
    """A rich progress bar over ``total`` units (a no-op when not ``enabled``).

    Rates come from the units timed in this process: ``done`` units (resumed from disk) and
    ``advance(..., timed=False)`` units (reused results) move the bar but not the rates. With
    token counts the rate reads "samples/s, tok/s"; without, "s per unit" and the time left.
    """

    def __init__(self, description: str, total: int, *, enabled: bool = True, unit: str = "sample", done: int = 0):
        self.description, self.total, self.enabled, self.unit = description, total, enabled, unit
        self.completed = done
        self._timed = 0
        self._tokens: int | None = None
        self._progress: Any = None
        self._task: Any = None
        self._reset: contextvars.Token | None = None
        self._start = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.completed,
                                                 rate="")
            self._reset = _ACTIVE.set(self)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._reset is not None:
            _ACTIVE.reset(self._reset)
            self._reset = None
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def advance(self, units: int = 1, *, tokens: int | None = None, timed: bool = True) -> None:
        """``units`` more done (``tokens`` of them, for a throughput rate); ``timed=False``:
        they took no time here (reused), so they count toward the bar but not the rates."""
        self.completed += units
        if timed:
            self._timed += units
            if tokens is not None:
                self._tokens = (self._tokens or 0) + tokens
        if self._progress is not None:
            self._progress.update(self._task, advance=units, rate=self.rate())

    def rate(self) -> str:
        """The rate column's text (empty until a unit was timed)."""
        if not self._timed:
            return ""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        if self._tokens is not None:
            return f"{self._timed / elapsed:,.1f} {self.unit}s/s  {self._tokens / elapsed:,.0f} tok/s"
        each = elapsed / self._timed
        left = each * max(self.total - self.completed, 0)
        return f"{each:.1f} s/{self.unit}, ~{left / 60:.0f} min left"

    def _add_line(self, description: str, total: int) -> _Line | None:
        if self._progress is None:
            return None
        return _Line(self._progress, description, total)


class _Line:
    """One inner pass's line under an open bar: call it with the items done; ``remove`` ends it."""

    def __init__(self, progress: Any, description: str, total: int):
        self._progress = progress
        self._task = progress.add_task(f"  {description}", total=total, rate="")
        self._start = time.perf_counter()
        self._done = 0

    def __call__(self, units: int = 1) -> None:
        self._done += units
        per_s = self._done / max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(self._task, advance=units, rate=f"{per_s:,.2f} items/s")

    def remove(self) -> None:
        self._progress.remove_task(self._task)


@contextlib.contextmanager
def subtask(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A line for an inner pass (``total`` items) under the open progress bar; yields
    ``advance(items)``. Without an enabled bar it yields a function that does nothing."""
    outer = _ACTIVE.get()
    line = outer._add_line(description, total) if outer is not None else None
    if line is None:
        yield lambda units=1: None
        return
    try:
        yield line
    finally:
        if outer._progress is not None:
            line.remove()
