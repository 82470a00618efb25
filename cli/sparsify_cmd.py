"""``surgery sparsify``: sparse training before the cut (group lasso over the coupled groups, plus
norm-gamma L1), options and display over :func:`surgery.workflows.sparsify_checkpoint`."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import run_out as _run_out
from .display import TrainDisplay, print_train_summary
from .train_options import (
    BATCH,
    CKPT_EVERY,
    DATA,
    DEVICE,
    EVAL,
    LR,
    OUT_HELP,
    RESUME,
    WORKERS,
    interrupt_note,
    overrides,
)


def sparsify(
    ckpt: Path = typer.Argument(..., help="A dense surgery checkpoint (before the cut)."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe YAML (prune.sparsify and the 'retrain' optimizer; default: the checkpoint's)."),
    data: str = DATA,
    steps: int = typer.Option(None, "--steps", min=1, help="Sparse training steps (prune.sparsify.steps)."),
    ratio: float = typer.Option(None, "--ratio", help="Target the channels a cut at this ratio removes (without it or a MACs target every channel is penalised)."),
    target_macs: float = typer.Option(None, "--keep-macs", "--target-macs", help="Target the channels of the cut that keeps this fraction of the MACs."),
    weight: float = typer.Option(None, "--weight", help="Group-lasso strength (prune.sparsify.weight)."),
    norm_weight: float = typer.Option(None, "--norm-weight", help="Norm-gamma L1 strength, network slimming (prune.sparsify.norm_weight)."),
    batch_size: int = BATCH,
    lr: float = LR,
    device: str = DEVICE,
    out: Path = typer.Option(None, "--out", "-o", help=OUT_HELP.format(root="runs/sparsify")),
    resume: bool = RESUME,
    eval_: bool = EVAL,
    checkpoint_every: int = CKPT_EVERY,
    workers: int = WORKERS,
) -> None:
    """Sparse training before the cut: group lasso over coupled groups (+ norm-gamma L1), targeted at
    the channels the cut removes; then `surgery prune` the result."""
    from surgery.pruning.sparsify import check_target_ratio
    from surgery.storage.checkpoint import read_checkpoint
    from surgery.training.train import destroy_distributed, init_distributed
    from surgery.workflows import recipe_for_checkpoint, sparsify_checkpoint

    check_target_ratio(ratio)  # before the checkpoint is read or an output folder is made
    flags = dict(batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, data=data, workers=workers)
    over = {**overrides("retrain", **flags), "prune.sparsify.steps": steps, "prune.sparsify.weight": weight,
            "prune.sparsify.norm_weight": norm_weight, "prune.target_macs": target_macs}
    rec = recipe_for_checkpoint(read_checkpoint(ckpt), recipe, over)
    out = _run_out(out, "runs/sparsify", resume)
    dist_info = init_distributed(device)
    try:
        with interrupt_note(out, dist_info.is_main), \
                TrainDisplay(f"sparsify {ckpt.stem}", enabled=dist_info.is_main) as display:  # fmt: skip
            outcome = sparsify_checkpoint(ckpt, rec, out, ratio=ratio, device=device, resume=resume, evaluate=eval_,
                                          dist_info=dist_info, callbacks=display.callbacks())
        if dist_info.is_main:
            print_train_summary(f"sparsify {ckpt.stem}", outcome)
    finally:
        destroy_distributed()


def register(app: typer.Typer) -> None:
    app.command("sparsify")(sparsify)
