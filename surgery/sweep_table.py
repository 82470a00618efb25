"""The sweep's table: one :class:`SweepRow` per variant (``results.csv``'s columns, in order), the
columns a MACs target adds, and the plots of a finished sweep."""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .pruning.plan import plan_chain
from .report import (
    MIN_REFERENCE_MAP,
    plot_detections_grid,
    plot_latency_vs_ratio,
    plot_layer_widths,
    plot_map_vs_macs,
)
from .storage.atomic import atomic_open
from .storage.checkpoint import load_checkpoint, read_checkpoint


@dataclass
class SweepRow:
    """One row of ``results.csv`` (its columns, in this order, are :data:`SWEEP_COLUMNS`)."""

    variant: str
    method: str
    ratio: float | None
    target_macs: float | None
    sparsity: float | None
    params: int
    params_nonzero: int
    size_mb: float  # float32 weights as saved
    size_gzip_mb: float  # what masked (zeroed) weights really cost
    macs: int
    latency_ms: float
    latency_ms_p90: float
    params_ratio: float
    macs_ratio: float
    latency_ratio: float
    network_ms: float | None
    network_ratio: float
    map_pruned: float
    map50_pruned: float
    map_recovered: float | None  # after the cut + recovery without retraining (prune.recover), before training
    map_retrained: float
    map50_retrained: float
    dense_map: float
    dense_control_map: float
    retained_map: float | None
    retrain_steps: int
    retrain_seconds: float
    input_size: int
    threads: int
    torch: str
    checkpoint: str
    achieved_macs_ratio: float | None = None  # MACs kept after all cuts (a MACs target's variants)
    target_met: bool | None = None  # within TARGET_TOL of the MACs target (empty without one)
    sparse_steps: int | None = None  # '+sparse' variants: sparse training steps taken from the budget
    map_sparse: float | None = None  # mAP after that sparse training, before the cut


SWEEP_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SweepRow))
TARGET_TOL = 0.02  # a MACs target is met when the achieved fraction is within 2% (relative) of it


def kept_macs(pruned_path: Path) -> float:
    """Fraction of the dense MACs a (progressively) pruned checkpoint kept: the product over its
    plan chain of each cut's measured MACs ratio."""
    kept = 1.0
    for p in plan_chain(read_checkpoint(pruned_path).plan):
        kept *= getattr(p, "achieved_macs_ratio", None) or 1.0
    return kept


def target_columns(v: dict[str, Any]) -> dict[str, Any]:
    """``achieved_macs_ratio`` (all cuts, at bench.input_size), ``target_met`` (within
    :data:`TARGET_TOL` of a MACs target; empty without one), ``sparse_steps`` and ``map_sparse``
    (mAP after the sparse training of '+sparse' variants)."""
    cols: dict[str, Any] = {"sparse_steps": v.get("sparse_steps") or None,
                            "map_sparse": round(v["sparse"]["mAP"], 4) if v.get("sparse") else None}
    if v["method"] == "masked" or v.get("target_macs") is None:
        return cols  # a ratio point: its MACs ratio is the bench's macs_ratio column
    achieved = kept_macs(v["pruned_path"])
    cols["achieved_macs_ratio"] = round(achieved, 4)
    cols["target_met"] = abs(achieved / v["target_macs"] - 1.0) <= TARGET_TOL
    return cols


def sweep_row(variant, method, ratio, sparsity, bench, pruned, retrained, dense, control, ckpt, recipe,  # noqa: ANN001
         target_macs=None) -> dict[str, Any]:
    # a dense reference below the floor makes the ratio noise ("retained 279.9%" at mAP 0.001)
    retained = retrained["mAP"] / control["mAP"] if (control.get("mAP") or 0.0) >= MIN_REFERENCE_MAP else None
    return dataclasses.asdict(SweepRow(
        variant=variant, method=method, ratio=ratio, target_macs=target_macs, sparsity=sparsity,
        params=bench.params, params_nonzero=bench.params_nonzero,
        size_mb=round(bench.file_bytes / 1e6, 2), size_gzip_mb=round(bench.file_gzip_bytes / 1e6, 2),
        macs=bench.macs, latency_ms=round(bench.latency_ms_median, 3), latency_ms_p90=round(bench.latency_ms_p90, 3),
        params_ratio=round(bench.params_ratio, 4), macs_ratio=round(bench.macs_ratio, 4),
        latency_ratio=round(bench.latency_ratio, 4),
        network_ms=None if bench.network_ms_median is None else round(bench.network_ms_median, 3),
        network_ratio=round(bench.network_ratio, 4),
        map_pruned=round(pruned["mAP"], 4), map50_pruned=round(pruned["mAP50"], 4),
        map_recovered=round(pruned["mAP_recovered"], 4) if pruned.get("mAP_recovered") is not None else None,
        map_retrained=round(retrained["mAP"], 4), map50_retrained=round(retrained["mAP50"], 4),
        dense_map=round(dense["mAP"], 4), dense_control_map=round(control["mAP"], 4),
        retained_map=None if retained is None else round(retained, 4),
        retrain_steps=recipe.retrain.steps, retrain_seconds=round(float(retrained.get("seconds", 0.0)), 1),
        input_size=recipe.bench.input_size, threads=bench.threads, torch=bench.torch, checkpoint=str(ckpt),
    ))  # fmt: skip


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(SWEEP_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in SWEEP_COLUMNS})


def sweep_plots(rows, variants, out: Path, val_set, control_path: Path, recipe: Any) -> dict[str, Path]:  # noqa: ANN001
    """A sweep's plots: mAP vs MACs, latency vs ratio, the layer widths and detections of the
    variant closest to half the channels (and a masked one) next to the dense control."""
    plots = {
        "map_vs_macs": plot_map_vs_macs(rows, out / "map_vs_macs.png"),
        "latency_vs_ratio": plot_latency_vs_ratio(rows, out / "latency_vs_ratio.png"),
    }
    structured = [v for v in variants if v["method"].startswith("structured")]
    if structured:
        mid = min(structured, key=lambda v: abs(v["ratio"] - 0.5))
        plan = read_checkpoint(mid["pruned_path"]).plan
        plots["layer_widths"] = plot_layer_widths(plan.widths_before, plan.widths_after, out / "layer_widths.png",
                                                  variant=mid["variant"])
        models = {"dense": control_path, f"{mid['variant']} pruned": mid["pruned_path"],
                  f"{mid['variant']} retrained": mid["checkpoint"]}
        masked = [v for v in variants if v["method"] == "masked"]
        if masked:
            mm = min(masked, key=lambda v: abs(v["sparsity"] - 0.75))
            models[f"{mm['variant']} retrained"] = mm["checkpoint"]
        n = min(4, len(val_set))
        images = [val_set[i][0] for i in range(n)]
        preds = {}
        for label, path in models.items():
            model = load_checkpoint(path)[0].eval()
            with torch.no_grad():
                preds[label] = model(images)
        plots["detections"] = plot_detections_grid(images, preds, out / "detections.png",
                                                   class_names=getattr(val_set, "class_names", None),
                                                   ground_truth=[val_set[i][1] for i in range(n)])
    return plots
