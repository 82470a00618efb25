"""Tables and plots for a sweep: structured (channels cut) vs masked (weights zeroed) pruning.

Rows are plain dicts, one per model, with the keys the sweep writes: ``method`` ("dense",
"structured-l1", "masked", ...), ``ratio`` (channels removed), ``sparsity`` (weights zeroed),
``params``, ``params_nonzero``, ``macs``, ``latency_ms``, ``map_pruned`` (right after pruning),
``map_retrained``, ``map50_pruned``, ``map50_retrained`` and ``dense_control_map`` (the dense model
trained for as many extra steps as the pruned one was retrained: the fair reference). Missing
values are shown as "-". Plots use matplotlib's Agg backend and each returns the PNG's path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .storage.atomic import atomic_path

if TYPE_CHECKING:  # torch loads only when a plot needs it: `surgery --help` must not import it
    import torch

# below this dense (control) mAP, "retained mAP" (pruned / dense) is not reported: the ratio of two
# near-zero numbers says nothing about the pruning ("retained 279.9%" of a dense mAP of 0.001)
MIN_REFERENCE_MAP = 0.05

HEADER = ("method", "% pruned", "params", "MACs", "latency", "mAP pruned", "mAP retrained", "retained mAP")


def _num(x: Any) -> float | None:
    if x is None or x == "":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def fmt_count(x: Any) -> str:
    """12_600_000 -> ``12.6M``, 1.34e9 -> ``1.34G``."""
    v = _num(x)
    if v is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.0f}"


def _is_dense(row: dict[str, Any]) -> bool:
    return str(row.get("method", "")).lower() == "dense"


def _is_masked(row: dict[str, Any]) -> bool:
    m = str(row.get("method", "")).lower()
    return m.startswith("masked") or m in ("magnitude", "unstructured")


def pruned_fraction(row: dict[str, Any]) -> float | None:
    """What was pruned, as a fraction: ``sparsity`` for masked rows, ``ratio`` for structured ones."""
    if _is_dense(row):
        return 0.0
    if _is_masked(row):
        return _num(row.get("sparsity")) if _num(row.get("sparsity")) is not None else _num(row.get("ratio"))
    return _num(row.get("ratio")) if _num(row.get("ratio")) is not None else _num(row.get("sparsity"))


def _final_map(row: dict[str, Any]) -> float | None:
    v = _num(row.get("map_retrained"))
    return v if v is not None else _num(row.get("map_pruned"))


def _dense_reference(rows: Sequence[dict[str, Any]]) -> float | None:
    for r in rows:
        if _is_dense(r):
            v = _num(r.get("dense_control_map"))
            return v if v is not None else _final_map(r)
    return None


def _fmt_map(x: Any) -> str:
    v = _num(x)
    return "-" if v is None else f"{v:.3f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """``| method | % pruned | params | MACs | latency | mAP pruned | mAP retrained | retained mAP |``.

    ``% pruned``: channels removed (structured) or weights zeroed (masked). ``params`` of a masked
    row shows its non-zero count next to the (unchanged) total. ``retained mAP``: mAP after
    retraining over the dense control's (the row's own ``dense_control_map``, else the dense
    row's), in percent; "-" when that reference is below :data:`MIN_REFERENCE_MAP`.
    """
    fallback = _dense_reference(rows)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    for r in rows:
        frac = pruned_fraction(r)
        pct = "-" if frac is None else f"{100 * frac:.0f}%"
        if not _is_dense(r) and frac is not None:
            pct += " weights" if _is_masked(r) else " channels"
        params = fmt_count(r.get("params"))
        nz = _num(r.get("params_nonzero"))
        if nz is not None and _num(r.get("params")) is not None and nz < 0.99 * float(r["params"]):  # masked rows (dense ones have a few zeros from init)
            params += f" ({fmt_count(nz)} nonzero)"
        lat = _num(r.get("latency_ms"))
        ref = _num(r.get("dense_control_map"))
        ref = ref if ref is not None else fallback
        final = _final_map(r)
        retained = "-" if final is None or not ref or ref < MIN_REFERENCE_MAP else f"{100 * final / ref:.1f}%"
        cells = [
            str(r.get("method", "-")),
            pct,
            params,
            fmt_count(r.get("macs")),
            "-" if lat is None else f"{lat:.1f} ms",
            _fmt_map(r.get("map_pruned")),
            _fmt_map(r.get("map_retrained")),
            retained,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        _plt().close(fig)
    return path


def _by_method(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get("method", "?")), []).append(r)
    return groups


_MARKERS = {"dense": "*", "masked": "s"}


def _style(method: str, i: int) -> dict[str, Any]:
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    marker = _MARKERS.get(method, _MARKERS["masked"] if method.startswith("masked") else "o")
    return {"color": "black" if method == "dense" else colors[i % len(colors)], "marker": marker}


def plot_map_vs_macs(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """mAP (after retraining; hollow markers: right after pruning) against GMACs, one line per
    method, each point labelled with its % pruned. Masked models keep the dense MACs, so they
    stack vertically at the dense x position: that is the point of the plot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, rs) in enumerate(_by_method(rows).items()):
        st = _style(method, i)
        pts = sorted(
            ((float(r["macs"]) / 1e9, _final_map(r), _num(r.get("map_pruned")), pruned_fraction(r)) for r in rs
             if _num(r.get("macs")) is not None),
            key=lambda p: p[0],
        )
        xs = [p[0] for p in pts if p[1] is not None]
        ys = [p[1] for p in pts if p[1] is not None]
        ms = 14 if method == "dense" else 7
        if xs:
            ax.plot(xs, ys, linestyle="-" if method != "dense" else "", label=method, markersize=ms, **st)
        hx = [p[0] for p in pts if p[2] is not None and p[1] is not None and p[2] != p[1]]
        hy = [p[2] for p in pts if p[2] is not None and p[1] is not None and p[2] != p[1]]
        if hx:
            ax.plot(hx, hy, linestyle="", marker=st["marker"], markerfacecolor="none", color=st["color"],
                    markersize=ms, label=f"{method} (before retraining)")
        for x, y, _, frac in pts:
            if y is not None and frac:
                ax.annotate(f"{100 * frac:.0f}%", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("GMACs per image (fvcore)")
    ax.set_ylabel("mAP")
    ax.set_title("mAP vs MACs per image\n"
                 "point labels: % pruned (structured: channels removed; masked: weights zeroed)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_latency_vs_ratio(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Latency (ms) against % pruned (channels for structured, weights for masked), one line per
    method; the dense model is a dashed horizontal line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = [_num(r.get("latency_ms")) for r in rows if _is_dense(r)]
    dense = [d for d in dense if d is not None]
    if dense:
        ax.axhline(dense[0], color="black", linestyle="--", label=f"dense ({dense[0]:.1f} ms)")
    for i, (method, rs) in enumerate(_by_method(rows).items()):
        if method == "dense":
            continue
        pts = sorted(
            (100 * f, lat)
            for r in rs
            if (f := pruned_fraction(r)) is not None and (lat := _num(r.get("latency_ms"))) is not None
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **_style(method, i))
    ax.set_xlabel("% pruned (structured: channels removed; masked: weights zeroed)")
    ax.set_ylabel("latency (ms per batch, median)")
    ax.set_ylim(bottom=0)
    ax.set_title("Latency (median, end to end) vs % pruned")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layer_widths(widths_before: dict[str, int], widths_after: dict[str, int], path: str | Path,
                      variant: str | None = None) -> Path:
    """Horizontal bars per layer (or coupled group): the width before pruning in grey, after in
    colour, with the kept fraction written next to each bar; the title names the ``variant``."""
    plt = _plt()
    names = list(widths_before) + [n for n in widths_after if n not in widths_before]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(names) + 1.2)))
    ys = range(len(names))
    before = [widths_before.get(n, 0) for n in names]
    after = [widths_after.get(n, widths_before.get(n, 0)) for n in names]
    ax.barh(ys, before, color="lightgray", label="before")
    ax.barh(ys, after, color="tab:blue", height=0.55, label="after")
    for y, b, a in zip(ys, before, after):
        if b:
            ax.text(max(b, a), y, f" {a}/{b}", va="center", fontsize=7)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    ax.set_title(f"Output channels per layer{f' of {variant}' if variant else ''}: kept / before", fontsize=10)
    ax.set_xlim(0, max(before + after + [1]) * 1.18)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


