from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.console import console
from surgery.report import fmt_count


def _ratio(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


def _load_dataset(source: str, reference: Path) -> Any:
    """The validation split of ``source`` (the synthetic set as the reference checkpoint's recipe made it)."""
    from surgery.checkpoint import read_checkpoint
    from surgery.data import dataset_for

    recipe_data = (read_checkpoint(reference).recipe or {}).get("data") if source == "synthetic" else None
    with console.status(f"preparing {source} (val)..."):
        return dataset_for(recipe_data, "val", train=False, source=source)


def bench(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints to compare; the FIRST is the dense reference."),
    data: str | None = typer.Option(None, "--data", help="Dataset for mAP (synthetic, coco:ROOT, voc:ROOT, ann.json)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    input_size: int = typer.Option(320, "--input-size", help="Square input side in pixels."),
    runs: int = typer.Option(20, "--runs", help="Timed runs per model and batch size."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up runs per model and batch size."),
    threads: int = typer.Option(2, "--threads", help="torch.set_num_threads during timing."),
    batch_size: list[int] = typer.Option([1, 4], "--batch-size", help="Batch size (repeat for several)."),
    csv: Path | None = typer.Option(None, "--csv", help="Write every number to this CSV (fixed columns)."),
    rois: int = typer.Option(None, "--rois", min=1, help="Two-stage models: time and count MACs at this fixed RoI count."),
    resize_model: bool = typer.Option(
        False, "--resize-model/--keep-model-size",
        help="Run the network at --input-size (sets the detector's resize) instead of its saved min_size.",
    ),
) -> None:
    """Measure params, MACs, latency (interleaved across models), file size and optionally mAP."""
    from surgery.bench import bench_checkpoints, write_csv
    from surgery.recipe import recipe_from_dict

    options = {"input_size": input_size, "batch_sizes": list(batch_size), "warmup": warmup, "runs": runs,
               "threads": threads, "device": device, "resize_model": resize_model, "rois": rois}
    cfg = recipe_from_dict({"bench": options}, "bench options").bench
    dataset = _load_dataset(data, checkpoints[0]) if data else None

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("loading", total=None)

        def progress(what: str, done: float, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        rows = bench_checkpoints(checkpoints, cfg, dataset=dataset, progress=progress)

    table = Table(
        title=f"bench {input_size}px {device}, {rows[0].threads if rows else threads} threads, "
        f"median of {runs} interleaved runs; x = vs {Path(rows[0].checkpoint).name if rows else 'first'}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("checkpoint", no_wrap=True, overflow="fold")
    table.add_column("bs", justify="right")
    table.add_column("params\nnonzero", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("ms\np90", justify="right")
    table.add_column("img/s", justify="right")
    table.add_column("gzip", justify="right")
    with_map = any(r.mAP is not None for r in rows)
    if with_map:
        table.add_column("mAP\nmAP50", justify="right")
    table.add_column("params x\nMACs x", justify="right")
    table.add_column("latency\nx", justify="right")
    for r in rows:
        kind = r.kind if r.method in (r.kind, "dense") else f"{r.kind} {r.method}"
        cells = [
            f"{Path(r.checkpoint).name}\n[dim]{kind}[/]",
            str(r.batch_size),
            f"{fmt_count(r.params)}\n{fmt_count(r.params_nonzero)}",
            fmt_count(r.macs),
            f"{r.latency_ms_median:.1f}\n{r.latency_ms_p90:.1f}",
            f"{r.images_per_s:.1f}",
            fmt_count(r.file_gzip_bytes) + "B",
        ]
        if with_map:
            cells.append("-" if r.mAP is None else f"{r.mAP:.3f}\n{r.mAP50 or 0:.3f}")
        cells += [f"{_ratio(r.params_ratio)}\n{_ratio(r.macs_ratio)}", _ratio(r.latency_ratio)]
        table.add_row(*cells)
    console.print(table)
    notes: dict[str, dict[str, None]] = {}
    for r in rows:
        for n in r.notes:
            notes.setdefault(n, {})[Path(r.checkpoint).name] = None
    every = {Path(r.checkpoint).name for r in rows}
    for n, names in notes.items():
        who = "" if set(names) == every else f" ({', '.join(names)})"
        console.print(f"[yellow]note{who}:[/] {n}", highlight=False)
    console.print(
        "[dim]MACs: fvcore (1 fused multiply-add = 1), two-stage models at their test-time RoI count; "
        "masked models keep dense MACs and are timed with masks folded into the weights; "
        "gzip: the weights alone, gzipped.[/]"
    )
    if csv is not None:
        write_csv(rows, csv)
        console.print(f"wrote {csv}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
