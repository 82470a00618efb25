"""``surgery eval CKPT``: COCO metrics (and VOC mAP@0.5 on VOC data) as a table, JSON or CSV;
``--json`` writes the metrics, ``--detections`` the detections (COCO results format)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .console import console, err_console
from .display import TaskProgress
from .table import FORMAT_HELP, Column, machine_readable, render

DATA_HELP = "synthetic | coco:ROOT | voc:ROOT | yolo:DATA_YAML | a dataset folder | a COCO .json (default: the checkpoint's recipe)."
MAIN_METRICS = ("mAP", "mAP50", "segm_mAP", "kp_mAP", "voc_mAP50")


def eval_command(
    ckpt: Path = typer.Argument(..., help="A surgery checkpoint (dense, structured or masked) or an exported .onnx file."),
    data: str | None = typer.Option(None, "--data", help=DATA_HELP),
    split: str = typer.Option("val", "--split", help="train / val (VOC: also trainval, test)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Images per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help=".onnx files: onnxruntime or openvino."),
    precision: str = typer.Option("f32", "--precision", help="--runtime openvino: f32, bf16 or f16."),
    max_images: int | None = typer.Option(None, "--max-images", min=1, help="Evaluate only the first N images."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the metrics (and what was evaluated) to this JSON file."),
    detections: Path | None = typer.Option(None, "--detections", help="Write the detections (COCO results format) to this file."),
    fmt: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP),
) -> None:
    """Evaluate a checkpoint with COCO metrics (mAP@[.5:.95], mAP50, ..., AR)."""
    from surgery.data import dataset_for
    from surgery.deployment.runtime import load_detector
    from surgery.measure.evaluate import evaluate
    from surgery.storage.atomic import atomic_open

    out = err_console if machine_readable(fmt) else console  # json/csv: stdout is only the data
    model, info = load_detector(ckpt, device=device, runtime=runtime, precision=precision)
    recipe_data = (info.recipe or {}).get("data")  # the synthetic set the checkpoint was trained on
    with TaskProgress("preparing data", out=out) as bar:
        dataset = dataset_for(recipe_data, split, train=False, source=data, progress=bar.update)
    model_classes = info.spec.kwargs.get("num_classes")
    if model_classes is not None and int(model_classes) != dataset.num_classes:
        out.print(
            f"[yellow]warning:[/] the model has {model_classes} classes (with background), the dataset "
            f"{dataset.num_classes}; labels the dataset does not have are ignored"
        )
    with TaskProgress("evaluating", out=out) as bar:
        result = evaluate(model, dataset, batch_size=batch_size, device=device, max_images=max_images,
                          results_file=detections, progress=bar.update)
    ips = result.num_images / result.inference_seconds if result.inference_seconds > 0 else float("nan")
    summary = {"checkpoint": str(ckpt), "dataset": dataset.name, "split": dataset.split, **result.to_dict(),
               "images_per_s": ips}
    if json_out is not None:
        with atomic_open(json_out, "w") as f:
            json.dump(summary, f, indent=2)
    rows = [{"metric": k, "value": None if k in result.undefined else round(v, 6)} for k, v in result.metrics.items()]
    if machine_readable(fmt):
        render(rows, ["metric", "value"], fmt, extra={k: v for k, v in summary.items() if k != "metrics"})
    else:
        console.print(f"[bold]{ckpt}[/] on {dataset.name} / {dataset.split} ({result.num_images} images)",
                      soft_wrap=True, highlight=False)
        render(rows, ["metric", Column("value", justify="right", fmt=lambda v: f"{v:.4f}")])
    out.print(
        f"{result.num_detections} detections, {result.seconds:.1f} s in all, model {ips:.1f} images/s on {device}"
        + (f" ({model.runtime} {model.precision})" if hasattr(model, "runtime") else "")
        + (" ('-': no ground truth in that size range)" if result.undefined else ""), highlight=False
    )
    for what, path in (("metrics", json_out), ("detections", detections)):
        if path is not None:
            out.print(f"{what} written to {path}", soft_wrap=True, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
