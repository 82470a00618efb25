from __future__ import annotations

from pathlib import Path

import typer

from .console import console
from .display import TaskProgress
from .outputs import OVERWRITE_HELP, overwriting, refuse_existing

data_app = typer.Typer(help="Datasets: generate the built-in synthetic shapes set, convert between COCO and YOLO layouts.",
                       no_args_is_help=True)


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


@data_app.command("convert")
def convert(
    src: str = typer.Argument(..., help="The dataset to read: coco:ROOT, voc:ROOT, yolo:DATA_YAML, or a folder/yaml recognised by its layout."),
    to: str = typer.Option(..., "--to", help="Layout to write: yolo (images/ + labels/ + data.yaml, what Ultralytics reads) or coco."),
    out: Path = typer.Option(..., "--out", help="Folder to write (new or empty; --overwrite replaces a previous one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Write a dataset in the YOLO txt layout (Ultralytics, Roboflow) or the COCO layout, from any source surgery reads."""
    import shutil

    from surgery.data.yolo_txt import convert_dataset
    from surgery.storage.safety import OutputError

    with overwriting(overwrite):
        refuse_existing(out, "--out", folder=True, hint=", or another folder")
    if overwrite and out.is_dir() and any(out.iterdir()):
        ours = {"images", "labels", "data.yaml", "annotations", "train", "val", "test"}
        others = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if others:  # --overwrite replaces a converted set, never a folder holding other things
            raise OutputError(f"--out {out} holds more than a converted dataset ({', '.join(others[:5])}): not replaced")
        shutil.rmtree(out)
    info = convert_dataset(src, out, to.lower())
    for split, n in info.images.items():
        console.print(f"  [bold]{split:<6}[/]{n} images, {info.objects[split]} objects", highlight=False)
    use = f"yolo:{info.data_yaml}" if to.lower() == "yolo" else f"coco:{info.root}"
    console.print(f"{len(info.names)} classes written to {info.root}. Use it with [bold]--data {use}[/]",
                  soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
