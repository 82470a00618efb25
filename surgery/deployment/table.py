"""The deployment table: per checkpoint, float vs INT8 (post-training and quantization-aware) in
ONNX Runtime and/or OpenVINO - COCO mAP, network and end-to-end latency, file size - in the form
of TI's detection tables (Float / 8-bit calibration / 8-bit QAT side by side). OpenVINO runs the
same files (the INT8 ones as written for ONNX Runtime: OpenVINO executes QDQ graphs in INT8) at f32.

For each checkpoint: export the float ONNX file and quantize it (:func:`surgery.deployment.quantize.quantize_checkpoint`,
calibrated on training images); with ``qat_steps`` also fine-tune that many steps with
fake-quantized layers (:class:`surgery.training.qat.QATHook`, the checkpoint's own retrain recipe at a tenth
of its learning rate, no distillation: the row measures quantization, nothing else) and quantize
the result with its trained activation ranges. Every file is evaluated by the same COCO evaluator
(:class:`surgery.deployment.runtime.OnnxDetector`) and timed by :func:`surgery.measure.bench.bench_checkpoints` in
ONNX Runtime, all files interleaved, network/pipeline split from ONNX Runtime's profiler. The
files keep the models' own score thresholds (what a user deploys), so end-to-end times include
whatever post-processing the detections need.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config.recipe import BenchSection
from ..measure.bench import bench_checkpoints
from ..measure.evaluate import evaluate
from ..storage.atomic import atomic_open
from ..storage.checkpoint import read_checkpoint
from ..training.qat import QATHook
from ..workflows import recipe_for_checkpoint, retrain_checkpoint
from .quantize import quantize_checkpoint
from .runtime import OnnxDetector

DEPLOY_COLUMNS: tuple[str, ...] = (
    "checkpoint", "precision", "mAP", "mAP50", "mAP_minus_float", "network_ms", "latency_ms",
    "network_vs_float", "latency_vs_float", "file_bytes", "quantized_nodes", "qat_steps", "onnx", "int8_form",
    "latency_vs_dense", "runtime",
)  # fmt: skip


@dataclass
class DeployRow:
    checkpoint: str  # the checkpoint's file stem
    precision: str  # fp32, int8-ptq, int8-qat
    mAP: float | None
    mAP50: float | None
    mAP_minus_float: float | None
    network_ms: float | None  # ONNX Runtime, batch 1
    latency_ms: float  # end to end, batch 1
    network_vs_float: float | None
    latency_vs_float: float
    file_bytes: int
    quantized_nodes: int
    qat_steps: int
    onnx: str
    int8_form: str = ""  # INT8 rows: the form (surgery.deployment.quantize.FORMS) measured fastest here
    latency_vs_dense: float | None = None  # end to end against the first checkpoint's FP32 file
    runtime: str = "onnxruntime"  # onnxruntime | openvino (f32 for float files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def qat_finetune(ckpt: str | Path, out: str | Path, steps: int) -> Path:
    """Fine-tune ``ckpt`` for ``steps`` steps with fake-quantized layers; returns the new checkpoint."""
    rec = recipe_for_checkpoint(read_checkpoint(ckpt), None, {"retrain.steps": steps, "retrain.checkpoint_every": 0})
    rec.retrain.epochs = None
    rec.retrain.lr = rec.retrain.lr * 0.1  # fine-tuning a trained model: a tenth of its retraining rate
    rec.retrain.warmup_steps = min(rec.retrain.warmup_steps, steps // 4)
    rec.retrain.distill = None
    return retrain_checkpoint(ckpt, rec, out, evaluate=False, hooks=[QATHook()]).out


def deploy_table(
    checkpoints: Sequence[str | Path],
    out_dir: str | Path,
    val_set: Any,
    *,
    input_size: int | None = None,
    calib_batches: int = 8,
    qat_steps: int = 0,
    max_images: int | None = None,
    runs: int = 20,
    warmup: int = 3,
    threads: int = 2,
    spinning: bool = False,
    progress: Callable[[str], None] | None = None,
    runtimes: Sequence[str] = ("onnxruntime",),
    int8_form: str = "auto",
) -> list[DeployRow]:
    """Float / INT8 PTQ / INT8 QAT rows for each checkpoint (files written under ``out_dir``), for
    each of ``runtimes`` (the same files). Ratios come from
    :func:`~surgery.measure.bench.bench_checkpoints`' paired runs against the first file (the first
    checkpoint's FP32 export) in the same runtime; ratios between two other files divide two of those.
    ``int8_form``: ``auto`` (each form measured, the fastest kept) or one of :data:`surgery.deployment.quantize.FORMS`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, str, Path, int, int]] = []  # (stem, precision, onnx, quantized nodes, qat steps)
    forms: dict[Path, str] = {}
    for ckpt in map(Path, checkpoints):
        stem = ckpt.stem
        if progress:
            progress(f"INT8 PTQ {stem}")
        float_path = out_dir / f"{stem}.onnx"
        ptq = quantize_checkpoint(ckpt, out_dir / f"{stem}.int8.onnx", calib_batches=calib_batches,
                                  input_size=input_size, keep_float=float_path, verify_images=4, threads=threads,
                                  form=int8_form)
        forms[ptq.path] = ptq.form
        files += [(stem, "fp32", float_path, 0, 0), (stem, "int8-ptq", ptq.path, ptq.quantized_nodes, 0)]
        if qat_steps > 0:
            if progress:
                progress(f"INT8 QAT {stem} ({qat_steps} steps)")
            qat_ckpt = qat_finetune(ckpt, out_dir / f"{stem}.qat.pt", qat_steps)
            qat = quantize_checkpoint(qat_ckpt, out_dir / f"{stem}.qat.int8.onnx", calib_batches=calib_batches,
                                      input_size=input_size, verify_images=4, threads=threads, form=int8_form)
            forms[qat.path] = qat.form
            files.append((stem, "int8-qat", qat.path, qat.quantized_nodes, qat_steps))
    size = input_size or ptq.input_size
    rows: list[DeployRow] = []
    for runtime in runtimes:
        rows += _runtime_rows(files, forms, val_set, runtime, size, max_images=max_images, runs=runs, warmup=warmup,
                              threads=threads, spinning=spinning, progress=progress)
    return rows


