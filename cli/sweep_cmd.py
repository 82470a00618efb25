"""``surgery sweep RECIPE``: the main job (baseline, control, structured and masked variants,
retraining, bench, report)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .common import resolve_recipe
from .console import console, err_console
from .display import step_line
from .table import print_wide


def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML file, or a shipped recipe name (quickstart; `surgery recipes` lists them)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: the recipe's sweep.out)."),
    device: str = typer.Option(None, help="cpu | cuda (default: the recipe's bench.device)."),
    data: str = typer.Option(None, help="synthetic | coco:ROOT | voc:ROOT | yolo:DATA_YAML | annotations.json"),
) -> None:
    """Prune at every ratio (structured) and sparsity (masked), retrain, bench, and report."""
    from surgery.sweep import run_sweep

    rec = resolve_recipe(recipe, {"data.source": data, "bench.device": device})
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        disable=not console.is_terminal,  # a log file gets the stage and step lines below, not a dead bar
    )
    stages = progress.add_task("sweep", total=1, info="")
    steps = progress.add_task("train", total=1, info="", visible=False)

    def on_stage(name: str, i: int, n: int) -> None:
        progress.update(stages, description=f"[{i}/{n}] {name}", total=n, completed=i - 1)
        progress.update(steps, visible=False)
        console.print(f"[{i}/{n}] {name}", markup=False, highlight=False)  # no log_path: no "sweep_cmd.py:36"

    def on_step(info) -> None:  # noqa: ANN001 - surgery.training.train.StepInfo
        if not console.is_terminal and (info.step % 50 == 0 or info.step == info.total):
            console.print(step_line(info), markup=False, highlight=False, soft_wrap=True)
        losses = " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in info.losses.items())
        progress.update(steps, visible=True, total=info.total, completed=info.step,
                        info=f"{losses} lr={info.lr:.2e} {info.images_per_s:.1f} img/s")

    try:
        with progress:
            result = run_sweep(rec, out, device=rec.bench.device, on_stage=on_stage, on_step=on_step)
            progress.update(stages, completed=progress.tasks[0].total)
    except KeyboardInterrupt:  # like train: say what was kept and how to continue, exit 130
        folder = out if out is not None else rec.sweep.out
        err_console.print(f"interrupted: the steps the sweep finished are kept in {folder}; run the same command "
                          "again to continue (finished steps are reused, the interrupted one starts over)",
                          markup=False, highlight=False, soft_wrap=True)  # fmt: skip
        raise typer.Exit(130) from None

    table = Table(title=f"{rec.model.name}: structured vs masked ({result.seconds / 60:.1f} min)")
    for col in ("variant", "params", "MACs ratio", "latency ms", "latency ratio", "mAP pruned", "mAP retrained", "retained"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in result.rows:
        nz = f" ({r['params_nonzero'] / 1e6:.2f}M nz)" if r["params_nonzero"] < 0.99 * r["params"] else ""
        table.add_row(
            r["variant"], f"{r['params'] / 1e6:.2f}M{nz}", f"{r['macs_ratio']:.2f}", f"{r['latency_ms']:.1f}",
            f"{r['latency_ratio']:.2f}", f"{r['map_pruned']:.3f}", f"{r['map_retrained']:.3f}",
            "-" if r["retained_map"] is None else f"{100 * r['retained_map']:.1f}%",
        )
    print_wide(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True, highlight=False)
    if result.skipped:
        console.print(f"[dim]reused finished steps: {', '.join(result.skipped)}[/]")
    console.print(f"results: [bold]{result.csv}[/], {result.markdown}, {result.bench_csv}", soft_wrap=True)
    console.print("plots: " + ", ".join(str(p) for p in result.plots.values()), soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
