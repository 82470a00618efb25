"""Label-free recovery (``prune.recover_method: reconstruct``) across families, no retraining: the
mAP right after the cut, after the least-squares re-fit (``refit``) and after reconstruction, as a
fraction of the dense model's, at 50% and 75% MACs cuts. One CSV row per family and cut.

    nice -n 5 .venv/bin/python benchmarks/label_free_recovery.py --families fcos,yolov8n \\
        --dense fcos=runs/dense/fcos.pt --dense yolov8n=runs/dense/yolov8n.pt --csv benchmarks/label_free_recovery.csv

Each family's recipe is ``benchmarks/recovery_families.py``'s (``recipes/recovery_<family>.yaml``):
its data (the calibration images: ``prune.recover`` batches of 8 from the train split, a quarter
held out; labels never read), its prune section (the cut, ``target_macs`` from ``--targets``),
its validation split (mAP). With the recipe's ``prune.allocation: sensitivity`` and
``prune.sensitivity: label-free`` (the YOLO recipes), the label-free table is measured first, as
``surgery prune`` measures it (held-out training images, no annotation; cached under ``--work``),
and its time is the row's ``table_seconds``; ``--allocation uniform`` cuts as before. The dense model is a checkpoint trained with the recipe's train section
(``--dense FAMILY=CKPT``; default ``runs/dense/FAMILY.pt``). Rows are appended as each cut finishes,
so a run stopped part-way keeps what it measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows a busy machine

import argparse  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_families import FAMILIES, ROOT  # noqa: E402

from surgery.config.recipe import load_recipe  # noqa: E402
from surgery.data import dataset_for  # noqa: E402
from surgery.measure import count_macs  # noqa: E402
from surgery.measure.evaluate import evaluate  # noqa: E402
from surgery.pruning.calibrate import calibration_data  # noqa: E402
from surgery.pruning.prune import prune_model  # noqa: E402
from surgery.pruning.reconstruct import (  # noqa: E402
    DEFAULT_AUGMENT,
    DEFAULT_FLOOR,
    DEFAULT_LOSS,
    DEFAULT_LR,
    DEFAULT_RESPONSE,
    DEFAULT_SECONDS,
    DEFAULT_STEPS,
    reconstruct,
)
from surgery.pruning.recover import RECOVER_BATCH_SIZE  # noqa: E402
from surgery.pruning.sensitivity import LABEL_FREE  # noqa: E402
from surgery.storage.checkpoint import load_checkpoint  # noqa: E402
from surgery.workflows import label_free_sensitivity  # noqa: E402

COLUMNS = ("variant", "date", "family", "model", "target_macs", "macs_ratio", "dense_map", "map_cut", "map_refit",
           "map_reconstruct", "retained_refit", "retained_reconstruct", "steps", "best_step", "stopped",
           "held_out_error_cut", "held_out_error_refit", "held_out_error_best", "calibration_images",
           "held_out_images", "seconds", "cpu_seconds", "budget_steps", "budget_seconds", "lr", "match", "load1_start", "load1_end", "loss", "floor", "augment", "response", "threads", "allocation",
           "table_seconds")


def measure(family: str, dense_path: str, target: float, args: argparse.Namespace, dense_map: float) -> dict:
    rec = load_recipe(args.recipes.get(family, ROOT / FAMILIES[family]))
    val = dataset_for(rec.data, "val", train=False)
    load0 = os.getloadavg()[0]
    model, _ = load_checkpoint(dense_path)
    model.eval()
    dense = copy.deepcopy(model)
    size = rec.bench.input_size
    macs0 = count_macs(model, size).total
    cfg = dataclasses.replace(rec.prune, target_macs=target, recover=0)
    if args.allocation == "uniform":
        cfg = dataclasses.replace(cfg, allocation="uniform", sensitivity=None)
    table_seconds = 0.0
    if cfg.allocation == "sensitivity" and cfg.sensitivity == LABEL_FREE:
        t0 = time.perf_counter()
        table = label_free_sensitivity(model, rec, Path(args.work) / family, size)
        cfg, table_seconds = dataclasses.replace(cfg, sensitivity=str(table)), time.perf_counter() - t0
    result = prune_model(model, cfg, macs_input_size=size)
    macs_ratio = count_macs(model, size).total / macs0
    map_cut = evaluate(model, val, batch_size=8).metrics["mAP"]
    scored: dict[str, float] = {}
    data = calibration_data(rec.data, batches=rec.prune.recover, batch_size=RECOVER_BATCH_SIZE, model=model)
    report = reconstruct(dense, model, data, kept=result.kept, batches=rec.prune.recover, steps=args.steps,
                         seconds=args.seconds, lr=args.lr, match=args.match, loss=args.loss, floor=args.floor,
                         augment=args.augment, response=args.response,
                         on_refit=lambda m: scored.__setitem__("refit", evaluate(m, val, batch_size=8).metrics["mAP"]))
    map_rec = evaluate(model, val, batch_size=8).metrics["mAP"]
    s = report.summary()
    return {"date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "family": family, "model": rec.model.name,
            "target_macs": target, "macs_ratio": round(macs_ratio, 4), "dense_map": round(dense_map, 4),
            "map_cut": round(map_cut, 4), "map_refit": round(scored["refit"], 4), "map_reconstruct": round(map_rec, 4),
            "retained_refit": round(scored["refit"] / dense_map, 4), "retained_reconstruct": round(map_rec / dense_map, 4),
            "steps": s["steps"], "best_step": s["best_step"], "stopped": s["stopped"],
            "held_out_error_cut": s["held_out_error_cut"], "held_out_error_refit": s["held_out_error_refit"],
            "held_out_error_best": s["held_out_error_best"], "calibration_images": s["calibration_images"],
            "held_out_images": s["held_out_images"], "seconds": s["seconds"], "cpu_seconds": s["cpu_seconds"], "budget_steps": args.steps,
            "budget_seconds": args.seconds, "lr": args.lr, "match": args.match, "load1_start": round(load0, 2),
            "load1_end": round(os.getloadavg()[0], 2), "variant": args.variant, "loss": args.loss, "floor": args.floor,
            "augment": args.augment, "response": args.response, "threads": args.threads,
            "allocation": cfg.allocation, "table_seconds": round(table_seconds, 1)}


def _upgrade_header(path: Path) -> None:
    """Rewrite a CSV written before the last columns were added with today's header (the old rows
    get empty cells), so appended rows line up."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and list(rows[0]) != list(COLUMNS):
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--dense", action="append", default=[], metavar="FAMILY=CKPT")
    ap.add_argument("--targets", default="0.5,0.25", help="fractions of the dense MACs kept")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--match", default="outputs", help="outputs | features (surgery.pruning.reconstruct.MATCHES)")
    ap.add_argument("--loss", default=DEFAULT_LOSS, help="energy | variance (surgery.pruning.reconstruct.LOSSES)")
    ap.add_argument("--floor", type=float, default=DEFAULT_FLOOR)
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=DEFAULT_AUGMENT)
    ap.add_argument("--response", type=float, default=DEFAULT_RESPONSE)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the cost is reported as CPU seconds)")
    ap.add_argument("--variant", default="default", help="a label for the CSV rows")
    ap.add_argument("--csv", default="benchmarks/label_free_recovery.csv")
    ap.add_argument("--recipe", action="append", default=[], metavar="FAMILY=YAML",
                    help="another recipe for a family (e.g. another data seed)")
    ap.add_argument("--allocation", choices=("recipe", "uniform"), default="recipe",
                    help="recipe: the recipe's allocation (label-free sensitivity for the YOLOs); uniform: one ratio")
    ap.add_argument("--work", default="runs/label_free_recovery", help="where label-free tables are cached")
    args = ap.parse_args()
    args.recipes = dict(r.split("=", 1) for r in args.recipe)
    torch.set_num_threads(args.threads)
    dense = {f: f"runs/dense/{f}.pt" for f in FAMILIES} | dict(d.split("=", 1) for d in args.dense)
    out = Path(args.csv)
    _upgrade_header(out)
    new = not out.is_file()
    for family in args.families.split(","):
        if family not in FAMILIES:
            sys.exit(f"error: unknown family {family!r}: expected one of {', '.join(FAMILIES)}")
        rec = load_recipe(args.recipes.get(family, ROOT / FAMILIES[family]))
        model, _ = load_checkpoint(dense[family])
        dense_map = evaluate(model, dataset_for(rec.data, "val", train=False), batch_size=8).metrics["mAP"]
        for target in (float(t) for t in args.targets.split(",")):
            row = measure(family, dense[family], target, args, dense_map)
            print(row, flush=True)
            with open(out, "a", newline="") as f:  # appended per cut: a stopped run keeps its rows
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                if new:
                    w.writeheader()
                    new = False
                w.writerow(row)


if __name__ == "__main__":
    main()