def _runtime_rows(
    files: Sequence[tuple[str, str, Path, int, int]], forms: dict[Path, str], val_set: Any, runtime: str, size: int, *,
    max_images: int | None, runs: int, warmup: int, threads: int, spinning: bool,
    progress: Callable[[str], None] | None,
) -> list[DeployRow]:
    """The rows of one runtime: every file evaluated and timed (interleaved) in it."""
    maps: dict[Path, tuple[float, float]] = {}
    for _stem, _precision, path, _n, _s in files:
        if progress:
            progress(f"mAP {path.name} ({runtime})")
        m = evaluate(OnnxDetector(path, threads, runtime=runtime), val_set, batch_size=8, max_images=max_images).metrics
        maps[path] = (m["mAP"], m["mAP50"])
    if progress:
        progress(f"{runtime} latency (interleaved)")
    cfg = BenchSection(input_size=size, batch_sizes=[1], warmup=warmup, runs=runs, threads=threads,
                       runtime=runtime, spinning=spinning)
    timed = {Path(r.checkpoint): r for r in bench_checkpoints([f[2] for f in files], cfg)}
    rows: list[DeployRow] = []
    for stem, precision, path, nodes, steps in files:
        ref_path = next(f[2] for f in files if f[0] == stem and f[1] == "fp32")
        t, ref = timed[path], timed[ref_path]
        rows.append(DeployRow(
            checkpoint=stem, precision=precision, mAP=maps[path][0], mAP50=maps[path][1],
            mAP_minus_float=maps[path][0] - maps[ref_path][0], network_ms=t.network_ms_median,
            latency_ms=t.latency_ms_median,
            network_vs_float=(t.network_ratio / ref.network_ratio
                              if t.network_ms_median and ref.network_ms_median else None),
            latency_vs_float=t.latency_ratio / ref.latency_ratio, file_bytes=path.stat().st_size,
            quantized_nodes=nodes, qat_steps=steps, onnx=str(path), int8_form=forms.get(path, ""),
            latency_vs_dense=t.latency_ratio, runtime=runtime,
        ))  # fmt: skip
    return rows


def write_deploy_csv(rows: Sequence[DeployRow], path: str | Path) -> Path:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=DEPLOY_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in r.to_dict().items()})
    return Path(path)


