"""``surgery predict CKPT IMAGES... --out DIR``: boxes drawn with class names, and a JSON of the
detections, over :mod:`surgery.deployment.predict`."""

from __future__ import annotations

from pathlib import Path

import typer

from .console import console
from .display import TaskProgress
from .outputs import overwrite_allowed


def predict(
    checkpoint: Path = typer.Argument(..., help="A surgery checkpoint (.pt)."),
    images: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    out: Path = typer.Option(
        None, "--out", "-o", help="Folder for the drawn images and detections.json (default: a new runs/predict/expN)."
    ),
    score_thresh: float = typer.Option(0.3, "--score-thresh", help="Keep detections scoring at least this (0-1)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Images per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    runtime: str = typer.Option("onnxruntime", "--runtime", help=".onnx files: onnxruntime or openvino."),
    precision: str = typer.Option("f32", "--precision", help="--runtime openvino: f32, bf16 or f16."),
    draw: bool = typer.Option(True, "--draw/--no-draw", help="Write each image with its boxes."),
) -> None:
    """Detect objects in images: boxes drawn with class names, and a JSON of the detections."""
    from surgery.deployment.predict import image_files, load_predictor, predict_files, write_predictions

    if out is None:
        from surgery.training.records import next_run_dir

        out = next_run_dir("runs/predict")
    files = image_files(images)
    predictor = load_predictor(checkpoint, device, runtime=runtime, precision=precision)
    with TaskProgress("predicting") as bar:
        preds = predict_files(predictor, files, score_thresh=score_thresh, batch_size=batch_size, progress=bar.update)
    # an existing, non-empty --out was refused up front unless --overwrite (cli.outputs)
    path = write_predictions(preds, out, draw=draw, into_existing=overwrite_allowed())
    n = sum(len(p.detections) for p in preds)
    named = "" if predictor.class_names else " (the checkpoint records no class names: labels are ids)"
    console.print(f"{n} detections (score >= {score_thresh}) in {len(preds)} images{named}", highlight=False)
    console.print(f"written to {out}/ ({'drawn images, ' if draw else ''}{path.name})", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
