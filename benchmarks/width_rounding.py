"""Width rounding, measured: the same detector pruned at the same ratio with ``round_to`` 1, 8, 16
and 32 (kept channel counts rounded up to that multiple), then benched in each runtime (eager
PyTorch, ONNX Runtime): MACs ratio against network and end-to-end latency ratios, per batch size.

Published anchor: rounding pruned widths turned a 2.15x MACs cut from a 1.44x into a 1.95x latency
gain on a CPU runtime. Here the question is which multiple makes latency follow the MACs best
(``network_ratio / macs_ratio`` closest to 1) on this CPU. Untrained weights are fine for timing.
Writes ``round_to`` + :data:`surgery.measure.bench.BENCH_COLUMNS` rows. Usage:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/width_rounding.py --csv benchmarks/width_rounding.csv
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["fcos_resnet18_slim", "ssdlite320_mobilenet_v3_large"])
    ap.add_argument("--ratio", type=float, default=0.4, help="0.5 of power-of-two widths is round already")
    ap.add_argument("--scope", default="layer", choices=["layer", "global"])
    ap.add_argument("--round-to", type=int, nargs="*", default=[1, 8, 16, 32])
    ap.add_argument("--runtimes", nargs="*", default=["torch", "onnxruntime"])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args()

    from surgery.config.recipe import BenchSection, PruneSection
    from surgery.detectors.builders import ModelSpec, build_model, is_torchvision_model
    from surgery.measure.bench import BENCH_COLUMNS, bench_checkpoints
    from surgery.pruning.prune import prune_model
    from surgery.storage.atomic import atomic_open
    from surgery.storage.checkpoint import save_checkpoint

    out_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="surgery-rounding-") as tmp:
        for name in args.models:
            torch.manual_seed(0)
            sized = (is_torchvision_model(name) and not name.startswith("ssd")) or name == "fcos_resnet18_slim"
            spec = ModelSpec(name, {"min_size": args.size, "max_size": args.size} if sized else {})
            dense = build_model(spec).eval()
            paths = [save_checkpoint(Path(tmp) / f"{name}-dense.pt", dense, spec, kind="dense")]
            for r in args.round_to:
                m = copy.deepcopy(dense)
                res = prune_model(m, PruneSection(ratio=args.ratio, round_to=r, scope=args.scope), trace_size=min(args.size, 320))
                paths.append(save_checkpoint(Path(tmp) / f"{name}-r{r}.pt", m, spec, kind="structured", plan=res.plan))
            for runtime in args.runtimes:
                cfg = BenchSection(input_size=args.size, batch_sizes=args.batch_sizes, warmup=args.warmup,
                                   runs=args.runs, threads=args.threads, runtime=runtime)
                rows = bench_checkpoints(paths, cfg)
                for row in rows:
                    d = row.to_dict()
                    stem = Path(d["checkpoint"]).stem
                    d["round_to"] = "" if stem.endswith("dense") else int(stem.rsplit("-r", 1)[1])
                    d["checkpoint"] = stem
                    out_rows.append(d)
                    print(
                        f"{name:>32} {runtime:>11} round_to {d['round_to'] or '-':>2} bs {d['batch_size']}: "
                        f"MACs x{d['macs_ratio']:.3f}  network x{d['network_ratio']:.3f} "
                        f"({d['network_ms_median']:.1f} ms)  e2e x{d['latency_ratio']:.3f} ({d['latency_ms_median']:.1f} ms)",
                        flush=True,
                    )
    if args.csv:
        with atomic_open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=("round_to", *BENCH_COLUMNS), extrasaction="ignore")
            w.writeheader()
            w.writerows(out_rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