def deploy_markdown(rows: Sequence[DeployRow], reference_ms: float | None = None) -> str:
    """The table in TI's form: one line per checkpoint, float / PTQ / QAT side by side.
    ``reference_ms``: the dense float model's end-to-end time, for the "x faster" column."""
    by: dict[str, dict[str, DeployRow]] = {}
    several = len({r.runtime for r in rows}) > 1  # the model cell names the runtime (f32 / INT8)
    for r in rows:
        by.setdefault(f"{r.checkpoint} ({r.runtime})" if several else r.checkpoint, {})[r.precision] = r
    out = [
        "| model | mAP float | mAP INT8 PTQ | mAP INT8 QAT | network ms FP32 / INT8 | end-to-end ms FP32 / INT8 "
        "| INT8 vs FP32 network | MB FP32 / INT8 | INT8 vs dense FP32 end to end | INT8 form (fastest here) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    for stem, v in by.items():
        fp, ptq, qat = v.get("fp32"), v.get("int8-ptq"), v.get("int8-qat")
        best = qat or ptq
        if best and best.latency_vs_dense:
            speed = f(1 / best.latency_vs_dense, ".2f") + "x"
        else:
            speed = f(reference_ms / best.latency_ms, ".2f") + "x" if reference_ms and best else "-"
        out.append(
            f"| {stem} | {f(fp.mAP if fp else None)} | {f(ptq.mAP if ptq else None)} "
            f"({f(ptq.mAP_minus_float if ptq else None, '+.3f')}) | {f(qat.mAP if qat else None)}"
            f"{'' if not qat else ' (' + f(qat.mAP_minus_float, '+.3f') + ')'} "
            f"| {f(fp.network_ms if fp else None, '.1f')} / {f(ptq.network_ms if ptq else None, '.1f')} "
            f"| {f(fp.latency_ms if fp else None, '.1f')} / {f(ptq.latency_ms if ptq else None, '.1f')} "
            f"| {f(ptq.network_vs_float if ptq else None, '.2f')}x "
            f"| {f(fp.file_bytes / 2**20 if fp else None, '.1f')} / {f(ptq.file_bytes / 2**20 if ptq else None, '.1f')} "
            f"| {speed} | {ptq.int8_form if ptq and ptq.int8_form else '-'} |"
        )
    return "\n".join(out) + "\n"


def deploy_report(recipe: Any, out: Path, checkpoints: Sequence[Path], val_set: Any) -> str:
    """The sweep's deployment stage: :func:`deploy_table` for ``checkpoints`` (the dense control
    first) with the recipe's bench settings, ``deploy.csv`` written, markdown for results.md returned."""
    cfg, sweep = recipe.bench, recipe.sweep
    # the table comes after the whole sweep: a missing extra drops its rows with a note, not the run
    runtimes = [r for r in sweep.deploy_runtimes if r != "openvino" or importlib.util.find_spec("openvino")]
    skipped = "" if runtimes == list(sweep.deploy_runtimes) else (
        "OpenVINO rows skipped: openvino is not installed (pip install 'surgery[openvino]').\n\n")
    rows = deploy_table(checkpoints, out / "deploy", val_set, input_size=cfg.input_size,
                        calib_batches=sweep.calib_batches, qat_steps=sweep.qat_steps, runs=cfg.runs,
                        warmup=cfg.warmup, threads=cfg.threads, spinning=cfg.spinning, runtimes=runtimes or ["onnxruntime"],
                        int8_form=sweep.int8_form)
    write_deploy_csv(rows, out / "deploy.csv")
    dense_ms = next(r.latency_ms for r in rows if r.precision == "fp32")
    names = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO (f32 inference precision)"}
    where = " and ".join(names[r] for r in runtimes or ["onnxruntime"])
    return (
        f"\n## Deployment: FP32 vs INT8 in {where}\n\nStatic INT8 (int8 weights, uint8 activations, "
        + ("in the form measured fastest for each model among QDQ / QOperator x per-channel / per-tensor weights, "
           if sweep.int8_form == "auto" else f"in the {sweep.int8_form} form, ")
        + f"calibrated on {sweep.calib_batches} batches of training images; output layers, decoding and NMS in float)"
        + (f", and INT8 after {sweep.qat_steps} quantization-aware steps" if sweep.qat_steps else "")
        + f". mAP on the validation set through the same evaluator; latency: batch 1, {cfg.input_size} px, "
        f"{cfg.threads} threads{' (spinning)' if cfg.spinning else ''}, median of {cfg.runs} runs interleaved "
        "in blocks per model (ratios: median of the ratios of paired runs), network share from each runtime's "
        "profiler. OpenVINO runs the same files (the INT8 form chosen in ONNX Runtime). Last column: INT8 end "
        "to end against the dense FP32 file in the same runtime.\n\n"
        + skipped + deploy_markdown(rows, reference_ms=dense_ms)
    )
