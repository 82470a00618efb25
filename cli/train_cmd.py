"""``surgery train`` (a dense model from scratch) and ``surgery retrain`` (a pruned / masked / dense
checkpoint): options and display over :mod:`surgery.workflows`. Under ``torchrun`` they train
data-parallel (only rank 0 draws progress and writes checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .common import parse_kv, resolve_recipe
from .common import run_out as _run_out
from .display import TrainDisplay, print_train_summary
from .train_options import (
    BATCH,
    CKPT_EVERY,
    DATA,
    DEVICE,
    EPOCHS,
    EVAL,
    EVAL_EVERY,
    KWARG,
    LR,
    OUT_HELP,
    RESUME,
    STEPS,
    WORKERS,
    interrupt_note,
    overrides,
    warmup_option,
)
from .train_options import batch_option as _batch
from .train_options import lr_option as _lr
from .train_options import steps_option as _steps


def _clear_epochs(rec: Any, section: str, steps: Any, epochs: Any) -> None:
    if steps is not None and epochs is None:
        getattr(rec, section).epochs = None


def train(
    model: str = typer.Option(None, "--model", "-m", help="Registered name or package.module:function."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe YAML file or shipped name (its 'train' section); flags override it."),
    data: str = DATA,
    steps: int = STEPS,
    epochs: float = EPOCHS,
    batch_size: int = BATCH,
    lr: float = LR,
    warmup_steps: int = warmup_option("train"),
    device: str = DEVICE,
    out: Path = typer.Option(None, "--out", "-o", help=OUT_HELP.format(root="runs/train")),
    resume: bool = RESUME,
    eval_every: int = EVAL_EVERY,
    eval_: bool = EVAL,
    checkpoint_every: int = CKPT_EVERY,
    seed: int = typer.Option(None, "--seed", help="Seed for the initial weights, data order and augmentation."),
    workers: int = WORKERS,
    kwarg: list[str] = KWARG,
    weights: str = typer.Option(None, "--weights", help="Start from these weights: a file (state dict or checkpoint) or a torchvision name."),
) -> None:
    """Train a dense detector (from scratch, or from --weights: fine-tune to your classes)."""
    from surgery.train import destroy_distributed, init_distributed
    from surgery.workflows import train_from_recipe

    flags = dict(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                 eval_every=eval_every, seed=seed, checkpoint_every=checkpoint_every, data=data, workers=workers)  # fmt: skip
    rec = resolve_recipe(recipe, {**overrides("train", **flags), "model.name": model, "model.weights": weights})
    _clear_epochs(rec, "train", steps, epochs)
    rec.model.kwargs.update(parse_kv(kwarg, "--kwarg"))
    out = _run_out(out, "runs/train", resume)
    dist_info = init_distributed(device)
    try:
        with interrupt_note(out, dist_info.is_main), \
                TrainDisplay(f"train {rec.model.name}", enabled=dist_info.is_main) as display:  # fmt: skip
            outcome = train_from_recipe(rec, out, device=device, resume=resume, evaluate=eval_,
                                        dist_info=dist_info, callbacks=display.callbacks())
        if dist_info.is_main:
            print_train_summary(f"train {rec.model.name}", outcome)
    finally:
        destroy_distributed()


def retrain(
    ckpt: Path = typer.Argument(..., help="A surgery checkpoint (structured, masked or dense)."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe YAML file or shipped name (its 'retrain' section; default: the checkpoint's)."),
    data: str = DATA,
    steps: int = _steps("retrain"),
    epochs: float = EPOCHS,
    batch_size: int = _batch("retrain"),
    lr: float = _lr("retrain"),
    warmup_steps: int = warmup_option("retrain"),
    device: str = DEVICE,
    out: Path = typer.Option(None, "--out", "-o", help=OUT_HELP.format(root="runs/retrain")),
    resume: bool = RESUME,
    eval_every: int = EVAL_EVERY,
    eval_: bool = EVAL,
    checkpoint_every: int = CKPT_EVERY,
    seed: int = typer.Option(None, "--seed", help="Seed for the data order and augmentation."),
    workers: int = WORKERS,
    sparsity: float = typer.Option(None, "--sparsity", help="Masked pruning: fraction of conv/linear weights ZEROED (magnitude; shapes kept)."),
    agp: bool = typer.Option(False, "--agp", help="Reach --sparsity gradually (Zhu & Gupta AGP) instead of at once."),
    scope: str = typer.Option(None, "--scope", help="Masking scope: layer | global (default: recipe prune.scope)."),
    teacher: str = typer.Option(None, "--teacher", help="Distill from this checkpoint ('auto': the one pruned from; 'none': off)."),
    distill_weight: float = typer.Option(None, "--distill-weight", help="Feature-imitation loss weight (retrain.distill.weight)."),
    qat: bool = typer.Option(False, "--qat", help="Quantization-aware: train with fake-quantized int8 layers (then surgery quantize)."),
    kwarg: list[str] = KWARG,
) -> None:
    """Retrain a pruned, masked or dense checkpoint; masks of masked checkpoints are kept exactly."""
    from surgery.checkpoint import read_checkpoint
    from surgery.qat import QATHook
    from surgery.train import destroy_distributed, init_distributed
    from surgery.workflows import recipe_for_checkpoint, retrain_checkpoint

    flags = dict(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                 eval_every=eval_every, seed=seed, checkpoint_every=checkpoint_every, data=data, workers=workers)  # fmt: skip
    over = {**overrides("retrain", **flags), "prune.scope": scope, "retrain.distill.teacher": teacher,
            "retrain.distill.weight": distill_weight}
    if teacher is not None:
        over["retrain.distill.type"] = "none" if teacher == "none" else "imitation"
    rec = recipe_for_checkpoint(read_checkpoint(ckpt), recipe, over)
    _clear_epochs(rec, "retrain", steps, epochs)
    out = _run_out(out, "runs/retrain", resume)
    dist_info = init_distributed(device)
    try:
        with interrupt_note(out, dist_info.is_main), \
                TrainDisplay(f"retrain {ckpt.stem}", enabled=dist_info.is_main) as display:  # fmt: skip
            outcome = retrain_checkpoint(ckpt, rec, out, device=device, resume=resume, evaluate=eval_,
                                         sparsity=sparsity, agp=agp, dist_info=dist_info,
                                         callbacks=display.callbacks(), hooks=[QATHook()] if qat else (),
                                         kwargs=parse_kv(kwarg, "--kwarg") or None)
        if dist_info.is_main:
            print_train_summary(f"retrain {ckpt.stem}", outcome)
    finally:
        destroy_distributed()


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("retrain")(retrain)
