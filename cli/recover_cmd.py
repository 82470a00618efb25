"""``surgery recover``: label-free recovery of a pruned checkpoint from a folder of images, the dense
model as teacher (:func:`surgery.workflows.recover_checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from surgery.pruning.budget import Recovery  # torch-free: the recovery defaults, one copy

from .console import console
from .display import working

IMAGES_HELP = ("A folder of images (jpg/png/..., searched recursively), or a dataset whose images are read "
               "(coco:ROOT, voc:ROOT, a COCO/VOC folder, synthetic); labels are never read.")


def recover(
    ckpt: Path = typer.Argument(..., help="A pruned surgery checkpoint (surgery prune)."),
    images: str = typer.Option(..., "--images", help=IMAGES_HELP),
    teacher: str = typer.Option("auto", "--teacher", help="The dense checkpoint to imitate; auto: the one the pruned "
                                "checkpoint records it was cut from."),
    out: Path = typer.Option(..., "--out", "-o", help="The recovered checkpoint to write."),
    batches: int = typer.Option(Recovery.batches, "--batches", min=2, help="Calibration batches read (a quarter held out to decide when to stop)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Images per batch."),
    steps: int = typer.Option(Recovery.steps, "--steps", min=0, help="At most this many optimiser steps after the least-squares re-fit."),
    seconds: float = typer.Option(Recovery.seconds, "--seconds", min=1.0, help="Wall-clock budget of the whole recovery."),
    lr: float = typer.Option(Recovery.lr, "--lr", help="Adam's learning rate."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda."),
) -> None:
    """Recover a pruned model's accuracy without labels: least-squares re-fit, then a few hundred
    steps matching the dense model's head outputs on your images (docs/howto/recover-without-labels.md)."""
    from surgery.workflows import recover_checkpoint

    with working(f"recovering {ckpt.name} on {images}"):
        done = recover_checkpoint(ckpt, images, out, teacher=teacher, batches=batches, batch_size=batch_size,
                                  steps=steps, seconds=seconds, lr=lr, device=device)
    console.print(f"teacher {done.teacher}; {done.images} images found", soft_wrap=True, highlight=False)
    console.print(reconstruct_line(done.report), soft_wrap=True, highlight=False)
    console.print(f"saved [bold]{done.path}[/]")


def reconstruct_line(report: Any) -> str:  # surgery.pruning.reconstruct.ReconstructReport
    s = report.summary()
    return (f"reconstructed on {s['calibration_images']} images ({s['held_out_images']} held out): "
            f"held-out head-output error {s['held_out_error_cut']:.4f} after the cut -> {s['held_out_error_refit']:.4f} "
            f"re-fit -> {s['held_out_error_best']:.4f} (step {s['best_step']} of {s['steps']}, stopped: {s['stopped']}), "
            f"{s['seconds']:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("recover")(recover)
