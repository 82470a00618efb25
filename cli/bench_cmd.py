from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from surgery.report import fmt_count

from .console import console, err_console
from .display import TaskProgress
from .table import print_wide


def _ratio(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _load_dataset(source: str, reference: Path) -> Any:
    """The validation split of ``source`` (the synthetic set as the reference's recipe made it)."""
    from surgery.data import dataset_for
    from surgery.deployment.runtime import load_detector

    recipe_data = None
    if source == "synthetic":
        recipe_data = (load_detector(reference)[1].recipe or {}).get("data")
    with console.status(f"preparing {source} (val)..."):
        return dataset_for(recipe_data, "val", train=False, source=source)


def bench(
    checkpoints: list[Path] = typer.Argument(
        ..., help="Checkpoints or exported .onnx files to compare; the FIRST is the dense reference."
    ),
    data: str | None = typer.Option(None, "--data", help="Dataset for mAP (synthetic, coco:ROOT, voc:ROOT, yolo:DATA_YAML, ann.json)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    input_size: int = typer.Option(320, "--input-size", help="Square input side in pixels."),
    runs: int = typer.Option(20, "--runs", help="Timed runs per model and batch size."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up runs per model and batch size."),
    threads: int = typer.Option(2, "--threads", help="Intra-op threads (torch and ONNX Runtime) during timing."),
    batch_size: list[int] = typer.Option([1, 4], "--batch-size", "-b", help="Batch size (repeat for several)."),
    csv: Path | None = typer.Option(None, "--csv", help="Write every number to this CSV (fixed columns)."),
    rois: int = typer.Option(None, "--rois", min=1, help="Two-stage models: time and count MACs at this fixed RoI count."),
    runtime: str = typer.Option(
        "torch", "--runtime", help="torch (eager), onnxruntime or openvino (checkpoints exported, then timed in that "
        "runtime; .onnx files run in OpenVINO with openvino, else in ONNX Runtime)."
    ),
    precision: str = typer.Option("f32", "--precision", help="f32, bf16 or f16: OpenVINO's inference precision "
                                  "(its CPU default is bf16 where it exists), torch on CUDA: autocast."),
    compile_mode: str = typer.Option("none", "--compile", help="torch on CUDA: none (eager), cuda-graphs, "
                                     "reduce-overhead (torch.compile) or default (torch.compile; also on CPU)."),
    channels_last: str = typer.Option("auto", "--channels-last", help="torch on CPU: auto (keep the faster layout), on, off."),
    spinning: bool = typer.Option(False, "--spin/--no-spin", help="ONNX Runtime threads spin-wait between "
                                  "operators (its default, for a dedicated device; off suits a shared machine)."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv (every column, on stdout)."),
    resize_model: bool = typer.Option(
        False, "--resize-model/--keep-model-size",
        help="Run the network at --input-size (sets the detector's resize) instead of its saved min_size.",
    ),
) -> None:
    """Params, MACs, latency (end to end, network, pipeline; interleaved across models), size, mAP."""
    from surgery.config.recipe import recipe_from_dict
    from surgery.measure.bench import bench_checkpoints, write_csv

    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter(f"--format {fmt!r}: expected table, json or csv")
    options = {"input_size": input_size, "batch_sizes": list(batch_size), "warmup": warmup, "runs": runs,
               "threads": threads, "device": device, "resize_model": resize_model, "rois": rois,
               "runtime": runtime, "channels_last": channels_last, "spinning": spinning, "precision": precision,
               "compile": compile_mode}
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

    from surgery.measure.bench import write_csv_to

    if fmt == "json":
        sys.stdout.write(json.dumps([{**r.to_dict(), "notes": r.notes} for r in rows], indent=1, default=str) + "\n")
        return
    write_csv_to(rows, sys.stdout)


def _print_table(rows: list[Any], cfg: Any) -> None:
    ref = Path(rows[0].checkpoint).name if rows else "first"
    spin = " (ONNX Runtime spinning)" if cfg.spinning and cfg.runtime == "onnxruntime" else ""
    how = sorted({f"{r.runtime} {r.precision}" + ("" if r.compile in ("-", "none") else f" {r.compile}") for r in rows})
    table = Table(title=f"bench {', '.join(how)}, {cfg.input_size}px, {cfg.threads} threads{spin}, median of {cfg.runs} interleaved runs, "
                  f"{rows[0].detections if rows else '-'} detections per image; x = vs {ref}", box=box.SIMPLE_HEAD, pad_edge=False)
    # each column group shows related values; a terminal stacks them in one cell (compact), a log
    # file or a pipe gets one value per cell so that the lines can be read by tools
    with_map = any(r.mAP is not None for r in rows)
    groups: list[list[tuple[str, Any]]] = [
        [("model", lambda r: Path(r.checkpoint).name),
         ("kind", lambda r: r.kind if r.method in (r.kind, "dense") else f"{r.kind} {r.method}")],
        [("runtime", lambda r: f"{r.runtime} {r.precision}"),
         ("layout", lambda r: "" if r.memory_format in ("-", "contiguous") else r.memory_format)],
        [("bs", lambda r: str(r.batch_size))],
        [("params", lambda r: fmt_count(r.params)), ("nonzero", lambda r: fmt_count(r.params_nonzero))],
        [("MACs", lambda r: "-" if r.macs is None else fmt_count(r.macs))],
        [("e2e ms", lambda r: f"{r.latency_ms_median:.1f}"), ("p90", lambda r: f"{r.latency_ms_p90:.1f}")],
        [("network ms", lambda r: _ms(r.network_ms_median))],
        [("pipeline ms", lambda r: _ms(r.pipeline_ms_median))],
        [("gzip", lambda r: fmt_count(r.file_gzip_bytes) + "B")],
        *([[("mAP", lambda r: "-" if r.mAP is None else f"{r.mAP:.3f}"),
            ("mAP50", lambda r: "-" if r.mAP50 is None else f"{r.mAP50:.3f}")]] if with_map else []),
        [("params x", lambda r: _ratio(r.params_ratio)), ("MACs x", lambda r: _ratio(r.macs_ratio))],
        [("e2e x", lambda r: _ratio(r.latency_ratio)), ("network x", lambda r: _ratio(r.network_ratio))],
    ]
    stacked = console.is_terminal
    for group in groups:
        for part in [group] if stacked else [[c] for c in group]:
            first = part[0][0]
            table.add_column("\n".join(h for h, _ in part), justify="left" if first in ("model", "runtime") else "right",
                             no_wrap=True, overflow="fold" if first == "model" else "ellipsis")
    for r in rows:
        cells: list[str] = []
        for group in groups:
            values = [escape(fn(r)) for _, fn in group]
            if stacked:  # secondary values of the model and runtime columns are dimmed
                rest = [f"[dim]{v}[/]" if group[0][0] in ("model", "runtime") else v for v in values[1:] if v]
                cells.append("\n".join([values[0], *rest]))
            else:
                cells += [v or "-" for v in values]
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
