"""Progress for long commands that report ``(what, done, total)`` (bench, sweep stages)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cli.console import console, err_console


@contextlib.contextmanager
def progress_callback(
    label: str, every_s: float = 10.0, *, to_stderr: bool = False
) -> Iterator[Callable[[str, float, int], None]]:
    """``(what, done, total)`` progress: a bar in a terminal, a plain line every ``every_s`` seconds
    otherwise (logs, pipes, CI), so a long command never goes quiet."""
    if console.is_terminal:
        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
                   TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("loading", total=None)
            yield lambda what, done, total: bar.update(task, description=what, completed=done, total=total)
        return
    t0 = last = time.monotonic()

    def line(what: str, done: float, total: int) -> None:
        nonlocal last
        if time.monotonic() - last >= every_s or done >= total:
            last = time.monotonic()
            (err_console if to_stderr else console).print(f"{label}: {what} {100 * done / max(total, 1):.0f}% ({last - t0:.0f} s)", highlight=False)

    yield line

