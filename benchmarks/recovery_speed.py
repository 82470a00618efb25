"""The least-squares recovery's time with the outputs of finished modules replayed (the default,
``surgery.pruning.recover._Replay``) against recomputing every pass (``replay_bytes=0``), on each
family cut by half with l1, and whether both give the same weights.

The two runs of each model alternate (A B A B ...) in one process, so a change of machine load
hits both; the CSV keeps every run's seconds, the speed-up is the ratio of the medians.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/recovery_speed.py --csv benchmarks/recovery_speed.csv
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows a shared CPU 10-40x

import argparse  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.util import find_spec  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.config.recipe import PruneSection  # noqa: E402
from surgery.detectors.builders import ModelSpec, build_model  # noqa: E402
from surgery.pruning.prune import prune_model  # noqa: E402
from surgery.pruning.recover import RECOVER_BATCH_SIZE, recover  # noqa: E402

MODELS = [  # (name, kwargs, image side)
    ("fcos_resnet18_slim", {"num_classes": 5, "min_size": 128, "max_size": 128}, 128),
    ("retinanet_resnet18_slim", {"num_classes": 5, "min_size": 128, "max_size": 128}, 128),
    ("ssdlite320_mobilenet_v3_large", {"num_classes": 5}, 320),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 5, "rpn_post_nms_top_n_test": 64,
                                               "box_detections_per_img": 20}, 320),
]
YOLOS = [("ultralytics:yolov8n.yaml", {"nc": 4, "size": 128}, 128), ("ultralytics:yolo11n.yaml", {"nc": 4, "size": 128}, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each mode per model (alternating)")
    ap.add_argument("--csv", type=Path, default=Path("benchmarks/recovery_speed.csv"))
    args = ap.parse_args()
    models = MODELS + (YOLOS if find_spec("ultralytics") else [])
    rows = []
    for name, kwargs, side in models:
        torch.manual_seed(0)
        model = build_model(ModelSpec(name, kwargs)).eval()
        dense = copy.deepcopy(model).eval()
        result = prune_model(model, PruneSection(ratio=0.5), trace_size=side)
        g = torch.Generator().manual_seed(0)
        batches = [[torch.rand(3, side, side, generator=g) for _ in range(RECOVER_BATCH_SIZE)] for _ in range(args.batches)]
        seconds: dict[str, list[float]] = {"replay": [], "recompute": []}
        weights = {}
        for _ in range(args.rounds):
            for mode, budget in (("recompute", 0), ("replay", None)):
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                kw = {} if budget is None else {"replay_bytes": budget}
                rec = recover(m, dense, batches, kept=result.kept, batches=args.batches, **kw)
                seconds[mode].append(time.perf_counter() - t0)
                weights[mode] = m.state_dict()
        same = all(torch.equal(weights["replay"][k], weights["recompute"][k]) for k in weights["recompute"])
        med = {k: statistics.median(v) for k, v in seconds.items()}
        rows.append({"date": datetime.date.today().isoformat(), "model": name, "size": side, "batches": args.batches,
                     "layers_refit": len(rec.refit), "threads": torch.get_num_threads(), "load": f"{os.getloadavg()[0]:.1f}",
                     "seconds_recompute": " ".join(f"{s:.1f}" for s in seconds["recompute"]),
                     "seconds_replay": " ".join(f"{s:.1f}" for s in seconds["replay"]),
                     "speedup": f"{med['recompute'] / med['replay']:.2f}", "same_weights": same})
        print(rows[-1], flush=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
