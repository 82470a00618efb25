"""mAP and ONNX Runtime latency of float vs INT8 PTQ vs INT8 QAT, per checkpoint (the deployment
table of :mod:`surgery.deployment.table`): for each checkpoint (e.g. the quickstart's dense model and a
50%-channel pruned one) the float export, its INT8 PTQ copy (calibrated on ``--calib-batches x 8``
training images) and, with ``--qat-steps``, an INT8 copy after that many quantization-aware
fine-tuning steps; COCO mAP of each file on the first ``--val-images`` validation images, network and
end-to-end ONNX Runtime latency (batch 1, interleaved), file sizes. Writes the CSV and prints the
markdown table:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quantize_bench.py runs/quickstart/dense.pt \\
        runs/quickstart/l1+distill-keep-macs0.5.pt --out-dir runs/quantize --csv benchmarks/quantize_bench.csv
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, nargs="+", help="the first one is the dense reference")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/quantize"))
    ap.add_argument("--csv", type=Path, default=Path("benchmarks/quantize_bench.csv"))
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--qat-steps", type=int, default=100, help="0: no QAT rows")
    ap.add_argument("--val-images", type=int, default=None)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from surgery.data import dataset_for
    from surgery.deployment.table import deploy_markdown, deploy_table, write_deploy_csv
    from surgery.storage.checkpoint import read_checkpoint

    torch.set_num_threads(args.threads)
    val = dataset_for((read_checkpoint(args.checkpoints[0]).recipe or {}).get("data"), "val", train=False)
    rows = deploy_table(args.checkpoints, args.out_dir, val, calib_batches=args.calib_batches, qat_steps=args.qat_steps,
                        max_images=args.val_images, runs=args.runs, threads=args.threads,
                        progress=lambda what: print(what, flush=True))  # fmt: skip
    write_deploy_csv(rows, args.csv)
    dense_ms = next(r.latency_ms for r in rows if r.precision == "fp32")
    print(deploy_markdown(rows, reference_ms=dense_ms))
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
