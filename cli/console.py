from typing import Any

from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape


class SafeConsole(Console):
    """A console whose output never crashes on user strings that look like markup (a path with
    ``[/b]`` in it): such a message is printed with the markup escaped instead."""

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
