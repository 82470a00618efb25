"""``surgery train`` (a dense model from scratch) and ``surgery retrain`` (a pruned / masked / dense
checkpoint). Both run :class:`surgery.train.Trainer`; under ``torchrun`` they train data-parallel
(only rank 0 draws progress and writes checkpoints)."""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cli.common import parse_kv, resolve_recipe
from cli.console import console

SHORT = {"classification": "cls", "bbox_regression": "reg", "bbox_ctrness": "ctr", "loss_classifier": "cls",
         "loss_box_reg": "box", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn"}  # fmt: skip


def _overrides(section: str, **flags: Any) -> dict[str, Any]:
    names = {"steps": "steps", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "eval_every": "eval_every",
             "seed": "seed", "checkpoint_every": "checkpoint_every"}  # fmt: skip
    out = {f"{section}.{names[k]}": v for k, v in flags.items() if k in names}
    out["data.source"] = flags.get("data")
    out["data.num_workers"] = flags.get("workers")
    return out


def _accepts(builder: Any, name: str) -> bool:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _Display:
    """Rank 0: a rich progress bar fed by LoggingHook, eval lines, a summary table. Other ranks: silent."""

    def __init__(self, title: str, enabled: bool) -> None:
        self.enabled = enabled
        self.title = title
        self.progress = Progress(
            TextColumn("[bold]{task.description}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(title, total=None, info="starting…")

    def __enter__(self) -> _Display:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.stop()

    def on_step(self, info: Any) -> None:  # StepInfo
        parts = " ".join(f"{SHORT.get(k, k)} {v:.3f}" for k, v in info.losses.items())
        text = f"loss {info.loss:.3f} ({parts})  {info.images_per_s:.1f} img/s  lr {info.lr:.2e}"
        self.progress.update(self.task, total=info.total, completed=info.step, info=text)

    def on_eval_progress(self, done: int, total: int) -> None:
        self.progress.update(self.task, description=f"{self.title} [dim](evaluating {done}/{total})[/]")

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        self.progress.update(self.task, description=self.title)
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("mAP", "mAP50") if k in metrics)
        self.progress.console.print(f"step {step}: {shown}", highlight=False)


def _summary(title: str, result: Any, out: Path, device: str, world: int) -> None:
    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    steps = f"{result.steps}" + (f" (resumed at {result.start_step})" if result.start_step else "")
    table.add_row("steps", steps)
    table.add_row("time", f"{result.seconds:.1f} s on {device}" + (f" x {world} processes" if world > 1 else ""))
    table.add_row("s / step", f"{result.s_per_step:.3f}")
    table.add_row("images / s", f"{result.images_per_s:.1f}")
    for k, v in result.losses.items():
        table.add_row(f"loss {k}", f"{v:.4f}")
    if result.losses:
        table.add_row("loss (sum)", f"{result.loss:.4f}", style="bold")
    for k in ("mAP", "mAP50", "mAP75"):
        if k in result.metrics:
            table.add_row(k, f"{result.metrics[k]:.4f}", style="bold" if k != "mAP75" else "")
    if result.sparsity is not None:
        table.add_row("weight sparsity (masked layers)", f"{result.sparsity:.1%}")
    table.add_row("kind", result.kind)
    console.print(table)
    console.print(f"saved [bold]{out}[/]", soft_wrap=True, highlight=False)


def _datasets(rec: Any, cfg: Any, eval_: bool, dist_info: Any) -> tuple[Any, Any]:
    """Train and validation sets. Under torchrun rank 0 builds (and caches) the synthetic set first."""
    import torch.distributed as dist

    from surgery.data import build_dataset

    d = rec.data
    kw: dict[str, Any] = {}
    if d.source == "synthetic":
        kw = {"synth_root": d.root, "images": d.images, "size": d.size, "seed": d.seed}

    def build() -> tuple[Any, Any]:
        status = console.status("preparing data…") if dist_info.is_main else nullcontext()
        with status:
            train_set = build_dataset(d.source, "train", train=True, hflip=cfg.hflip, **kw)
            val_set = build_dataset(d.source, "val", train=False, **kw) if eval_ else None
        return train_set, val_set

    if dist_info.distributed and dist.is_initialized():
        if dist_info.is_main:
            sets = build()
        dist.barrier()
        if not dist_info.is_main:
            sets = build()
        return sets
    return build()


def _run(
    *,
    title: str,
    model: Any,
    spec: Any,
    rec: Any,
    cfg: Any,
    train_set: Any,
    val_set: Any,
    out: Path,
    device: str,
    resume: bool,
    dist_info: Any,
    hooks: list[Any],
    **trainer_kw: Any,
) -> Any:
    from surgery.train import EvalHook, LoggingHook, Trainer

    display = _Display(title, enabled=dist_info.is_main)
    hooks = [*hooks, LoggingHook(display.on_step)]
    if val_set is not None:
        hooks.append(
            EvalHook(val_set, cfg.eval_every, progress=display.on_eval_progress, on_result=display.on_eval)
        )
    trainer = Trainer(
        model, spec, train_set, cfg, val_set=val_set, out=out, hooks=hooks, device=device, recipe=rec,
        dist_info=dist_info, num_workers=rec.data.num_workers, **trainer_kw,
    )  # fmt: skip
    if resume and dist_info.is_main:
        if out.exists():
            console.print(f"resuming from [bold]{out}[/]", soft_wrap=True, highlight=False)
        else:
            console.print(f"[yellow]--resume:[/] {out} does not exist yet; starting from step 0", soft_wrap=True)
    with display:
        result = trainer.train(resume=resume)
    if dist_info.is_main:
        _summary(title, result, out, str(trainer.device), dist_info.world_size)
    return result


def _check_classes(model_classes: Any, dataset: Any) -> None:
    from surgery.errors import DataError

    if model_classes is not None and dataset.num_classes > int(model_classes):
        raise DataError(
            f"the dataset has {dataset.num_classes} classes (with background) but the model only "
            f"{model_classes}: train a model with num_classes={dataset.num_classes} (--kwarg num_classes=N)"
        )


def train(
    model: str = typer.Option(None, "--model", "-m", help="Registered name or package.module:function."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe YAML (its 'train' section); flags override it."),
    data: str = typer.Option(None, "--data", help="synthetic | coco:ROOT | voc:ROOT | a COCO .json"),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimizer steps (replaces the recipe's epochs)."),
    epochs: float = typer.Option(None, "--epochs", help="Epochs (converted to steps)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", min=1, help="Images per step per process."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (cuda:LOCAL_RANK under torchrun)."),
    out: Path = typer.Option(Path("runs/train/model.pt"), "--out", "-o", help="Checkpoint to write (and resume)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from --out's saved step."),
    eval_every: int = typer.Option(None, "--eval-every", min=0, help="Evaluate every N steps (0: only at the end)."),
    eval_: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate on the validation split."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", min=0, help="Checkpoint every N steps."),
    seed: int = typer.Option(None, "--seed", help="Seed for the initial weights, data order and augmentation."),
    workers: int = typer.Option(None, "--workers", min=0, help="Data loader worker processes."),
    kwarg: list[str] = typer.Option(None, "--kwarg", "-k", help="Builder argument KEY=VALUE (repeatable)."),
) -> None:
    """Train a dense detector from scratch."""
    import torch

    from surgery.errors import RecipeError
    from surgery.models import ModelSpec, build_model, get_builder
    from surgery.train import destroy_distributed, init_distributed

    flags = dict(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                 checkpoint_every=checkpoint_every, data=data, workers=workers)  # fmt: skip
    rec = resolve_recipe(recipe, _overrides("train", **flags))
    cfg = rec.train
    if steps is not None and epochs is None:
        cfg.epochs = None
    rec.model.kwargs.update(parse_kv(kwarg, "--kwarg"))
    name = model or rec.model.name
    if not name:
        raise RecipeError("no model: pass --model or a recipe with model.name")
    rec.model.name = name
    dist_info = init_distributed(device)
    try:
        train_set, val_set = _datasets(rec, cfg, eval_, dist_info)
        kwargs = dict(rec.model.kwargs)
        if "num_classes" not in kwargs and _accepts(get_builder(name), "num_classes"):
            kwargs["num_classes"] = train_set.num_classes
        if rec.model.weights is not None:
            kwargs["weights"] = rec.model.weights
        rec.model.kwargs = dict(kwargs)
        _check_classes(kwargs.get("num_classes"), train_set)
        torch.manual_seed(cfg.seed)  # same seed, same initial weights
        spec = ModelSpec(name, kwargs)
        net = build_model(spec)
        if "weights" in spec.kwargs:  # the checkpoint holds the weights: rebuild without them
            spec = ModelSpec(name, {k: v for k, v in kwargs.items() if k != "weights"})
        _run(
            title=f"train {name}", model=net, spec=spec, rec=rec, cfg=cfg, train_set=train_set, val_set=val_set,
            out=out, device=device, resume=resume, dist_info=dist_info, hooks=[],
        )  # fmt: skip
    finally:
        destroy_distributed()


def _default_agp(cfg: Any, train_set: Any, world: int, final: float, initial: float) -> Any:
    from surgery.recipe import AGPSection

    if cfg.epochs is not None:
        per_epoch = max(1, len(train_set) // max(1, world) // cfg.batch_size)
        total = max(1, math.ceil(cfg.epochs * per_epoch))
    else:
        total = cfg.steps
    end = max(1, int(total * 2 / 3))  # prune during the first two thirds, then fine-tune
    return AGPSection(initial_sparsity=initial, final_sparsity=final, start_step=0, end_step=end,
                      frequency=max(1, end // 10)), total  # fmt: skip


def retrain(
    ckpt: Path = typer.Argument(..., help="A surgery checkpoint (structured, masked or dense)."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe YAML (its 'retrain' section; default: the checkpoint's)."),
    data: str = typer.Option(None, "--data", help="synthetic | coco:ROOT | voc:ROOT | a COCO .json"),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimizer steps (replaces the recipe's epochs)."),
    epochs: float = typer.Option(None, "--epochs", help="Epochs (converted to steps)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", min=1, help="Images per step per process."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (cuda:LOCAL_RANK under torchrun)."),
    out: Path = typer.Option(None, "--out", "-o", help="Checkpoint to write (default runs/retrain/<name>.pt)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from --out's saved step."),
    eval_every: int = typer.Option(None, "--eval-every", min=0, help="Evaluate every N steps (0: only at the end)."),
    eval_: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate on the validation split."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", min=0, help="Checkpoint every N steps."),
    seed: int = typer.Option(None, "--seed", help="Seed for the data order and augmentation."),
    workers: int = typer.Option(None, "--workers", min=0, help="Data loader worker processes."),
    sparsity: float = typer.Option(None, "--sparsity", help="Mask this fraction of conv/linear weights (magnitude)."),
    agp: bool = typer.Option(False, "--agp", help="Reach --sparsity gradually (Zhu & Gupta AGP) instead of at once."),
    scope: str = typer.Option(None, "--scope", help="Masking scope: layer | global (default: recipe prune.scope)."),
) -> None:
    """Retrain a pruned, masked or dense checkpoint; masks of masked checkpoints are kept exactly."""
    import torch

    from surgery.checkpoint import load_checkpoint
    from surgery.errors import RecipeError
    from surgery.masked import AGPSchedule, apply_masks, magnitude_masks, masks_sparsity
    from surgery.recipe import Recipe, recipe_from_dict
    from surgery.train import MaskHook, destroy_distributed, init_distributed

    if agp and sparsity is None:
        raise RecipeError("--agp needs --sparsity (the final sparsity)")
    dist_info = init_distributed(device)
    try:
        net, info = load_checkpoint(ckpt)
        if recipe is None and info.recipe:
            try:
                base = recipe_from_dict(info.recipe, f"{ckpt} (recipe)")
            except RecipeError:
                base = Recipe(source="<defaults>")
            base_path = None
        else:
            base, base_path = None, recipe
        flags = dict(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                     checkpoint_every=checkpoint_every, data=data, workers=workers)  # fmt: skip
        over = _overrides("retrain", **flags)
        over["prune.scope"] = scope
        if base is not None:
            from surgery.recipe import apply_overrides

            rec = apply_overrides(base, over)
        else:
            rec = resolve_recipe(base_path, over)
        cfg = rec.retrain
        if steps is not None and epochs is None:
            cfg.epochs = None
        out = out or Path("runs/retrain") / f"{ckpt.stem}.pt"
        train_set, val_set = _datasets(rec, cfg, eval_, dist_info)
        _check_classes(info.spec.kwargs.get("num_classes"), train_set)

        masks = info.masks
        hooks: list[Any] = []
        scope_ = rec.prune.scope
        if sparsity is not None and agp:
            current = masks_sparsity(masks) if masks else 0.0
            section, total = _default_agp(cfg, train_set, dist_info.world_size, sparsity, current)
            if rec.prune.agp is not None:
                r = rec.prune.agp
                end = min(r.end_step, total)
                section = type(r)(initial_sparsity=min(r.initial_sparsity, sparsity), final_sparsity=sparsity,
                                  start_step=min(r.start_step, end - 1), end_step=end, frequency=r.frequency)  # fmt: skip
                if end < r.end_step and dist_info.is_main:
                    console.print(f"[yellow]note:[/] AGP end_step {r.end_step} is past the last step; using {end}")
            hooks.append(MaskHook(AGPSchedule.from_section(section), scope_))
            rec.prune.agp = section
            rec.prune.sparsity = sparsity
        elif sparsity is not None:
            masks = magnitude_masks(net, sparsity, scope_, previous=masks)
            apply_masks(net, masks)
            rec.prune.sparsity = sparsity
        if dist_info.is_main:
            what = info.kind + (f", {masks_sparsity(masks):.0%} of masked weights zero" if masks else "")
            console.print(f"retraining [bold]{ckpt}[/] ({info.spec.name}, {what})", soft_wrap=True, highlight=False)
        torch.manual_seed(cfg.seed)
        _run(
            title=f"retrain {ckpt.stem}", model=net, spec=info.spec, rec=rec, cfg=cfg, train_set=train_set,
            val_set=val_set, out=out, device=device, resume=resume, dist_info=dist_info, hooks=hooks,
            masks=masks, kind=info.kind, plan=info.plan,
            metrics={"input": {"checkpoint": str(ckpt), "kind": info.kind, **{
                k: v for k, v in info.metrics.items() if isinstance(v, (int, float, str))}}},
        )  # fmt: skip
    finally:
        destroy_distributed()


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("retrain")(retrain)
