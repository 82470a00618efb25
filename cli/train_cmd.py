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
    from surgery.training.train import destroy_distributed, init_distributed
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
    engine: str = typer.Option(
        "surgery", "--engine",
        help="surgery (its own trainer) or ultralytics: Ultralytics' own training loop on the pruned YOLO, widths kept "
        "(--data yolo:DATA_YAML, --epochs; -k passes Ultralytics train arguments, e.g. -k lr0=0.002 -k device=0,1).",
    ),
) -> None:
    """Retrain a pruned, masked or dense checkpoint; masks of masked checkpoints are kept exactly."""
    if engine == "ultralytics":
        unused = {"--steps": steps, "--warmup-steps": warmup_steps, "--resume": resume or None, "--eval-every": eval_every,
                  "--checkpoint-every": checkpoint_every, "--sparsity": sparsity, "--agp": agp or None, "--scope": scope,
                  "--teacher": teacher, "--distill-weight": distill_weight, "--qat": qat or None, "--recipe": recipe}  # fmt: skip
        _retrain_ultralytics(ckpt, data=data, epochs=epochs, batch_size=batch_size, lr=lr, device=device, out=out,
                             seed=seed, workers=workers, evaluate=eval_, kwarg=kwarg,
                             unused=[k for k, v in unused.items() if v is not None])  # fmt: skip
        return
    if engine != "surgery":
        from surgery.errors import RecipeError

        raise RecipeError(f"--engine {engine!r}: expected surgery or ultralytics")
    from surgery.storage.checkpoint import read_checkpoint
    from surgery.training.qat import QATHook
    from surgery.training.train import destroy_distributed, init_distributed
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


def _retrain_ultralytics(ckpt: Path, *, data: str | None, epochs: float | None, batch_size: int | None,
                         lr: float | None, device: str | None, out: Path | None, seed: int | None, workers: int | None,
                         evaluate: bool, kwarg: list[str], unused: list[str]) -> None:
    """``retrain --engine ultralytics``: Ultralytics' trainer on the checkpoint's network, widths kept."""
    from surgery.data.sources import normalize_source
    from surgery.errors import RecipeError
    from surgery.storage.checkpoint import load_checkpoint
    from surgery.yolo.ultralytics_adapter import UltralyticsDetector

    if unused:
        raise RecipeError(f"{', '.join(unused)} do not apply to --engine ultralytics (Ultralytics' own loop and "
                          "settings; pass its arguments with -k, e.g. -k warmup_epochs=1)")  # fmt: skip
    if epochs is None:
        raise RecipeError("--engine ultralytics trains whole epochs: pass --epochs N")
    model, rec = load_checkpoint(ckpt)
    if not isinstance(model, UltralyticsDetector):
        raise RecipeError(f"--engine ultralytics retrains Ultralytics YOLOs; {ckpt} holds {type(model).__name__}")
    if rec.kind == "masked":
        raise RecipeError(f"{ckpt} is masked: Ultralytics' trainer would not keep its zeros (use --engine surgery)")
    source = normalize_source(data or ((rec.recipe or {}).get("data") or {}).get("source") or "synthetic")
    if not source.startswith("yolo:"):
        raise RecipeError(f"--engine ultralytics reads YOLO-format data (--data yolo:DATA_YAML), got {source}; "
                          f"write one with: surgery data convert {source} --to yolo --out DIR")  # fmt: skip
    from surgery.yolo.ultralytics_trainer import retrain_with_ultralytics, ultralytics_device

    args: dict[str, object] = {"epochs": max(1, round(epochs)), "val": evaluate}
    for key, value in (("batch", batch_size), ("lr0", lr), ("seed", seed), ("workers", workers),
                       ("device", ultralytics_device(device) if device else None)):  # fmt: skip
        if value is not None:
            args[key] = value
    args.update(parse_kv(kwarg, "--kwarg"))
    out = _run_out(out, "runs/retrain", False)
    res = retrain_with_ultralytics(model, rec.spec, data_yaml=source[5:], out=out, kind=rec.kind, plan=rec.plan,
                                   recipe=rec.recipe, train_args=args)  # fmt: skip
    from .console import console

    maps = ", ".join(f"{k.removeprefix('metrics/')} {v:.3f}" for k, v in res.metrics.items() if "mAP" in k)
    console.print(f"retrained {ckpt.name} with Ultralytics' trainer: {res.params:,} parameters (widths kept)"
                  + (f", {maps}" if maps else ""), highlight=False, markup=False)  # fmt: skip
    for what, where in (("checkpoint", res.checkpoint), ("ultralytics", res.handed_back), ("run", res.run_dir)):
        console.print(f"  {what:<12}{where}", highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("retrain")(retrain)
