from __future__ import annotations

from pathlib import Path

import typer

from .console import console
from .display import TaskProgress
from .outputs import OVERWRITE_HELP, overwriting, refuse_existing

data_app = typer.Typer(help="Datasets: generate the built-in synthetic shapes set.", no_args_is_help=True)


@data_app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write (new or empty; --overwrite replaces a previous set)."),
    images: int = typer.Option(2000, "--images", help="Training images (val gets a tenth, at least 20)."),
    size: int = typer.Option(160, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same dataset (byte for byte)."),
    val_images: int | None = typer.Option(None, "--val-images", help="Validation images (default: max(20, images/10))."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Generate the synthetic shapes dataset (4 classes, COCO format) into --out."""
    from surgery.data import SYNTH_CLASSES, synthesize

    with overwriting(overwrite):
        refuse_existing(out, "--out", folder=True, hint=", or another folder")

    with TaskProgress("generating") as bar:
        info = synthesize(out, images=images, size=size, seed=seed, val_images=val_images, progress=bar.update)

    n = info.images + info.val_images
    console.print(f"[bold]Synthetic shapes[/] ({', '.join(SYNTH_CLASSES)}) in {info.root}", soft_wrap=True)
    rows = [
        ("train images", f"{info.train_dir}  ({info.images} images, {info.train_objects} objects)"),
        ("val images", f"{info.val_dir}  ({info.val_images} images, {info.val_objects} objects)"),
        ("train json", str(info.train_json)),
        ("val json", str(info.val_json)),
        ("samples", str(info.samples)),
    ]
    for what, where in rows:  # paths are never wrapped, so they can be copied
        console.print(f"  [bold]{what:<13}[/]{where}", soft_wrap=True, highlight=False)
    console.print(
        f"{n} images of {info.size}x{info.size} px in {info.seconds:.1f} s "
        f"({1000 * info.seconds / max(n, 1):.1f} ms/image). Use it with [bold]--data coco:{info.root}[/]",
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
