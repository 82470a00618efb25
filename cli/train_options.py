"""Options and helpers ``train``, ``retrain`` and ``sparsify`` share (one definition each), and what
Ctrl-C during training says."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from surgery.config.recipe import Recipe

from .console import err_console

DATA_HELP = "synthetic | coco:ROOT | voc:ROOT | yolo:DATA_YAML | a COCO .json"
# what a recipe without a train / retrain section trains with (flags left out take the recipe's value)
_DEFAULTS = {"train": Recipe().train, "retrain": Recipe().retrain}


def _default(section: str, key: str) -> str:
    return f" (default: the recipe's, else {getattr(_DEFAULTS[section], key):g})"


def steps_option(section: str) -> Any:
    return typer.Option(None, "--steps", min=1, help="Optimizer steps (replaces the recipe's epochs)." + _default(section, "steps"))


def batch_option(section: str) -> Any:
    return typer.Option(None, "--batch-size", "-b", min=1, help="Images per step per process." + _default(section, "batch_size"))


def lr_option(section: str) -> Any:
    return typer.Option(None, "--lr", help="Peak learning rate, a pruned model's too (replaces the recipe's pruned_lr)."
                        + _default(section, "lr"))


def warmup_option(section: str) -> Any:
    return typer.Option(None, "--warmup-steps", min=0, help="Steps of linear warm-up to the peak learning rate."
                        + _default(section, "warmup_steps"))


# options both commands take (one definition each)
DATA = typer.Option(None, "--data", help=DATA_HELP)
STEPS, BATCH, LR = steps_option("train"), batch_option("train"), lr_option("train")
EPOCHS = typer.Option(None, "--epochs", help="Epochs (converted to steps).")
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


def overrides(section: str, **flags: Any) -> dict[str, Any]:
    names = ("steps", "epochs", "batch_size", "lr", "warmup_steps", "eval_every", "seed", "checkpoint_every")
    out = {f"{section}.{k}": flags.get(k) for k in names}
    out[f"{section}.pruned_lr"] = flags.get("lr")  # --lr is the peak lr, whatever the checkpoint
    out["data.source"] = flags.get("data")
    out["data.num_workers"] = flags.get("workers")
    return out


@contextlib.contextmanager
def interrupt_note(out: Path, main: bool) -> Iterator[None]:
    """Ctrl-C (SIGINT) during training: say what was kept and how to continue, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        if main:
            err_console.print(f"interrupted: {_kept(out)}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _kept(out: Path) -> str:
    from surgery.errors import SurgeryError
    from surgery.storage.checkpoint import read_checkpoint

    try:
        state = read_checkpoint(out).train_state if out.is_file() else None
    except SurgeryError:
        state = None
    if not state or "step" not in state:
        return (f"no checkpoint was saved yet ({out} holds no training state); run the same command again "
                "to start over (a lower --checkpoint-every saves more often)")
    return (f"{out} holds step {state['step']} with its optimizer and data position; run the same command "
            f"with --resume --out {out} to continue from there")
