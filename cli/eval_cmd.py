from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.console import console


def _progress(label: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def eval_command(
    ckpt: Path = typer.Argument(..., help="A surgery checkpoint (dense, structured or masked) or an exported .onnx file."),
    data: str | None = typer.Option(
        None, "--data", help="'synthetic', 'coco:ROOT', 'voc:ROOT' or a COCO .json (default: the checkpoint's recipe, else synthetic)."
    ),
    split: str = typer.Option("val", "--split", help="train / val (VOC: also trainval, test)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    max_images: int | None = typer.Option(None, "--max-images", min=1, help="Evaluate only the first N images."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the COCO results (detections) to this file."),
) -> None:
    """Evaluate a checkpoint with COCO metrics (mAP@[.5:.95], mAP50, ..., AR)."""
    from surgery.data import dataset_for
    from surgery.evaluate import evaluate
    from surgery.runtime import load_detector

    model, info = load_detector(ckpt, device=device)
    recipe_data = (info.recipe or {}).get("data")  # the synthetic set the checkpoint was trained on
    with _progress("preparing data") as bar:
        task = bar.add_task("data", total=None)
        dataset = dataset_for(
            recipe_data, split, train=False, source=data, progress=lambda d, t: bar.update(task, completed=d, total=t)
        )
    model_classes = info.spec.kwargs.get("num_classes")
    if model_classes is not None and int(model_classes) != dataset.num_classes:
        console.print(
            f"[yellow]warning:[/] the model has {model_classes} classes (with background), the dataset "
            f"{dataset.num_classes}; labels the dataset does not have are ignored"
        )
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    with _progress("evaluating") as bar:
        task = bar.add_task("eval", total=n)
        result = evaluate(
            model,
            dataset,
            batch_size=batch_size,
            device=device,
            max_images=max_images,
            results_file=json_out,
            progress=lambda d, t: bar.update(task, completed=d, total=t),
        )

    console.print(
        f"[bold]{ckpt}[/] on {dataset.name} / {dataset.split} ({result.num_images} images)", soft_wrap=True, highlight=False
    )
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        style = "bold" if key in ("mAP", "mAP50", "segm_mAP", "kp_mAP", "voc_mAP50") else ""
        shown = "n/a" if key in result.undefined else f"{value:.4f}"
        table.add_row(key, shown, style=style)
    console.print(table)
    ips = result.num_images / result.inference_seconds if result.inference_seconds > 0 else float("nan")
    console.print(
        f"{result.num_detections} detections, {result.seconds:.1f} s in all, model {ips:.1f} images/s on {device}"
        + (" (n/a: no ground truth in that size range)" if result.undefined else "")
    )
    if json_out is not None:
        console.print(f"results written to {json_out}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
