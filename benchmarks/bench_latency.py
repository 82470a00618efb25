"""Latency of structured (channels cut) vs masked (weights zeroed) pruning, side by side.

Builds one detector at a real ``--size`` input (``min_size = max_size = size``), makes pruned copies
(structured L1 at each ``--ratios``, masked magnitude at each ``--sparsities``; untrained weights are
fine for timing), then measures params, MACs (fvcore) and latency interleaved across all models, and
writes the bench CSV (:data:`surgery.measure.bench.BENCH_COLUMNS`). Usage:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_latency.py --csv benchmarks/bench_latency.csv
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fcos_resnet18_slim")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    ap.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.9])
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"])
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args()

    from surgery.config.recipe import BenchSection, PruneSection
    from surgery.detectors.builders import ModelSpec, build_model, is_torchvision_model
    from surgery.measure.bench import bench_checkpoints, write_csv
    from surgery.pruning.masked import prune_masked
    from surgery.pruning.prune import prune_model
    from surgery.storage.checkpoint import save_checkpoint

    torch.manual_seed(0)
    sized = is_torchvision_model(args.model) and not args.model.startswith("ssd")
    kwargs = {"min_size": args.size, "max_size": args.size} if sized or args.model == "fcos_resnet18_slim" else {}
    spec = ModelSpec(args.model, kwargs)
    dense = build_model(spec).eval()
    with tempfile.TemporaryDirectory(prefix="surgery-latency-") as tmp:
        paths = [save_checkpoint(Path(tmp) / "dense.pt", dense, spec, kind="dense")]
        for r in args.ratios:
            m = copy.deepcopy(dense)
            res = prune_model(m, PruneSection(ratio=r), trace_size=args.size)
            paths.append(save_checkpoint(Path(tmp) / f"l1-{r:g}.pt", m, spec, kind="structured", plan=res.plan))
        for s in args.sparsities:
            m = copy.deepcopy(dense)
            masks = prune_masked(m, s).masks
            paths.append(save_checkpoint(Path(tmp) / f"masked-{s:g}.pt", m, spec, kind="masked", masks=masks))
        cfg = BenchSection(input_size=args.size, batch_sizes=args.batch_sizes, warmup=args.warmup, runs=args.runs,
                           threads=args.threads, device=args.device, runtime=args.runtime)
        rows = bench_checkpoints(paths, cfg)
    for r in rows:
        r.checkpoint = Path(r.checkpoint).stem
        print(
            f"{r.checkpoint:>12} bs={r.batch_size}: {r.latency_ms_median:7.1f} ms e2e (network {r.network_ms_median or 0:.1f}), "
            f"MACs x{r.macs_ratio:.2f}, e2e x{r.latency_ratio:.2f}, network x{r.network_ratio:.2f} vs dense"
        )
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