DRAW_NMS_IOU = 0.5  # class-wise NMS applied before drawing: one box per object in the picture


def boxes_to_draw(pred: dict[str, Any], score_thresh: float, iou: float = DRAW_NMS_IOU) -> list[tuple[list[float], float, int]]:
    """``(box, score, label)`` of a torchvision-style output that a picture shows: scores >=
    ``score_thresh``, then class-wise NMS at ``iou`` (a model's raw output may keep near-duplicate
    boxes, e.g. FCOS at score threshold 0), best first."""
    import torch
    from torchvision.ops import batched_nms

    boxes = torch.as_tensor(pred.get("boxes", torch.zeros(0, 4))).detach().cpu().float().reshape(-1, 4)
    n = len(boxes)
    scores = torch.as_tensor(pred.get("scores", torch.ones(n))).detach().cpu().float()
    labels = torch.as_tensor(pred.get("labels", torch.zeros(n, dtype=torch.long))).detach().cpu().long()
    keep = scores >= score_thresh
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = batched_nms(boxes, scores, labels, iou)
    return [(boxes[k].tolist(), float(scores[k]), int(labels[k])) for k in order.tolist()]


def _ground_truth_boxes(target: dict[str, Any]) -> list[tuple[list[float], None, int]]:
    import torch

    boxes = torch.as_tensor(target.get("boxes", torch.zeros(0, 4))).detach().cpu().float().reshape(-1, 4)
    labels = torch.as_tensor(target.get("labels", torch.zeros(len(boxes), dtype=torch.long))).detach().cpu().long()
    return [(b, None, int(lab)) for b, lab in zip(boxes.tolist(), labels.tolist())]


