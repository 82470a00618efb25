"""``surgery recipes``: the recipes shipped with surgery (``--recipe NAME``, ``surgery sweep NAME``)."""

from __future__ import annotations

import typer

from .table import FORMAT_HELP, Column, render


def recipes(
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """List the shipped recipes: pass a name to --recipe or to `surgery sweep` from any folder."""
    from surgery.config.catalog import list_recipes

    rows = [{"name": e.name, "about": e.summary, "path": str(e.path)} for e in list_recipes()]
    render(rows, [Column("name"), Column("about"), Column("path")], fmt,
           title="Recipes (a file path given to --recipe wins over a name)")


def register(app: typer.Typer) -> None:
    app.command("recipes")(recipes)
