"""One pruned model, several ways to retrain it, the same step budget: the probes behind the
recovery notes in README.md ("Keeping the mAP").

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/recovery_probe.py DENSE.pt --ratio 0.5 \\
        --variant control --variant l1 --variant "l1:lr=0.001" --variant "l1+distill:w=10" \\
        --variant "l1+distill:w=1:r=1" --csv probe.csv

A variant is ``control`` (no cut) or ``l1`` (cut ``--ratio`` of the channels with the recipe's
prune section), optionally ``+distill`` (feature imitation of DENSE), then ``:key=value`` options:
``lr`` (retraining learning rate), ``w`` (imitation weight), ``r`` (response-distillation weight).
Every variant retrains with the recipe's ``retrain`` section (same steps, same seed) and is
evaluated on the recipe's validation set. One CSV row per variant.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows a busy machine

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from surgery.config.recipe import DistillSection, load_recipe  # noqa: E402
from surgery.measure import count_macs  # noqa: E402
from surgery.measure.evaluate import evaluate  # noqa: E402
from surgery.pruning.prune import prune_model  # noqa: E402
from surgery.storage.checkpoint import load_checkpoint  # noqa: E402
from surgery.training.distill import FeatureImitation  # noqa: E402
from surgery.training.train import build_trainer  # noqa: E402
from surgery.workflows import load_datasets  # noqa: E402

COLUMNS = ("variant", "ratio", "macs_ratio", "map", "map50", "seconds", "losses")


def run(dense: str, recipe_path: str, ratio: float, variant: str, train_set, val_set) -> dict:
    rec = load_recipe(recipe_path)
    name, *opts = variant.split(":")
    opt = dict(o.split("=", 1) for o in opts)
    t0 = time.perf_counter()
    model, ck = load_checkpoint(dense)
    size = rec.bench.input_size
    macs0 = count_macs(model, size).total
    if name != "control":
        prune_model(model, dataclasses.replace(rec.prune, ratio=ratio, recover=0))  # retrained, not recovered
    hooks = []
    if "distill" in name:
        cfg = DistillSection(type="imitation", weight=float(opt.get("w", 1.0)),
                             response_weight=float(opt.get("r", 0.0)))
        hooks.append(FeatureImitation(load_checkpoint(dense)[0], model, cfg, teacher_path=dense))
    train_cfg = dataclasses.replace(rec.retrain, lr=float(opt.get("lr", rec.retrain.lr)))
    torch.manual_seed(train_cfg.seed)
    result = build_trainer(model, ck.spec, train_set, train_cfg, hooks=hooks).train()
    m = evaluate(model, val_set, batch_size=8).metrics
    return {"variant": variant, "ratio": ratio if name != "control" else 0.0,
            "macs_ratio": round(count_macs(model, size).total / macs0, 4), "map": round(float(m["mAP"]), 4),
            "map50": round(float(m["mAP50"]), 4), "seconds": round(time.perf_counter() - t0, 1),
            "losses": {k: round(v, 4) for k, v in result.losses.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dense", help="dense checkpoint (e.g. runs/quickstart/dense.pt)")
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    train_set, val_set = load_datasets(load_recipe(args.recipe), hflip=load_recipe(args.recipe).retrain.hflip)
    rows = []
    for v in args.variant:
        rows.append(run(args.dense, args.recipe, args.ratio, v, train_set, val_set))
        print(rows[-1], flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
