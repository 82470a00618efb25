from __future__ import annotations

import typer
from rich.table import Table

from .console import console


def models() -> None:
    """List the detectors surgery can build (torchvision's and the project's own)."""
    from surgery.detectors.builders import is_torchvision_model, list_models

    table = Table(title="Detectors")
    table.add_column("name")
    table.add_column("source")
    for name in list_models():
        table.add_row(name, "torchvision" if is_torchvision_model(name) else "surgery")
    console.print(table)
    console.print("User-built detectors: pass [bold]package.module:function[/] as the model.")


def register(app: typer.Typer) -> None:
    app.command("models")(models)
