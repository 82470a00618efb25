"""``surgery train`` (a dense model from scratch) and ``surgery retrain`` (a pruned / masked / dense
checkpoint): options and display over :mod:`surgery.workflows`. Under ``torchrun`` they train
data-parallel (only rank 0 draws progress and writes checkpoints)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from cli.common import parse_kv, resolve_recipe
from cli.common import run_out as _run_out
from cli.console import err_console
from cli.display import TrainDisplay, print_train_summary

DATA_HELP = "synthetic | coco:ROOT | voc:ROOT | a COCO .json"
# options both commands take (one definition each)
DATA = typer.Option(None, "--data", help=DATA_HELP)
STEPS = typer.Option(None, "--steps", min=1, help="Optimizer steps (replaces the recipe's epochs).")
EPOCHS = typer.Option(None, "--epochs", help="Epochs (converted to steps).")
BATCH = typer.Option(None, "--batch-size", "-b", min=1, help="Images per step per process.")
LR = typer.Option(None, "--lr", help="Peak learning rate.")
DEVICE = typer.Option("cpu", "--device", help="cpu | cuda (cuda:LOCAL_RANK under torchrun).")
RESUME = typer.Option(False, "--resume", help="Continue from --out's saved step.")
EVAL_EVERY = typer.Option(None, "--eval-every", min=0, help="Evaluate every N steps (0: only at the end).")
EVAL = typer.Option(True, "--eval/--no-eval", help="Evaluate on the validation split.")
CKPT_EVERY = typer.Option(None, "--checkpoint-every", min=0, help="Checkpoint every N steps.")
WORKERS = typer.Option(None, "--workers", min=0, help="Data loader worker processes.")
KWARG = typer.Option(None, "--kwarg", "-k", help="Builder argument KEY=VALUE (repeatable); num_classes=N with --weights "
                     "or a checkpoint keeps all but the class outputs.")
OUT_HELP = ("Checkpoint to write (default: a new run folder {root}/exp, exp2, ... with last.pt, best.pt, metrics.csv); "
            "an existing file is only continued with --resume.")


def _overrides(section: str, **flags: Any) -> dict[str, Any]:
    names = ("steps", "epochs", "batch_size", "lr", "eval_every", "seed", "checkpoint_every")
    out = {f"{section}.{k}": flags.get(k) for k in names}
    out["data.source"] = flags.get("data")
    out["data.num_workers"] = flags.get("workers")
    return out


def _clear_epochs(rec: Any, section: str, steps: Any, epochs: Any) -> None:
    if steps is not None and epochs is None:
        getattr(rec, section).epochs = None


def train(
    model: str = typer.Option(None, "--model", "-m", help="Registered name or package.module:function."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe YAML (its 'train' section); flags override it."),
    data: str = DATA,
    steps: int = STEPS,
    epochs: float = EPOCHS,
    batch_size: int = BATCH,
    lr: float = LR,
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

    flags = dict(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                 checkpoint_every=checkpoint_every, data=data, workers=workers)  # fmt: skip
    rec = resolve_recipe(recipe, {**_overrides("train", **flags), "model.name": model, "model.weights": weights})
    _clear_epochs(rec, "train", steps, epochs)
    rec.model.kwargs.update(parse_kv(kwarg, "--kwarg"))
    out = _run_out(out, "runs/train", resume)
    dist_info = init_distributed(device)
    try:
        with _interrupt_note(out, dist_info.is_main), \
                TrainDisplay(f"train {rec.model.name}", enabled=dist_info.is_main) as display:  # fmt: skip
            outcome = train_from_recipe(rec, out, device=device, resume=resume, evaluate=eval_,
                                        dist_info=dist_info, callbacks=display.callbacks())
        if dist_info.is_main:
            print_train_summary(f"train {rec.model.name}", outcome)
    finally:
        destroy_distributed()


def retrain(
    ckpt: Path = typer.Argument(..., help="A surgery checkpoint (structured, masked or dense)."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe YAML (its 'retrain' section; default: the checkpoint's)."),
    data: str = DATA,
    steps: int = STEPS,
    epochs: float = EPOCHS,
    batch_size: int = BATCH,
    lr: float = LR,
    device: str = DEVICE,
    out: Path = typer.Option(None, "--out", "-o", help=OUT_HELP.format(root="runs/retrain")),
    resume: bool = RESUME,
    eval_every: int = EVAL_EVERY,
    eval_: bool = EVAL,
    checkpoint_every: int = CKPT_EVERY,
    seed: int = typer.Option(None, "--seed", help="Seed for the data order and augmentation."),
    workers: int = WORKERS,
    sparsity: float = typer.Option(None, "--sparsity", help="Mask this fraction of conv/linear weights (magnitude)."),
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

    flags = dict(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                 checkpoint_every=checkpoint_every, data=data, workers=workers)  # fmt: skip
    over = {**_overrides("retrain", **flags), "prune.scope": scope, "retrain.distill.teacher": teacher,
            "retrain.distill.weight": distill_weight}
    if teacher is not None:
        over["retrain.distill.type"] = "none" if teacher == "none" else "imitation"
    rec = recipe_for_checkpoint(read_checkpoint(ckpt), recipe, over)
    _clear_epochs(rec, "retrain", steps, epochs)
    out = _run_out(out, "runs/retrain", resume)
    dist_info = init_distributed(device)
    try:
        with _interrupt_note(out, dist_info.is_main), \
                TrainDisplay(f"retrain {ckpt.stem}", enabled=dist_info.is_main) as display:  # fmt: skip
            outcome = retrain_checkpoint(ckpt, rec, out, device=device, resume=resume, evaluate=eval_,
                                         sparsity=sparsity, agp=agp, dist_info=dist_info,
                                         callbacks=display.callbacks(), hooks=[QATHook()] if qat else (),
                                         kwargs=parse_kv(kwarg, "--kwarg") or None)
        if dist_info.is_main:
            print_train_summary(f"retrain {ckpt.stem}", outcome)
    finally:
        destroy_distributed()


@contextlib.contextmanager
def _interrupt_note(out: Path, main: bool) -> Iterator[None]:
    """Ctrl-C (SIGINT) during training: say what was kept and how to continue, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        if main:
            err_console.print(f"interrupted: {_kept(out)}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _kept(out: Path) -> str:
    # torch loads only after an interrupt: `--help` stays torch-free
    from surgery.checkpoint import read_checkpoint
    from surgery.errors import SurgeryError

    try:
        state = read_checkpoint(out).train_state if out.is_file() else None
    except SurgeryError:
        state = None
    if not state or "step" not in state:
        return (f"no checkpoint was saved yet ({out} holds no training state); run the same command again "
                "to start over (a lower --checkpoint-every saves more often)")
    return (f"{out} holds step {state['step']} with its optimizer and data position; run the same command "
            f"with --resume --out {out} to continue from there")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("retrain")(retrain)
