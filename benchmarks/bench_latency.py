"""Latency of structured (channels cut) vs masked (weights zeroed) pruning, side by side.

Builds one detector at a real ``--size`` input (``min_size = max_size = size``), makes pruned copies
(structured L1 at each ``--ratios``, masked magnitude at each ``--sparsities``; untrained weights are
fine for timing), then measures params, MACs (fvcore) and latency interleaved across all models, and
writes the bench CSV (:data:`surgery.bench.BENCH_COLUMNS`). Usage:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_latency.py --csv benchmarks/bench_latency.csv
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
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
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args()

    from surgery.bench import BenchRow, write_csv
    from surgery.masked import prune_masked
    from surgery.measure import (
        configured_detections,
        count_macs,
        count_params,
        measure_latency,
        state_dict_size,
    )
    from surgery.models import build_model, is_torchvision_model
    from surgery.prune import prune_model
    from surgery.recipe import PruneSection

    torch.manual_seed(0)
    sized = is_torchvision_model(args.model) and not args.model.startswith("ssd")
    kwargs = {"min_size": args.size, "max_size": args.size} if sized or args.model == "fcos_resnet18_slim" else {}
    dense = build_model(args.model, **kwargs).eval()
    models: dict[str, tuple[torch.nn.Module, str, float | None, float | None, str]] = {
        "dense": (dense, "dense", None, None, "dense")
    }
    for r in args.ratios:
        m = copy.deepcopy(dense)
        prune_model(m, PruneSection(ratio=r), trace_size=args.size)
        models[f"l1-{r:g}"] = (m, "l1", r, None, "structured")
    for s in args.sparsities:
        m = copy.deepcopy(dense)
        prune_masked(m, s)
        models[f"masked-{s:g}"] = (m, "magnitude", None, s, "masked")

    info = {}
    for name, (m, *_rest) in models.items():
        params, nonzero = count_params(m)
        macs = count_macs(m, args.size, rois=None, detections=configured_detections(m)).total
        info[name] = (params, nonzero, macs, *state_dict_size(m))
        print(f"{name:>12}: {params / 1e6:6.2f}M params ({nonzero / 1e6:.2f}M nonzero), {macs / 1e9:.2f} GMACs")

    lat = measure_latency(
        {n: v[0] for n, v in models.items()},
        args.size,
        batch_sizes=args.batch_sizes,
        warmup=args.warmup,
        runs=args.runs,
        threads=args.threads,
        device=args.device,
    )
    ref_lat = {r.batch_size: r.median_ms for r in lat if r.name == "dense"}
    rows = []
    for r in lat:
        _, method, ratio, sparsity, kind = models[r.name]
        params, nonzero, macs, fbytes, fgzip = info[r.name]
        rows.append(
            BenchRow(
                model=args.model, method=method, ratio=ratio, sparsity=sparsity, kind=kind, device=r.device,
                torch=torch.__version__, threads=r.threads, input_size=args.size, batch_size=r.batch_size,
                params=params, params_nonzero=nonzero, macs=macs, latency_ms_median=r.median_ms,
                latency_ms_p90=r.p90_ms, images_per_s=r.images_per_s, peak_mem_mb=r.peak_mem_mb,
                file_bytes=fbytes, file_gzip_bytes=fgzip, mAP=None, mAP50=None,
                params_ratio=params / info["dense"][0], macs_ratio=macs / info["dense"][2],
                latency_ratio=r.median_ms / ref_lat[r.batch_size], checkpoint=r.name,
            )
        )  # fmt: skip
        print(
            f"{r.name:>12} bs={r.batch_size}: {r.median_ms:7.1f} ms median, {r.p90_ms:7.1f} ms p90, "
            f"{r.images_per_s:6.1f} img/s, x{rows[-1].latency_ratio:.2f} vs dense"
        )
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
