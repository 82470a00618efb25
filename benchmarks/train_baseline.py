"""Dense baseline: train ``fcos_resnet18_slim`` from scratch on the synthetic shapes set, evaluate on
val, append a row to ``benchmarks/train_baseline.csv``.

Recipe: 2000 train / 200 val images of 160 px (surgery.data), num_classes=5, AdamW lr 1e-3, weight
decay 1e-4, 100-step linear warm-up then cosine decay to 0, gradient clipping at 10, batch 8, random
horizontal flips. By default it trains for as many steps as fit in a wall-clock budget (10 min): it
times the first ``--probe`` steps and again the whole warm-up (where the schedule does not depend on
the total) and then fixes the total step count, so the cosine decay completes within the budget.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_baseline.py            # 10 min budget
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_baseline.py --steps 400

Not a test: it takes the budget plus data generation (first run) and the evaluation.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery.config.recipe import TrainSection  # noqa: E402
from surgery.data import build_dataset  # noqa: E402
from surgery.detectors.builders import ModelSpec, build_model  # noqa: E402
from surgery.measure.evaluate import evaluate  # noqa: E402
from surgery.training.train import HookBase, LoggingHook, StepInfo, Trainer, build_trainer  # noqa: E402

FIELDS = ["date", "model", "steps", "batch", "seconds", "s_per_step", "mAP", "mAP50", "torch", "threads"]
MODEL = "fcos_resnet18_slim"


class TimeBudget(HookBase):
    """Fix the total step count so training ends within ``budget_s``.

    The speed is timed over the first ``probe`` steps and timed again at the end of the warm-up
    (the LR schedule does not depend on the total before then), because on a shared machine the
    first seconds can be much slower or faster than the rest.
    """

    def __init__(self, budget_s: float, probe: int = 20, skip: int = 3) -> None:
        self.budget_s = budget_s
        self.probe = probe
        self.skip = skip  # the first steps are slower (allocator, caches): not timed
        self.s_per_step: float | None = None

    def before_train(self, trainer: Trainer) -> None:
        self.t0 = time.perf_counter()
        self.checkpoints = sorted({self.probe, max(self.probe, trainer.cfg.warmup_steps)})

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step == self.skip:
            self.t_skip = time.perf_counter()
        if trainer.step in self.checkpoints:
            now = time.perf_counter()
            self.s_per_step = (now - self.t_skip) / (trainer.step - self.skip)
            left = self.budget_s - (now - self.t0)
            trainer.total_steps = max(trainer.step + 1, trainer.step + math.floor(left / self.s_per_step))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=600.0, help="training wall-clock budget in seconds")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (instead of the budget)")
    ap.add_argument("--probe", type=int, default=20, help="steps timed to fit the budget")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--synth-root", default=None, help="synthetic data cache (default ~/.cache/surgery)")
    ap.add_argument("--out", default=None, help="also save the trained checkpoint here")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "train_baseline.csv"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    kw = dict(synth_root=args.synth_root, images=args.images, size=args.size, seed=0)
    t = time.perf_counter()
    train_set = build_dataset("synthetic", "train", train=True, hflip=0.5, **kw)
    val_set = build_dataset("synthetic", "val", train=False, **kw)
    print(f"data: {len(train_set)} train / {len(val_set)} val images, {train_set.num_classes - 1} classes "
          f"({time.perf_counter() - t:.1f} s)", flush=True)  # fmt: skip

    spec = ModelSpec(MODEL, {"num_classes": train_set.num_classes, "min_size": args.size, "max_size": args.size})
    torch.manual_seed(args.seed)
    model = build_model(spec)
    provisional = args.steps or 10**6  # replaced by TimeBudget during the warm-up
    cfg = TrainSection(
        steps=provisional, batch_size=args.batch, optimizer="adamw", lr=args.lr, weight_decay=1e-4,
        warmup_steps=100, schedule="cosine", clip_grad=10.0, hflip=0.5, log_every=25, checkpoint_every=0,
        seed=args.seed,
    )  # fmt: skip
    budget = TimeBudget(args.budget, args.probe) if args.steps is None else None

    def log(info: StepInfo) -> None:
        losses = " ".join(f"{k[:4]} {v:.3f}" for k, v in info.losses.items())
        print(f"step {info.step:5d}/{info.total:<5d} loss {info.loss:.3f} ({losses}) lr {info.lr:.2e} "
              f"{info.images_per_s:.1f} img/s  {info.seconds:.0f}s", flush=True)  # fmt: skip

    hooks: list[HookBase] = [LoggingHook(log)]
    if budget is not None:
        hooks.insert(0, budget)
    trainer = build_trainer(model, spec, train_set, cfg, out=args.out, hooks=hooks)
    result = trainer.train()
    print(f"trained {result.steps} steps in {result.seconds:.1f} s ({result.s_per_step:.3f} s/step)", flush=True)

    t = time.perf_counter()
    ev = evaluate(model, val_set, batch_size=8)
    print(f"eval on {ev.num_images} val images ({time.perf_counter() - t:.1f} s): "
          f"mAP {ev.metrics['mAP']:.4f}  mAP50 {ev.metrics['mAP50']:.4f}", flush=True)  # fmt: skip

    row = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": MODEL,
        "steps": result.steps,
        "batch": args.batch,
        "seconds": f"{result.seconds:.1f}",
        "s_per_step": f"{result.s_per_step:.3f}",
        "mAP": f"{ev.metrics['mAP']:.4f}",
        "mAP50": f"{ev.metrics['mAP50']:.4f}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    path = Path(args.csv)
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    print(f"appended to {path}: {row}", flush=True)


if __name__ == "__main__":
    main()
