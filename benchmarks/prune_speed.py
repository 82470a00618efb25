"""Time dependency analysis + cut and peak memory per builder (issue target: < 3 s, < 3 GB each on
2 CPU cores at 320x320).

Each builder runs in a fresh subprocess so peak RSS is its own. Usage:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/prune_speed.py --csv benchmarks/prune_speed.csv
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/prune_speed.py --yolo --csv benchmarks/prune_speed_yolo.csv

The Ultralytics YOLOs (``pip install 'surgery[yolo]'``) are included when the package is installed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

COLUMNS = [
    "date", "model", "size", "ratio", "threads", "torch", "groups", "prunable_groups", "params_before",
    "params_after", "seconds_analysis", "seconds_cut", "seconds_total", "rss_after_build_mb", "peak_rss_mb",
]


# Ultralytics detectors (optional extra) and the project's YOLOv2
# (YOLOv10 and YOLO26: NMS-free heads, both branches cut with the neck)
YOLO_MODELS = ["ultralytics:yolov8n.yaml", "ultralytics:yolov8s.yaml", "ultralytics:yolo11n.yaml",
               "ultralytics:yolo11s.yaml", "ultralytics:yolov10n.yaml", "ultralytics:yolo26n.yaml",
               "ultralytics:yolo26s.yaml", "yolov2_darknet19"]  # fmt: skip


def _kwargs(name: str, size: int) -> dict:
    from surgery.detectors.builders import is_torchvision_model

    if name.startswith("ultralytics:") or name == "yolov2_darknet19":
        return {"size": size}
    if (is_torchvision_model(name) and not name.startswith("ssd")) or name == "fcos_resnet18_slim":
        return {"min_size": size, "max_size": size}
    return {}


def _yolo_available() -> bool:
    from surgery.errors import UnknownModelError
    from surgery.yolo.ultralytics_adapter import _ultralytics

    try:
        _ultralytics()
    except UnknownModelError:
        return False
    return True


def _one(name: str, size: int, ratio: float, threads: int) -> dict:
    import resource
    import time

    import torch

    from surgery.config.recipe import PruneSection
    from surgery.detectors.builders import build_model
    from surgery.pruning.prune import prune_model

    torch.set_num_threads(threads)
    model = build_model(name, **_kwargs(name, size))
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = prune_model(model, PruneSection(ratio=ratio), trace_size=size)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = res.report
    return {
        "date": datetime.date.today().isoformat(), "model": name, "size": size, "ratio": ratio, "threads": threads,
        "torch": torch.__version__, "groups": len(r.groups), "prunable_groups": sum(g.prunable for g in r.groups),
        "params_before": r.params_before, "params_after": r.params_after,
        "seconds_analysis": round(r.seconds_analysis, 3), "seconds_cut": round(r.seconds_cut, 3),
        "seconds_total": round(total, 3), "rss_after_build_mb": round(rss_build), "peak_rss_mb": round(peak),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--yolo", action="store_true", help="only the YOLO family")
    ap.add_argument("--csv", type=Path, default=Path("benchmarks/prune_speed.csv"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_one(args.child, args.size, args.ratio, args.threads)))
        return
    from surgery.detectors.builders import list_models

    names = args.models or (YOLO_MODELS if args.yolo else list_models() + YOLO_MODELS[:-1])
    if not _yolo_available():
        names = [n for n in names if not n.startswith("ultralytics:")]
    rows = []
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--size", str(args.size), "--ratio", str(args.ratio),
             "--threads", str(args.threads)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            print(f"{name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:40s} analysis {row['seconds_analysis']:.2f}s cut {row['seconds_cut']:.2f}s "
              f"total {row['seconds_total']:.2f}s peak RSS {row['peak_rss_mb']} MB", flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
