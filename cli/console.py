import re
from typing import Any

from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape

# C0/C1 control characters (ESC starts the sequences that clear the screen, colour text or set the
# window title; a newline forges a line such as "error: ...") and the bidi overrides that reorder text
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
SHOWN_LIMIT = 200  # characters of one value from a file (a name, a path) shown in a line
LINE_LIMIT = 4000  # characters of one printed string before it is shortened


def _escaped(ch: str) -> str:
    code = ord(ch)
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_control(text: str, keep: str = "") -> str:
    """``text`` with control characters written as ``\\x1b``, ``\\n``... (except those in ``keep``)."""
    return _CONTROL.sub(lambda m: m.group() if m.group() in keep else _escaped(m.group()), text)


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def plain(value: Any, limit: int = SHOWN_LIMIT) -> str:
    """A value read from a file (a class name, a layer name, a path, a config's ``yaml_file``) as
    text that cannot drive the terminal: control characters escaped, long values shortened. For
    places that do not interpret Rich markup (CSV, ``typer.echo``, ``markup=False``)."""
    return shorten(escape_control(str(value)), limit)


def shown(value: Any, limit: int = SHOWN_LIMIT) -> str:
    """:func:`plain` with Rich markup escaped too: the one way a value from a file enters a console
    line, table cell or note (``[red]`` in a class name stays those characters)."""
    return escape(plain(value, limit))


class SafeConsole(Console):
    """A console whose output never crashes on user strings that look like markup (a path with
    ``[/b]`` in it): such a message is printed with the markup escaped instead. Outside a terminal
    (a log file, a pipe, CI) lines are never wrapped at rich's assumed 80 columns: a note or a list
    of paths stays one line that can be grepped and copied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.is_terminal and "soft_wrap" not in kwargs:
            self.soft_wrap = True

    def render_str(self, text: str, *args: Any, **kwargs: Any) -> Any:
        """Every string this console renders (lines, table cells, status) has its control characters
        escaped, newlines and tabs kept: a value that skipped :func:`shown` still cannot send ESC."""
        return super().render_str(shorten(escape_control(text, keep="\n\t"), LINE_LIMIT), *args, **kwargs)

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