def plot_detections_grid(
    images: Sequence[torch.Tensor],
    predictions: dict[str, Sequence[dict[str, Any]]],
    path: str | Path,
    class_names: Sequence[str] | None = None,
    score_thresh: float = 0.3,
    ground_truth: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """A grid: one row per image, the ground truth (``ground_truth[i]``: ``boxes``, ``labels``) in
    the first column when given, then one column per model with its boxes scoring at least
    ``score_thresh`` after class-wise NMS (:func:`boxes_to_draw`), drawn with label and score. The
    title states the threshold. ``images`` are ``3 x H x W`` float tensors in [0, 1];
    ``predictions[model][i]`` is the model's torchvision-style output dict for image ``i``."""
    from matplotlib.patches import Rectangle

    plt = _plt()
    columns: dict[str, Sequence[dict[str, Any]] | None] = {}
    if ground_truth is not None:
        columns["ground truth"] = None
    columns.update(predictions)
    names = list(columns)
    nr, nc = max(1, len(images)), max(1, len(names))
    fig, axes = plt.subplots(nr, nc, figsize=(3.2 * nc, 3.2 * nr + 0.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i in range(nr):
        for j in range(nc):
            ax = axes[i][j]
            ax.axis("off")
            if i >= len(images):
                continue
            img = images[i].detach().cpu().float()
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy() if img.dim() == 3 else img.numpy())
            if i == 0 and j < len(names):
                ax.set_title(names[j], fontsize=9)
            if j >= len(names):
                continue
            if columns[names[j]] is None:  # the ground truth: every box, no score
                drawn = _ground_truth_boxes(ground_truth[i] if ground_truth is not None and i < len(ground_truth) else {})
            elif i < len(columns[names[j]]):
                drawn = boxes_to_draw(columns[names[j]][i], score_thresh)
            else:
                continue
            for box, score, label in drawn:
                x0, y0, x1, y1 = box
                color = cmap(int(label) % 10)
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
                name = class_names[int(label)] if class_names and 0 <= int(label) < len(class_names) else str(label)
                ax.text(x0, y0, name if score is None else f"{name} {score:.2f}", fontsize=6, color="white", va="bottom",
                        bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    what = "ground truth, then each model's" if ground_truth is not None else "each model's"
    fig.suptitle(f"Detections on {len(images)} validation images: {what} boxes with score >= {score_thresh:g} "
                 f"(class-wise NMS at IoU {DRAW_NMS_IOU:g})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# the sweep's report


def sweep_markdown(rows: list[dict[str, Any]], recipe: Any, dense: dict, control: dict) -> str:
    """A sweep's ``results.md``: the table, MACs/latency ratios and the weight-vs-filter study's form."""
    head = (
        f"# {recipe.model.name}: structured vs masked pruning\n\n"
        f"Dense baseline mAP@[.5:.95] {dense['mAP']:.3f} (mAP@0.5 {dense['mAP50']:.3f}); dense control after the same "
        f"{recipe.retrain.steps}-step retraining: {control['mAP']:.3f} ({control['mAP50']:.3f}). "
        f"'mAP pruned' is right after the cut, 'mAP retrained' after {recipe.retrain.steps} steps; retained = "
        f"retrained / dense control. Latency: median of {recipe.bench.runs} runs, batch {recipe.bench.batch_sizes[0]}, "
        f"{recipe.bench.input_size} px, {recipe.bench.threads} threads, {recipe.bench.device}; masked models with "
        "masks folded into plain weights. MACs: fvcore.\n\n"
    )
    table = markdown_table(rows)
    extra = ["", "| variant | MACs ratio | latency ratio | mAP@0.5 pruned | mAP@0.5 retrained |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        extra.append(f"| {r['variant']} | {r['macs_ratio']:.2f} | {r['latency_ratio']:.2f} | "
                     f"{r['map50_pruned']:.3f} | {r['map50_retrained']:.3f} |")
    recovered = [r for r in rows if r.get("map_recovered") is not None]
    if recovered:  # prune.recover: mAP right after the cut, after recovery (no training), after retraining
        extra += ["", f"Recovery without retraining (prune.recover: {recipe.prune.recover} batches):", "",
                  "| variant | mAP pruned | mAP recovered | mAP retrained |", "|---|---:|---:|---:|"]
        extra += [f"| {r['variant']} | {r['map_pruned']:.3f} | {r['map_recovered']:.3f} | {r['map_retrained']:.3f} |"
                  for r in recovered]
    study = ["", "In the weight-vs-filter study's form (rate: channels cut or weights zeroed; MB: weights, gzip):", "",
             "| pruning | rate | params | MB | MB gzip | mAP@0.5 after pruning | mAP@0.5 after retraining |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        rate = r.get("sparsity") if r.get("sparsity") is not None else r.get("ratio")
        kind = "weight" if r.get("sparsity") is not None else "filter"
        mb = " | ".join("" if r.get(k) is None else f"{r[k]:.2f}" for k in ("size_mb", "size_gzip_mb"))
        study.append(f"| {kind} ({r['variant']}) | {'' if rate is None else f'{rate:.0%}'} | {r['params']:,} | "
                     f"{mb} | {r['map50_pruned']:.3f} | {r['map50_retrained']:.3f} |")
    return head + table + "\n".join(extra + study) + "\n"
