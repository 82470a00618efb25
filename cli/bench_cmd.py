from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table

from cli.console import console, err_console
from cli.display import TaskProgress
from cli.table import print_wide
from surgery.report import fmt_count


def _ratio(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _load_dataset(source: str, reference: Path) -> Any:
    """The validation split of ``source`` (the synthetic set as the reference's recipe made it)."""
    from surgery.data import dataset_for
    from surgery.runtime import load_detector

    recipe_data = None
    if source == "synthetic":
        recipe_data = (load_detector(reference)[1].recipe or {}).get("data")
    with console.status(f"preparing {source} (val)..."):
        return dataset_for(recipe_data, "val", train=False, source=source)


def bench(
    checkpoints: list[Path] = typer.Argument(
        ..., help="Checkpoints or exported .onnx files to compare; the FIRST is the dense reference."
    ),
    data: str | None = typer.Option(None, "--data", help="Dataset for mAP (synthetic, coco:ROOT, voc:ROOT, ann.json)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    input_size: int = typer.Option(320, "--input-size", help="Square input side in pixels."),
    runs: int = typer.Option(20, "--runs", help="Timed runs per model and batch size."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up runs per model and batch size."),
    threads: int = typer.Option(2, "--threads", help="Intra-op threads (torch and ONNX Runtime) during timing."),
    batch_size: list[int] = typer.Option([1, 4], "--batch-size", "-b", help="Batch size (repeat for several)."),
    csv: Path | None = typer.Option(None, "--csv", help="Write every number to this CSV (fixed columns)."),
    rois: int = typer.Option(None, "--rois", min=1, help="Two-stage models: time and count MACs at this fixed RoI count."),
    runtime: str = typer.Option(
        "torch", "--runtime", help="torch (eager) or onnxruntime (checkpoints exported, then timed in ONNX Runtime)."
    ),
    channels_last: str = typer.Option("auto", "--channels-last", help="torch on CPU: auto (keep the faster layout), on, off."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv (every column, on stdout)."),
    resize_model: bool = typer.Option(
        False, "--resize-model/--keep-model-size",
        help="Run the network at --input-size (sets the detector's resize) instead of its saved min_size.",
    ),
) -> None:
    """Params, MACs, latency (end to end, network, pipeline; interleaved across models), size, mAP."""
    from surgery.bench import bench_checkpoints, write_csv
    from surgery.recipe import recipe_from_dict

    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter(f"--format {fmt!r}: expected table, json or csv")
    options = {"input_size": input_size, "batch_sizes": list(batch_size), "warmup": warmup, "runs": runs,
               "threads": threads, "device": device, "resize_model": resize_model, "rois": rois,
               "runtime": runtime, "channels_last": channels_last}
    cfg = recipe_from_dict({"bench": options}, "bench options").bench
    dataset = _load_dataset(data, checkpoints[0]) if data else None
    with TaskProgress("bench", out=err_console if fmt != "table" else console) as bar:
        rows = bench_checkpoints(checkpoints, cfg, dataset=dataset,
                                 progress=lambda what, done, total: bar.update(done, total, what=what))
    if csv is not None:
        write_csv(rows, csv)
    if fmt != "table":
        _print_machine(rows, fmt)
        return
    _print_table(rows, cfg)
    if csv is not None:
        console.print(f"wrote {csv}", soft_wrap=True, highlight=False)


def _print_machine(rows: list[Any], fmt: str) -> None:
    import json
    import sys

    from surgery.bench import write_csv_to

    if fmt == "json":
        sys.stdout.write(json.dumps([{**r.to_dict(), "notes": r.notes} for r in rows], indent=1, default=str) + "\n")
        return
    write_csv_to(rows, sys.stdout)


def _print_table(rows: list[Any], cfg: Any) -> None:
    ref = Path(rows[0].checkpoint).name if rows else "first"
    table = Table(
        title=f"bench {cfg.input_size}px, {cfg.threads} threads, median of {cfg.runs} interleaved runs, "
        f"{rows[0].detections if rows else '-'} detections per image; x = vs {ref}",
        box=box.SIMPLE_HEAD, pad_edge=False,
    )
    table.add_column("model", no_wrap=True, overflow="fold")
    for name in ("runtime", "bs", "params\nnonzero", "MACs", "e2e ms\np90", "network\nms", "pipeline\nms", "gzip"):
        table.add_column(name, justify="right" if name != "runtime" else "left", no_wrap=True)
    with_map = any(r.mAP is not None for r in rows)
    if with_map:
        table.add_column("mAP\nmAP50", justify="right", no_wrap=True)
    for name in ("params x\nMACs x", "e2e x\nnetwork x"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        kind = r.kind if r.method in (r.kind, "dense") else f"{r.kind} {r.method}"
        fmt_mem = "" if r.memory_format in ("-", "contiguous") else f"\n[dim]{r.memory_format}[/]"
        cells = [f"{Path(r.checkpoint).name}\n[dim]{kind}[/]", f"{r.runtime}{fmt_mem}", str(r.batch_size),
                 f"{fmt_count(r.params)}\n{fmt_count(r.params_nonzero)}", "-" if r.macs is None else fmt_count(r.macs),
                 f"{r.latency_ms_median:.1f}\n{r.latency_ms_p90:.1f}", _ms(r.network_ms_median),
                 _ms(r.pipeline_ms_median), fmt_count(r.file_gzip_bytes) + "B"]
        if with_map:
            cells.append("-" if r.mAP is None else f"{r.mAP:.3f}\n{r.mAP50 or 0:.3f}")
        cells += [f"{_ratio(r.params_ratio)}\n{_ratio(r.macs_ratio)}", f"{_ratio(r.latency_ratio)}\n{_ratio(r.network_ratio)}"]
        table.add_row(*cells)
    print_wide(table)
    notes: dict[str, dict[str, None]] = {}
    for r in rows:
        for n in r.notes:
            notes.setdefault(n, {})[Path(r.checkpoint).name] = None
    every = {Path(r.checkpoint).name for r in rows}
    for n, names in notes.items():
        who = "" if set(names) == every else f" ({', '.join(names)})"
        console.print(f"[yellow]note{who}:[/] {n}", highlight=False, soft_wrap=True)
    console.print(
        "[dim]MACs: fvcore (1 fused multiply-add = 1) on one image, two-stage models at their RoI count; network: "
        "backbone + neck + head layers alone, pipeline: transform, decoding, NMS, RoI steps (measured apart, "
        "same inputs); masked models keep dense MACs and run with masks folded in; gzip: the weights alone.[/]",
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
