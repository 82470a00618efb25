"""`surgery compress`'s search alone at a MACs budget: the best trial's proxy mAP (after recovery,
on the held-out calibration split) against the uniform allocation's (trial 0), and how long the
search took. Optionally retrains the first N finished trials to measure how well the proxy ranks
them (Spearman's rho between proxy mAP and mAP after retraining, on the validation split).

    nice -n 5 python benchmarks/compress_bench.py --dense runs/quickstart/dense.pt --trials 30 \\
        --keep-macs 0.5 --csv benchmarks/compress_bench.csv

``--dense`` missing: the quickstart recipe's dense model is trained first (``--dense-steps``).
Every row of the CSV is one trial; the summary lines go to stdout with the load (``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows a shared CPU 10-40x

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.compress import (  # noqa: E402
    Goal,
    SearchSettings,
    SearchSpace,
    rebuild_trial,
    resolve_sensitivity,
    search,
)
from surgery.config.catalog import find_recipe  # noqa: E402
from surgery.config.recipe import apply_overrides, load_recipe  # noqa: E402
from surgery.data import dataset_for  # noqa: E402
from surgery.measure.evaluate import evaluate  # noqa: E402
from surgery.storage.checkpoint import load_checkpoint, save_pruned  # noqa: E402
from surgery.training.callbacks import Callbacks  # noqa: E402
from surgery.workflows import retrain_checkpoint, train_from_recipe  # noqa: E402


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--dense", type=Path, default=None)
    ap.add_argument("--dense-steps", type=int, default=None, help="train the dense model this many steps (default: the recipe's)")
    ap.add_argument("--work", type=Path, default=Path("runs/compress_bench"))
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--keep-macs", type=float, default=0.5)
    ap.add_argument("--recover", type=int, default=16)
    ap.add_argument("--holdout", type=int, default=64)
    ap.add_argument("--criteria", default="l1,l2,bn")
    ap.add_argument("--round-to", default="8")
    ap.add_argument("--multiplier", default="0.5,1.5", help="range of the per-stage multipliers")
    ap.add_argument("--max-stages", type=int, default=8, help="at most this many stages (one multiplier each)")
    ap.add_argument("--sensitivity", default=None,
                    help="a `surgery sensitivity` CSV, or label-free (measured first, as `surgery compress` does by default): "
                         "sens_power searched too")
    ap.add_argument("--study", default="bench")
    ap.add_argument("--time", type=float, default=None, help="stop the search after this many minutes")
    ap.add_argument("--retrain", type=int, default=0, help="retrain this many finished trials (rank correlation)")
    ap.add_argument("--retrain-steps", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1, help="processes searching together (torch threads split)")
    ap.add_argument("--csv", type=Path, default=Path("benchmarks/compress_bench.csv"))
    args = ap.parse_args()

    rec = load_recipe(find_recipe(args.recipe) or args.recipe)
    args.work.mkdir(parents=True, exist_ok=True)
    dense_path = args.dense or args.work / "dense.pt"
    if not dense_path.exists():
        train_rec = apply_overrides(copy.deepcopy(rec), {"train.steps": args.dense_steps})
        train_from_recipe(train_rec, dense_path, evaluate=False)
    dense, _ = load_checkpoint(dense_path)
    settings = SearchSettings(trials=args.trials, recover_batches=args.recover, holdout=args.holdout,
                              seconds=args.time * 60 if args.time else None,
                              macs_input_size=rec.bench.input_size, study_name=args.study, workers=args.workers)
    lo, hi = (float(x) for x in args.multiplier.split(","))
    space = SearchSpace(criteria=tuple(args.criteria.split(",")), round_to=tuple(int(x) for x in args.round_to.split(",")),
                        multiplier=(lo, hi), max_stages=args.max_stages, sensitivity=args.sensitivity)
    t0, load0 = time.perf_counter(), os.getloadavg()
    space = resolve_sensitivity(space, dense, rec, args.work / "search", settings.macs_input_size)
    result = search(dense, rec, Goal(keep_macs=args.keep_macs), args.work / "search", space=space, settings=settings,
                    callbacks=Callbacks(on_note=lambda s: print(s, flush=True)))
    seconds = time.perf_counter() - t0
    done = sorted(result.complete, key=lambda t: t.number)
    retrained = _retrain(dense_path, rec, result, done[: args.retrain], settings, space, args) if args.retrain else {}
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study", "model", "trial", "uniform", "proxy_map", "macs_ratio", "criterion", "round_to", "seconds",
                    "retrained_map", "multipliers"])
        for t in done:
            mults = " ".join(f"{k.split(':', 1)[1]}={v:.2f}" for k, v in sorted(t.params.items()) if k.startswith("mult:"))
            w.writerow([args.study, rec.model.name, t.number, int(t.number == 0), f"{t.proxy_map:.4f}", f"{t.macs_ratio:.4f}",
                        t.params["criterion"], t.params["round_to"], t.seconds,
                        f"{retrained[t.number]:.4f}" if t.number in retrained else "", mults])
    uniform = next(t for t in done if t.number == 0)
    best = result.chosen
    trial_min = sum(t.seconds or 0 for t in done) / 60
    print(f"{rec.model.name}: {len(done)} trials ({trial_min:.1f} min of trials) in {seconds / 60:.1f} min (load {load0[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}); dense proxy mAP {result.dense_map:.4f}; uniform #0 {uniform.proxy_map:.4f} "
          f"at {uniform.macs_ratio:.1%} MACs; best #{best.number} {best.proxy_map:.4f} at {best.macs_ratio:.1%} "
          f"({100 * (best.proxy_map - uniform.proxy_map):+.2f} points)")
    if len(retrained) >= 3:
        nums = sorted(retrained)
        rho = spearman([next(t.proxy_map for t in done if t.number == n) for n in nums], [retrained[n] for n in nums])
        print(f"Spearman rho (proxy vs retrained, {len(nums)} trials): {rho:.3f}")


def _retrain(dense_path: Path, rec, result, trials, settings, space, args) -> dict[int, float]:  # noqa: ANN001
    dense, ckpt = load_checkpoint(dense_path)
    val = dataset_for(rec.data, "val", train=False)
    out: dict[int, float] = {}
    r2 = apply_overrides(copy.deepcopy(rec), {"retrain.steps": args.retrain_steps})
    for t in trials:
        model, pruned = rebuild_trial(dense, rec, t, settings, space)
        pruned.plan.source = str(dense_path.resolve())
        path = save_pruned(args.work / f"trial{t.number}.pt", model, ckpt.spec, pruned.plan, recipe=r2.to_dict())
        outcome = retrain_checkpoint(path, copy.deepcopy(r2), args.work / f"trial{t.number}.retrained.pt", evaluate=False)
        final, _ = load_checkpoint(outcome.out)
        out[t.number] = float(evaluate(final, val, iou_types=("bbox",)).metrics["mAP"])
        print(f"trial {t.number}: proxy {t.proxy_map:.4f}, retrained {out[t.number]:.4f}", flush=True)
    return out


if __name__ == "__main__":
    main()
