"""Training display shared by ``train``, ``retrain`` and ``sweep``: a rich progress bar fed by the
library's callbacks, evaluation lines, notes and a summary table (rank 0 only)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .console import LINE_LIMIT, console, shown
from .progress import TaskProgress, working

__all__ = ["TaskProgress", "TrainDisplay", "format_losses", "macs_line", "print_train_summary", "step_line", "working"]

SHORT = {"classification": "cls", "bbox_regression": "reg", "bbox_ctrness": "ctr", "loss_classifier": "cls",
         "loss_box_reg": "box", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn", "imitation": "imit",
         "response": "resp"}  # fmt: skip


def format_losses(losses: dict[str, float]) -> str:
    return " ".join(f"{SHORT.get(k, k)} {v:.3f}" for k, v in losses.items())


def step_line(info: Any) -> str:
    """One plain log line for a :class:`surgery.training.hooks.StepInfo` (logs, pipes, CI: no progress bar)."""
    eta = f"{int(info.eta_s // 60)}:{int(info.eta_s % 60):02d}"
    return (f"step {info.step}/{info.total}  loss {info.loss:.3f} ({format_losses(info.losses)})  "
            f"lr {info.lr:.2e}  {info.images_per_s:.1f} img/s  eta {eta}")


class TrainDisplay:
    """Progress of one training run; ``callbacks()`` gives the library's :class:`Callbacks`."""

    def __init__(self, title: str, enabled: bool = True) -> None:
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
            disable=not console.is_terminal,  # a log file gets step lines (on_step), not a dead bar
        )
        self.task = self.progress.add_task(escape(title), total=None, info="starting…")

    def __enter__(self) -> TrainDisplay:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.stop()

    def callbacks(self) -> Any:
        from surgery.workflows import Callbacks

        if not self.enabled:
            return Callbacks()
        return Callbacks(on_step=self.on_step, on_eval_progress=self.on_eval_progress, on_eval=self.on_eval,
                         on_note=self.on_note, on_stage=self.on_stage, on_warning=self.on_warning)

    def on_step(self, info: Any) -> None:  # StepInfo
        if not console.is_terminal:  # a log file or a pipe: periodic plain lines instead of a bar
            console.print(step_line(info), markup=False, highlight=False, soft_wrap=True)
            return
        text = f"loss {info.loss:.3f} ({format_losses(info.losses)})  {info.images_per_s:.1f} img/s  lr {info.lr:.2e}"
        self.progress.update(self.task, total=info.total, completed=info.step, info=escape(text))

    def on_stage(self, text: str) -> None:
        self.progress.update(self.task, info=shown(text + "…", LINE_LIMIT))

    def on_note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]note:[/] {shown(text, LINE_LIMIT)}", soft_wrap=True, highlight=False)

    def on_warning(self, text: str) -> None:
        self.progress.console.print(f"[yellow]warning:[/] {shown(text, LINE_LIMIT)}", soft_wrap=True, highlight=False)

    def on_eval_progress(self, done: int, total: int) -> None:
        self.progress.update(self.task, description=f"{escape(self.title)} [dim](evaluating {done}/{total})[/]")

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        self.progress.update(self.task, description=escape(self.title))
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("mAP", "mAP50") if k in metrics)
        self.progress.console.print(f"step {step}: {shown}", highlight=False)


def print_train_summary(title: str, outcome: Any) -> None:
    """The table after ``train`` / ``retrain`` (a :class:`surgery.workflows.TrainOutcome`)."""
    result = outcome.result
    table = Table(title=escape(title))
    table.add_column("")
    table.add_column("value", justify="right")
    steps = f"{result.steps}" + (f" (resumed at {result.start_step})" if result.start_step else "")
    table.add_row("steps", steps)
    world = outcome.world_size
    table.add_row("time", f"{result.seconds:.1f} s on {outcome.device}" + (f" x {world} processes" if world > 1 else ""))
    table.add_row("s / step", f"{result.s_per_step:.3f}")
    table.add_row("images / s", f"{result.images_per_s:.1f}")
    for k, v in result.losses.items():
        table.add_row(f"loss {escape(k)}", f"{v:.4f}")
    if result.losses:
        table.add_row("loss (sum)", f"{result.loss:.4f}", style="bold")
    for k in ("mAP", "mAP50", "mAP75"):
        if k in result.metrics:
            table.add_row(k, f"{result.metrics[k]:.4f}", style="bold" if k != "mAP75" else "")
    if result.sparsity is not None:
        table.add_row("weight sparsity (masked layers)", f"{result.sparsity:.1%}")
    table.add_row("kind", result.kind)
    console.print(table)
    console.print(f"saved [bold]{escape(str(outcome.out))}[/]", soft_wrap=True, highlight=False)
    files = outcome.files
    if files is not None:
        if files.best.exists():
            console.print(f"best by validation mAP: {escape(str(files.best))}", soft_wrap=True, highlight=False)
        console.print(f"metrics per step {escape(str(files.csv))}, {escape(str(files.jsonl))}", soft_wrap=True, highlight=False)


def macs_line(before: int, after: int | None, size: int | None, rois: int | None,
              network: tuple[int, int] | None = None) -> str:
    """``MACs 166M -> 50.8M (31% kept; fvcore, one 320x320 image, 100 RoIs)``: the one way prune
    and inspect state MACs, with what they were counted on: the resolution the network actually
    ran at (``network``: the backbone's input) when the model resizes its input itself."""
    from surgery.report import fmt_count

    if network is not None and tuple(network) != (size, size):
        on = f"network at {network[0]}x{network[1]}: the model resizes its {size}x{size} input itself"
    else:
        on = f"one {size}x{size} image"
    on += f", {rois} RoIs" if rois else ""
    if after is None:
        return f"MACs {fmt_count(before)} ({on}, fvcore)"
    return f"MACs {fmt_count(before)} -> {fmt_count(after)} ({after / max(1, before):.0%} kept; fvcore, {on})"
