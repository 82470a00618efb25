"""``surgery bench``: load checkpoints, measure them side by side (parameters, MACs, interleaved
latency, weight file size, optionally mAP) and write the rows under a fixed CSV schema
(:data:`BENCH_COLUMNS`). The measurements themselves are in :mod:`surgery.measure`."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import compat
from .atomic import atomic_open
from .errors import MeasureError
from .masked import fold_masks
from .measure import configured_detections, count_macs, count_params, measure_latency, state_dict_size

if TYPE_CHECKING:
    from .recipe import BenchSection

Progress = Callable[[str, float, int], None]  # (what, steps done, total steps)

BENCH_COLUMNS: tuple[str, ...] = (
    "model",
    "method",
    "ratio",
    "sparsity",
    "kind",
    "device",
    "torch",
    "threads",
    "input_size",
    "batch_size",
    "params",
    "params_nonzero",
    "macs",
    "latency_ms_median",
    "latency_ms_p90",
    "images_per_s",
    "peak_mem_mb",
    "file_bytes",
    "file_gzip_bytes",
    "mAP",
    "mAP50",
    "params_ratio",
    "macs_ratio",
    "latency_ratio",
    "checkpoint",
)


@dataclass
class BenchRow:
    """One CSV row: one checkpoint at one batch size. Ratios are against the first checkpoint."""

    model: str
    method: str
    ratio: float | None
    sparsity: float | None
    kind: str
    device: str
    torch: str
    threads: int
    input_size: int
    batch_size: int
    params: int
    params_nonzero: int
    macs: int
    latency_ms_median: float
    latency_ms_p90: float
    images_per_s: float
    peak_mem_mb: float | None
    file_bytes: int
    file_gzip_bytes: int
    mAP: float | None
    mAP50: float | None
    params_ratio: float
    macs_ratio: float
    latency_ratio: float
    checkpoint: str
    notes: list[str] = field(default_factory=list)  # not in the CSV

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {c: d[c] for c in BENCH_COLUMNS}


def _method_of(ckpt: Any) -> str:
    method = getattr(ckpt.plan, "method", None)
    return str(method or ckpt.kind)


def _sparsity_of(ckpt: Any) -> float | None:
    if getattr(ckpt.plan, "sparsity", None) is not None:
        return float(ckpt.plan.sparsity)
    if ckpt.masks:
        n = sum(m.numel() for m in ckpt.masks.values())
        kept = sum(int(m.sum().item()) for m in ckpt.masks.values())
        return 1.0 - kept / n if n else None
    return None


def _ratio(x: float | None, ref: float | None) -> float:
    return float(x) / float(ref) if x is not None and ref else float("nan")


def bench_checkpoints(
    paths: Sequence[str | Path],
    cfg: BenchSection,
    *,
    dataset: Any = None,
    progress: Progress | None = None,
    rois: int | None = None,
) -> list[BenchRow]:
    """Benchmark checkpoints side by side; the first one is the dense reference for the ratios.

    Each checkpoint is loaded with :func:`surgery.checkpoint.load_checkpoint`, masked ones get
    their masks folded into the weights, then: parameters, MACs at ``cfg.input_size`` (two-stage
    models at ``rois`` RoIs, default the model's own test-time post-NMS top-n, and its
    ``detections_per_img``), interleaved latency for every ``cfg.batch_sizes`` on ``cfg.device``
    with ``cfg.threads``, size of the weights (plain and gzipped), and mAP / mAP50 when ``dataset``
    is given. One row per (checkpoint, batch size).
    """
    from .checkpoint import load_checkpoint

    rois = rois if rois is not None else cfg.rois
    paths = [Path(p) for p in paths]
    if not paths:
        raise MeasureError("bench needs at least one checkpoint")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MeasureError("--device cuda asked for, but torch sees no CUDA device")
    n = len(paths)
    total = 2 * n + (n if dataset is not None else 0) + 1
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(what, done, total)

    models: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    for path in paths:
        key = str(path)
        if key in models:
            raise MeasureError(f"checkpoint {path} is given twice")
        model, ckpt = load_checkpoint(path, device=cfg.device)
        if ckpt.kind == "masked":
            fold_masks(model, ckpt.masks)
        model.eval()
        if cfg.resize_model:
            compat.set_resize(model, (int(cfg.input_size),), int(cfg.input_size))  # SSD: fixed size, kept
        params, nonzero = count_params(model)
        fbytes, fgzip = state_dict_size(model)
        info[key] = {
            "model": ckpt.spec.name,
            "method": _method_of(ckpt),
            "ratio": getattr(ckpt.plan, "ratio", None),
            "sparsity": _sparsity_of(ckpt),
            "kind": ckpt.kind,
            "params": params,
            "params_nonzero": nonzero,
            "file_bytes": fbytes,
            "file_gzip_bytes": fgzip,
        }
        models[key] = model
        tick(f"loaded {path.name}")
        det = configured_detections(model)
        macs = count_macs(model, cfg.input_size, rois=rois, detections=det)
        info[key]["macs"] = macs.total
        info[key]["notes"] = [n for n in macs.notes if not n.startswith("element-wise")]
        tick(f"MACs {path.name}")

    lat_total = len(cfg.batch_sizes) * (cfg.warmup + cfg.runs)

    def lat_progress(step: int, steps: int) -> None:
        if progress:
            progress("latency", done + step / max(steps, 1), total)

    lat = measure_latency(
        models,
        cfg.input_size,
        batch_sizes=tuple(cfg.batch_sizes),
        warmup=cfg.warmup,
        runs=cfg.runs,
        threads=cfg.threads,
        device=cfg.device,
        rois=rois,
        progress=lat_progress if lat_total else None,
    )
    tick("latency")

    maps: dict[str, tuple[float | None, float | None]] = {}
    for key, model in models.items():
        if dataset is None:
            maps[key] = (None, None)
            continue
        from .evaluate import evaluate

        res = evaluate(model, dataset, batch_size=8, device=cfg.device)
        maps[key] = (res.metrics.get("mAP"), res.metrics.get("mAP50"))
        tick(f"mAP {Path(key).name}")

    ref_key = str(paths[0])
    ref_lat = {r.batch_size: r.median_ms for r in lat if r.name == ref_key}
    rows: list[BenchRow] = []
    for r in sorted(lat, key=lambda r: (list(models).index(r.name), r.batch_size)):
        i = info[r.name]
        rows.append(
            BenchRow(
                model=i["model"],
                method=i["method"],
                ratio=i["ratio"],
                sparsity=i["sparsity"],
                kind=i["kind"],
                device=r.device,
                torch=torch.__version__,
                threads=r.threads,
                input_size=cfg.input_size,
                batch_size=r.batch_size,
                params=i["params"],
                params_nonzero=i["params_nonzero"],
                macs=i["macs"],
                latency_ms_median=r.median_ms,
                latency_ms_p90=r.p90_ms,
                images_per_s=r.images_per_s,
                peak_mem_mb=r.peak_mem_mb,
                file_bytes=i["file_bytes"],
                file_gzip_bytes=i["file_gzip_bytes"],
                mAP=maps[r.name][0],
                mAP50=maps[r.name][1],
                params_ratio=_ratio(i["params"], info[ref_key]["params"]),
                macs_ratio=_ratio(i["macs"], info[ref_key]["macs"]),
                latency_ratio=_ratio(r.median_ms, ref_lat.get(r.batch_size)),
                checkpoint=r.name,
                notes=list(i["notes"]),
            )
        )
    return rows


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return str(v)


def write_csv(rows: Sequence[BenchRow | dict[str, Any]], path: str | Path) -> Path:
    """Write rows with the :data:`BENCH_COLUMNS` header (always the same, in that order),
    atomically (temporary file + rename). Missing keys of dict rows are left empty."""
    path = Path(path)
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(BENCH_COLUMNS)
        for row in rows:
            d = row.to_dict() if isinstance(row, BenchRow) else row
            w.writerow([_csv_value(d.get(c)) for c in BENCH_COLUMNS])
    return path
