from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .console import console


def export(
    checkpoint: Path = typer.Argument(..., help="A surgery checkpoint (dense, structured or masked)."),
    out: Path | None = typer.Option(
        None, "--out", "-o",
        help="Where to write the file [default: next to the checkpoint, .onnx, or .ultralytics.pt for "
        "--format ultralytics].",
    ),
    fmt: str = typer.Option(
        "onnx", "--format",
        help="onnx, or ultralytics: a .pt that Ultralytics loads with the pruned widths (YOLO('x.pt'); a pickle, "
        "see docs/benchmarks/yolo-nms-free.md).",
    ),
    input_size: int = typer.Option(
        None, "--input-size", help="Square input side the graph is traced for (default: the model's own, its min_size, as quantize)."
    ),
    opset: int = typer.Option(None, "--opset", help="ONNX opset version [default: 17]."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare onnxruntime with PyTorch."),
    dynamic_size: bool = typer.Option(
        False, "--dynamic-size/--fixed-size",
        help="Dynamic image height/width (matches PyTorch exactly only at --input-size: see the docs).",
    ),
) -> None:
    """Export a checkpoint to ONNX: one image [3, S, S] in [0, 1] -> boxes, scores, labels (+ masks, keypoints).
    With --format ultralytics, an Ultralytics YOLO checkpoint goes back to Ultralytics as a .pt file."""
    from surgery.deployment.export import checkpoint_metadata, export_onnx
    from surgery.deployment.quantize import export_size
    from surgery.errors import SurgeryError
    from surgery.pruning.masked import fold_masks
    from surgery.storage.checkpoint import load_checkpoint

    if fmt not in ("onnx", "ultralytics"):
        raise SurgeryError(f"--format {fmt!r}: expected onnx or ultralytics")
    if fmt == "ultralytics":
        given = [flag for flag, v in (("--opset", opset), ("--input-size", input_size), ("--dynamic-size", dynamic_size or None))
                 if v is not None]  # fmt: skip
        if given:
            raise SurgeryError(f"{', '.join(given)} apply to ONNX exports; --format ultralytics writes the network itself")
        if out is not None and out.suffix.lower() != ".pt":
            raise SurgeryError(f"--out {out}: --format ultralytics writes a .pt pickle (Ultralytics loads *.pt); name it .pt")
    opset = 17 if opset is None else opset
    default_suffix = ".onnx" if fmt == "onnx" else ".ultralytics.pt"
    out = out if out is not None else checkpoint.with_name(checkpoint.stem + default_suffix)
    model, ckpt = load_checkpoint(checkpoint)
    if ckpt.kind == "masked":
        fold_masks(model, ckpt.masks)
    model.eval()
    if fmt == "ultralytics":
        _hand_back(model, ckpt, checkpoint, out)
        return
    input_size = input_size or export_size(model)
    with console.status(f"exporting {checkpoint.name} at {input_size}px (opset {opset})..."):
        meta = checkpoint_metadata(model, ckpt, input_size)
        res = export_onnx(model, out, input_size, opset, verify=verify, metadata=meta, dynamic_size=dynamic_size)

    table = Table(title=f"ONNX export of {checkpoint.name}", show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("file", f"{res.path} ({res.file_bytes / 2**20:.1f} MiB)")
    shape = "3, H, W" if res.dynamic_size else f"3, {input_size}, {input_size}"
    table.add_row("input", f"image float32 [{shape}] in [0, 1], one image per call")
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


def _hand_back(model: Any, ckpt: Any, checkpoint: Path, out: Path) -> None:
    from rich.markup import escape

    from surgery.storage.safety import protecting
    from surgery.yolo.ultralytics_handback import recipe_class_names, save_for_ultralytics
    from surgery.yolo.ultralytics_trainer import train_line

    names = ckpt.class_names
    if not names and not getattr(model, "class_names", None):
        found = recipe_class_names(ckpt.recipe)
        names = ["__background__", *found] if found else None
    with protecting([checkpoint]):
        hb = save_for_ultralytics(model, out, class_names=names, source=str(checkpoint))
    console.print(
        f"wrote {hb.path} ({hb.file_bytes / 2**20:.1f} MiB, {hb.params:,} parameters, imgsz {hb.imgsz}, "
        f"classes {', '.join(hb.names.values())}): load it with ultralytics.YOLO({str(hb.path)!r}). "
        "It is a pickle: trust it only if you made it.",
        soft_wrap=True, highlight=False, markup=False,
    )
    console.print(
        "[bold]To train it with Ultralytics, keep the pruned widths[/] (plain YOLO(file).train() rebuilds the "
        f"full model from its yaml):\n  {escape(train_line(str(hb.path), model.task))}\n"
        f"or: surgery retrain {escape(str(checkpoint))} --engine ultralytics --data yolo:data.yaml",
        soft_wrap=True, highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export)
