from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.console import console


def export(
    checkpoint: Path = typer.Argument(..., help="A surgery checkpoint (dense, structured or masked)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the .onnx file."),
    input_size: int = typer.Option(320, "--input-size", help="Square input side the graph is traced for."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare onnxruntime with PyTorch."),
) -> None:
    """Export a checkpoint to ONNX (fixed 3 x S x S input, pre/post-processing included)."""
    from surgery.checkpoint import load_checkpoint
    from surgery.export import export_onnx
    from surgery.masked import fold_masks

    model, ckpt = load_checkpoint(checkpoint)
    if ckpt.kind == "masked":
        fold_masks(model, ckpt.masks)
    with console.status(f"exporting {checkpoint.name} at {input_size}px (opset {opset})..."):
        res = export_onnx(model, out, input_size, opset, verify=verify)

    table = Table(title=f"ONNX export of {checkpoint.name}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("file", f"{res.path} ({res.file_bytes / 2**20:.1f} MiB)")
    table.add_row("input", f"image float32 [3, {input_size}, {input_size}] in [0, 1]")
    table.add_row("outputs", ", ".join(res.output_names) or "-")
    table.add_row("exporter", f"{res.exporter}, opset {res.opset}, {res.export_s:.1f}s")
    if res.verified is None and not verify:
        table.add_row("verified", "[dim]skipped (--no-verify)[/]")
    elif res.verified:
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in res.max_abs_diff.items())
        table.add_row("verified", f"[green]onnxruntime matches PyTorch[/] ({res.num_detections} detections; max |diff| {diffs})")
    else:
        table.add_row("verified", "[yellow]inconclusive[/]")
    for note in res.notes:
        table.add_row("note", note)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
