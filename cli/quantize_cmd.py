"""``surgery quantize``: INT8 ONNX from a checkpoint (options and display over :mod:`surgery.deployment.quantize`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .console import console


def quantize(
    checkpoint: Path = typer.Argument(..., help="A surgery checkpoint (dense, structured, masked or QAT-trained)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the INT8 .onnx file."),
    calib_batches: int = typer.Option(8, "--calib-batches", min=1, help="Batches of training images to calibrate on."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Images per calibration batch."),
    input_size: int = typer.Option(None, "--input-size", min=16, help="Square input side (default: the model's min_size)."),
    keep_float: Path = typer.Option(None, "--keep-float", help="Also write the float ONNX export here."),
    verify_images: int = typer.Option(8, "--verify-images", min=0, help="Validation images to compare INT8 with float on."),
    data: str = typer.Option(None, "--data", help="synthetic | coco:ROOT | voc:ROOT | yolo:DATA_YAML | a COCO .json (default: the checkpoint's)."),
    reduce_range: bool = typer.Option(False, "--reduce-range", help="7-bit weights (ORT's advice for U8S8 on non-VNNI x86)."),
    form: str = typer.Option("auto", "--form", help="auto (time every form, keep the fastest) | qdq-per-channel | qdq-per-tensor | qoperator-per-channel | qoperator-per-tensor."),
) -> None:
    """Quantize a checkpoint to INT8 ONNX (static, per-channel weights, ONNX Runtime QDQ); output layers,
    decoding, NMS and RoIAlign stay float."""
    from surgery.deployment.quantize import quantize_checkpoint

    with console.status(f"exporting and quantizing {checkpoint.name}..."):
        res = quantize_checkpoint(
            checkpoint, out, calib_batches=calib_batches, batch_size=batch_size, input_size=input_size,
            keep_float=keep_float, verify_images=verify_images, data=data, reduce_range=reduce_range, form=form,
        )  # fmt: skip

    mib = 2**20
    table = Table(title=f"INT8 quantization of {checkpoint.name}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("file", f"{res.path} ({res.int8_bytes / mib:.2f} MiB)")
    kept = f" kept at {res.float_path}" if res.float_path else ""
    table.add_row("float export", f"{res.float_bytes / mib:.2f} MiB{kept} (int8 is {res.int8_bytes / res.float_bytes:.2f}x)")
    table.add_row("input", f"image float32 [3, {res.input_size}, {res.input_size}] in [0, 1]")
    table.add_row("form", res.form + (" (fastest of: " + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(
        res.form_ms.items(), key=lambda kv: kv[1])) + ")" if res.form_ms else ""))
    table.add_row("quantized", f"{res.quantized_nodes} Conv/MatMul/Gemm nodes (weights int8 {res.form.split('-', 1)[1]}, "
                  f"activations {res.activation_type}{', reduce_range' if res.reduce_range else ''})")
    table.add_row("kept float", f"{len(res.float_nodes)} nodes of the output layers: {', '.join(res.excluded_layers) or '-'}")
    ranges = "from quantization-aware training" if res.ranges == "qat" else f"calibrated on {res.calib_images} training images"
    table.add_row("activation ranges", ranges)
    a = res.agreement
    if a is not None:
        style = "green" if a.fraction >= 0.9 else "yellow"
        table.add_row(
            "agreement",
            f"[{style}]{a.matched}/{a.float_detections} float detections (score >= {a.score_thresh:g}) matched[/] "
            f"(IoU >= {a.iou_thresh:g}, |score diff| <= {a.score_tol:g}) on {a.images} val images; "
            f"mean IoU {a.mean_iou:.3f}, score diff mean {a.mean_score_diff:.3f} max {a.max_score_diff:.3f}; "
            f"int8 detections {a.int8_detections}",
        )
    table.add_row("time", f"{res.seconds:.1f}s")
    for note in res.notes:
        table.add_row("note", note)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
