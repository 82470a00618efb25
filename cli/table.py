"""One renderer for the CLI's result tables: a rich table whose cells are never cut (full layer
names and numbers, also when stdout is a pipe or a log file), or ``--format json|csv`` for
scripts. Commands pass rows (dicts) and the columns to show."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from .console import LINE_LIMIT, console, escape_control, shown

FORMATS = ("table", "json", "csv")
FORMAT_HELP = "table (full width, nothing cut) | json | csv (machine-readable, on stdout)."


@dataclass
class Column:
    key: str  # the row's key (and the json/csv field name)
    header: str | None = None  # shown in the table (default: key)
    justify: str = "left"
    fmt: Any = None  # value -> text for the table (json/csv get the raw value)


def check_format(fmt: str) -> str:
    from surgery.errors import RecipeError

    if fmt not in FORMATS:
        raise RecipeError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def machine_readable(fmt: str) -> bool:
    """json/csv: stdout carries only the data, everything else goes to stderr."""
    return check_format(fmt) != "table"


def _csv_value(value: Any) -> Any:
    """Strings (names from files) with control characters escaped: CSV on a terminal is still text."""
    return escape_control(value) if isinstance(value, str) else value


def _cell(col: Column, row: dict[str, Any]) -> str:
    value = row.get(col.key)
    if value is None:
        return "-"
    return col.fmt(value) if col.fmt is not None else str(value)


def render(rows: Sequence[dict[str, Any]], columns: Sequence[Column | str], fmt: str = "table", *,
           title: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """Print ``rows`` as a table, JSON (``{**extra, "rows": rows}`` when ``extra`` is given, else a
    list) or CSV (the columns' keys as the header)."""
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    check_format(fmt)
    if fmt == "json":
        data = [{c.key: r.get(c.key) for c in cols} for r in rows]
        typer.echo(json.dumps({**extra, "rows": data} if extra is not None else data, indent=2, default=str))
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([c.key for c in cols])
        for r in rows:
            writer.writerow(["" if r.get(c.key) is None else _csv_value(r.get(c.key)) for c in cols])
        typer.echo(buf.getvalue(), nl=False)
        return
    table = Table(title=escape(title) if title else None)
    for c in cols:
        # full names: a cell wider than the console folds onto a second line rather than "back…"
        table.add_column(escape(c.header or c.key), justify=c.justify, no_wrap=True, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        table.add_row(*(shown(_cell(c, r), LINE_LIMIT) for c in cols))
    print_wide(table)


def print_wide(renderable: Any) -> None:
    """Print at the renderable's natural width when stdout is not a terminal: rich would otherwise
    assume 80 columns and cut or fold cells of a log file or a pipe."""
    if console.is_terminal:
        console.print(renderable)
        return
    from rich.measure import Measurement

    from .console import SafeConsole

    width = Measurement.get(console, console.options.update_width(100_000), renderable).maximum
    wide = SafeConsole(file=console.file, width=max(console.width, width), no_color=console.no_color)
    wide.print(renderable, crop=False)
