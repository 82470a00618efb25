from typing import Any

from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape


class SafeConsole(Console):
    """A console whose output never crashes on user strings that look like markup (a path with
    ``[/b]`` in it): such a message is printed with the markup escaped instead. Outside a terminal
    (a log file, a pipe, CI) lines are never wrapped at rich's assumed 80 columns: a note or a list
    of paths stays one line that can be grepped and copied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.is_terminal and "soft_wrap" not in kwargs:
            self.soft_wrap = True

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003
        try:
            super().print(*objects, **kwargs)
        except MarkupError:
            super().print(*(escape(o) if isinstance(o, str) else o for o in objects), **kwargs)

    def log(self, *objects: Any, **kwargs: Any) -> None:
        try:
            super().log(*objects, **kwargs)
        except MarkupError:
            super().log(*(escape(o) if isinstance(o, str) else o for o in objects), **kwargs)

    def status(self, status: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().status(status, *args, **kwargs)
        except MarkupError:
            return super().status(escape(status) if isinstance(status, str) else status, *args, **kwargs)


console = SafeConsole()
err_console = SafeConsole(stderr=True)
