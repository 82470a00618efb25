"""Progress of a long step (:class:`TaskProgress`) and a spinner (:func:`working`) that also read
well outside a terminal (logs, pipes, CI)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .console import console


class TaskProgress:
    """Progress of one long step (data generation, evaluation, calibration): a transient bar in a
    terminal; outside one (logs, pipes, CI) a plain ``label: done/total (eta m:ss)`` line at most
    every ``every_s`` seconds and at the end. ``update(done, total)`` is the library's callback."""

    def __init__(self, label: str, every_s: float = 10.0, out: Any = None) -> None:
        import time

        self.label = label
        self.every_s = every_s
        self.console = out or console
        self._clock = time.perf_counter
        self._t0 = self._last = self._clock()
        self._last_done = -1
        self._bar: Progress | None = None
        if self.console.is_terminal:
            self._bar = Progress(TextColumn(f"[bold]{escape(label)}[/]"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=self.console, transient=True)
            self._task = self._bar.add_task(label, total=None)

    def __enter__(self) -> TaskProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, done: float, total: int | None = None, what: str | None = None) -> None:
        """``what``: the current step, shown instead of the label (``surgery bench``: "MACs x.pt")."""
        if self._bar is not None:
            extra = {"description": f"[bold]{escape(what)}[/]"} if what else {}
            self._bar.update(self._task, completed=done, total=total, **extra)
            return
        now = self._clock()
        final = total is not None and done >= total
        if done == self._last_done or (not final and now - self._last < self.every_s):
            return
        self._last, self._last_done = now, done
        eta = ""
        if total and 0 < done < total:
            left = (now - self._t0) / done * (total - done)
            eta = f"  eta {int(left // 60)}:{int(left % 60):02d}"
        if isinstance(done, float):  # fractional progress (bench): a percentage reads better
            count = f"{100 * done / total:.0f}%" if total else f"{done:.1f}"
        else:
            count = f"{done}/{total}" if total else str(done)
        head = f"{self.label}: {what}" if what else f"{self.label}:"
        self.console.print(f"{head} {count}{eta}", markup=False, highlight=False, soft_wrap=True)


def working(text: str, quiet: bool = False) -> Any:
    """A spinner with ``text`` in a terminal; outside one, ``text…`` printed once (a log shows
    what the command is doing); nothing with ``quiet`` (json/csv on stdout)."""
    import contextlib

    if quiet:
        return contextlib.nullcontext()
    if console.is_terminal:
        return console.status(f"[bold]{escape(text)}[/]…")
    console.print(f"{text}…", markup=False, highlight=False, soft_wrap=True)
    return contextlib.nullcontext()
