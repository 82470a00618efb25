"""mAP and ONNX Runtime latency of float vs INT8 PTQ vs INT8 QAT, per checkpoint.

For each checkpoint (e.g. the quickstart's dense model and a 50%-channel pruned one): export it to
float ONNX, quantize it (PTQ, calibrated on ``--calib-batches x 8`` training images), fine-tune
``--qat-steps`` steps with fake-quantized layers (:class:`surgery.qat.QATHook`, the checkpoint's
retrain recipe) and quantize that too; then COCO mAP of every ONNX file on the first ``--val-images``
validation images (through :class:`surgery.runtime.OnnxDetector` and :func:`surgery.evaluate.evaluate`)
and end-to-end ONNX Runtime latency (batch 1, ``--threads`` threads, spin-waiting off), measured
interleaved across all files so a busy machine slows them alike. Writes one CSV row per file:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quantize_bench.py runs/quickstart/dense.pt \\
        runs/quickstart/l1+distill-macs0.25.pt --out-dir runs/quantize --csv benchmarks/quantize_bench.csv
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import csv  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

COLUMNS = ["checkpoint", "variant", "onnx", "mAP", "mAP50", "mAP_minus_float", "latency_ms", "latency_vs_float",
           "file_mib", "quantized_nodes", "qat_steps"]  # fmt: skip


def _qat(ckpt: Path, out: Path, steps: int) -> Path:
    from surgery.checkpoint import read_checkpoint
    from surgery.qat import QATHook
    from surgery.workflows import recipe_for_checkpoint, retrain_checkpoint

    rec = recipe_for_checkpoint(read_checkpoint(ckpt), None, {"retrain.steps": steps, "retrain.checkpoint_every": 0})
    rec.retrain.epochs = None
    rec.retrain.lr = rec.retrain.lr * 0.1  # fine-tuning a trained model: a tenth of its retraining rate
    rec.retrain.warmup_steps = min(rec.retrain.warmup_steps, steps // 4)
    rec.retrain.distill = None  # QAT alone: the row measures quantization, not another technique
    return retrain_checkpoint(ckpt, rec, out, evaluate=False, hooks=[QATHook()]).out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/quantize"))
    ap.add_argument("--csv", type=Path, default=Path("benchmarks/quantize_bench.csv"))
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--qat-steps", type=int, default=100, help="0: no QAT rows")
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from surgery.atomic import atomic_open
    from surgery.checkpoint import read_checkpoint
    from surgery.data import dataset_for
    from surgery.evaluate import evaluate
    from surgery.quantize import quantize_checkpoint
    from surgery.runtime import OnnxDetector

    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    files: list[tuple[dict, OnnxDetector]] = []
    for ckpt in args.checkpoints:
        stem = ckpt.stem
        float_path = args.out_dir / f"{stem}.onnx"
        ptq = quantize_checkpoint(ckpt, args.out_dir / f"{stem}.int8.onnx", calib_batches=args.calib_batches,
                                  keep_float=float_path, verify_images=0)  # fmt: skip
        variants = [("float", float_path, None, 0), ("int8-ptq", ptq.path, ptq, 0)]
        if args.qat_steps > 0:
            qat_ckpt = _qat(ckpt, args.out_dir / f"{stem}.qat.pt", args.qat_steps)
            qat = quantize_checkpoint(qat_ckpt, args.out_dir / f"{stem}.qat.int8.onnx", calib_batches=args.calib_batches,
                                      verify_images=0)  # fmt: skip
            variants.append(("int8-qat", qat.path, qat, args.qat_steps))
        val = dataset_for((read_checkpoint(ckpt).recipe or {}).get("data"), "val", train=False)
        float_map = None
        for variant, path, res, steps in variants:
            det = OnnxDetector(path, args.threads)
            m = evaluate(det, val, max_images=args.val_images).metrics
            float_map = m["mAP"] if float_map is None else float_map
            row = {"checkpoint": str(ckpt), "variant": variant, "onnx": str(path), "mAP": round(m["mAP"], 4),
                   "mAP50": round(m["mAP50"], 4), "mAP_minus_float": round(m["mAP"] - float_map, 4),
                   "file_mib": round(path.stat().st_size / 2**20, 2),
                   "quantized_nodes": res.quantized_nodes if res else 0, "qat_steps": steps}  # fmt: skip
            rows.append(row)
            files.append((row, det))
            print(f"{stem:28s} {variant:9s} mAP {m['mAP']:.3f} mAP50 {m['mAP50']:.3f}", flush=True)

    image = val.load_image(0)
    times: dict[int, list[float]] = {id(r): [] for r, _ in files}
    for _, det in files:  # warm-up
        det([image])
    for _ in range(args.runs):  # interleaved: every file once per round
        for row, det in files:
            t0 = time.perf_counter()
            det([image])
            times[id(row)].append(time.perf_counter() - t0)
    base = None
    for row, _ in files:
        ms = statistics.median(times[id(row)]) * 1000
        base = ms if row["variant"] == "float" else base
        row["latency_ms"] = round(ms, 2)
        row["latency_vs_float"] = round(ms / base, 3)
    with atomic_open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    for row in rows:
        print(", ".join(f"{k}={row[k]}" for k in COLUMNS if k not in ("onnx", "checkpoint")))


if __name__ == "__main__":
    main()
