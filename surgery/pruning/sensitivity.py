"""Sensitivity analysis (Distiller's form) and the allocation it makes possible.

:func:`analyse` cuts each prunable coupled group *alone* at several ratios, on a copy of the model,
recovers it without retraining (:mod:`surgery.pruning.recover`), and measures MACs and mAP on a validation
subset: one row per (group, ratio) plus a ``dense`` row, the model put through the same recovery
with nothing cut (the baseline of every loss: the recovery's own effect is not the cut's). Rows are
written to the CSV as they are measured (the whole file rewritten atomically after each row), so a
killed run resumes where it stopped: rows already in the CSV are skipped. Each CSV row carries a
``key`` (a hash of the checkpoint's bytes, the table's version and every setting that changes a
value); a CSV with another key belongs to another run and is refused rather than overwritten or
mixed.

:func:`allocate_by_sensitivity` turns the table into per-group ratios that meet a MACs target while
cutting the insensitive groups more: starting from nothing cut, it repeatedly raises by ``step``
the ratio of the group with the smallest estimated mAP loss per MAC saved, which gives a path of
ever-deeper cuts. The MACs saved are interpolated linearly between the table's ratios; so is the
loss, except from nothing cut to the first measured ratio, where it grows with the square of the
ratio (both made monotone). A ranked cut removes the least important channels first, so the loss of
its first channels is smaller than their share: a loss linear from zero makes every group's marginal
cost constant, and the greedy path then cuts the cheapest groups all the way to the table's ratio
and leaves the others whole (a one-ratio table, measured at 0.8, did exactly that on YOLO11n and
lost 12 points against a uniform cut, docs/benchmarks/yolo-75.md). The square is the second-order
(optimal-brain-damage) form of a loss whose ranked channels matter in proportion to their rank.
Single-group savings do not add up exactly (a layer between two cut groups loses ``r1 + r2 -
r1 r2``, not ``r1 + r2``), so the MACs of the candidate allocations are measured on cut copies
(``measure``) and the first point of the path that meets the target is chosen by bisection.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.recipe import PruneSection
from ..errors import PruningError, RecipeError
from ..storage.atomic import atomic_open, atomic_path
from ..storage.trust import read_small_file
from .allocate import Allocation, ChannelPlan, channel_plan
from .budget import Rounding, Sensitivity
from .calibrate import group_scores
from .candidate import Candidates, macs_of
from .graph import trace
from .recover import recover

COLUMNS = ("key", "group", "ratio", "channels", "kept", "macs", "macs_ratio", "map", "map50", "seconds")
DENSE = "dense"
DEFAULT_RATIOS = (0.25, 0.5, 0.75)
# `prune.sensitivity: label-free`: no table given, the prune measures one of the model being cut,
# scored against its own detections (surgery.workflows.label_free_sensitivity)
LABEL_FREE = "label-free"


@dataclass
class SensitivityRow:
    group: str  # the group's root layer, or "dense"
    ratio: float
    channels: int
    kept: int
    macs: int
    macs_ratio: float
    map: float
    map50: float
    seconds: float = 0.0


@dataclass
class SensitivityResult:
    rows: list[SensitivityRow]
    csv: Path
    plot: Path | None
    resumed: int  # rows found in the CSV from an earlier (interrupted) run
    seconds: float

    @property
    def dense(self) -> SensitivityRow:
        return next(r for r in self.rows if r.group == DENSE)


# --------------------------------------------------------------------------------------------
# the table on disk


TABLE_VERSION = 2  # 2: the dense row is scored after the recovery (_recovered_uncut); tables of 1 are measured again


def run_key(checkpoint_digest: str, settings: dict[str, Any]) -> str:
    """The key a table's rows carry: the checkpoint's SHA-256 (:func:`surgery.storage.trust.sha256_file`),
    :data:`TABLE_VERSION` and the settings they were measured with."""
    text = json.dumps({"checkpoint": checkpoint_digest, "table": TABLE_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


MAX_TABLE_BYTES = 16 << 20  # a few thousand rows are ~1 MB


def read_table(path: str | Path) -> tuple[str | None, list[SensitivityRow]]:
    """``(key, rows)`` of a sensitivity CSV; one clear error for a file that is not one.

    The table feeds the cut, so it is checked as data: sized before it is read, a UTF-8 BOM
    accepted, each row's numbers finite and in range (ratio in (0, 1], 0 for the dense row; mAP in
    [-1, 1] (COCOeval writes -1 where there is no ground truth); counts non-negative; kept <= channels) and no (group, ratio) twice."""
    path = Path(path)
    raw_bytes = read_small_file(path, "sensitivity CSV", MAX_TABLE_BYTES)
    try:
        text = raw_bytes.decode("utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is not part of the first column
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise RecipeError(f"{path} is not a sensitivity CSV (expected columns {', '.join(COLUMNS)})")
        raw = list(reader)
    except UnicodeDecodeError as e:
        raise RecipeError(f"cannot read the sensitivity CSV {path}: not UTF-8 text (offset {e.start})") from None
    except csv.Error as e:  # e.g. a field over the csv module's 128 KB limit
        raise RecipeError(f"{path} is not a sensitivity CSV: {e}") from None
    keys = {r["key"] for r in raw}
    if len(keys) > 1:
        raise RecipeError(f"{path} mixes rows of several runs (keys {', '.join(sorted(map(repr, keys))[:3])})")
    rows = [_table_row(path, n, r) for n, r in enumerate(raw, start=2)]
    seen: set[tuple[str, float]] = set()
    for n, row in enumerate(rows, start=2):
        if (row.group, row.ratio) in seen:
            raise RecipeError(f"{path} line {n}: group {row.group[:80]!r} at ratio {row.ratio:g} is in the table twice")
        seen.add((row.group, row.ratio))
    return (keys.pop() if keys else None), rows


_ROW_BOUNDS: dict[str, tuple[type, float, float]] = {  # field: (type, low, high), inclusive
    "channels": (int, 0, math.inf), "kept": (int, 0, math.inf), "macs": (int, 0, math.inf),
    "macs_ratio": (float, 0.0, 1e6), "map": (float, -1.0, 1.0), "map50": (float, -1.0, 1.0),  # -1: COCOeval, no ground truth
    "seconds": (float, 0.0, math.inf),
}  # fmt: skip


def _table_row(path: Path, line: int, r: dict[str, Any]) -> SensitivityRow:
    where = f"{path} line {line}"
    if None in r or any(v is None for v in r.values()):
        raise RecipeError(f"{where}: expected {len(COLUMNS)} fields ({', '.join(COLUMNS)})")
    group = r["group"]
    if not group or len(group) > 1024:
        raise RecipeError(f"{where}: group must be a layer name of at most 1024 characters")
    values: dict[str, Any] = {}
    for name, (kind, lo, hi) in {"ratio": (float, 0.0, 1.0), **_ROW_BOUNDS}.items():
        text = r[name].strip()
        try:
            v = kind(text) if len(text) <= 40 else None
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or not lo <= v <= hi:
            rng = f"[{lo:g}, {hi:g}]" if math.isfinite(hi) else f">= {lo:g}"
            raise RecipeError(f"{where}: {name} = {text[:40]!r} must be a finite {kind.__name__} {rng}")
        values[name] = v
    dense = group == DENSE
    if (values["ratio"] == 0) != dense:
        raise RecipeError(f"{where}: ratio = {values['ratio']:g}: a group's cut ratio must be in (0, 1] (0 only on the dense row)")
    if values["kept"] > values["channels"]:
        raise RecipeError(f"{where}: kept = {values['kept']} is more than channels = {values['channels']}")
    return SensitivityRow(group=group, **values)


def _write_table(path: Path, key: str, rows: Sequence[SensitivityRow]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([key, r.group, r.ratio, r.channels, r.kept, r.macs, round(r.macs_ratio, 6), round(r.map, 5),
                        round(r.map50, 5), round(r.seconds, 2)])


# --------------------------------------------------------------------------------------------
# analysis


def _cut_one(candidates: Candidates, scores: dict[int, torch.Tensor], rounding: Rounding, root: str,
             ratio: float) -> tuple[nn.Module, dict[str, list[int]], int, int]:
    """A copy of the model with only the group rooted at ``root`` cut at ``ratio``: (copy, kept
    output channels, channels, kept channels)."""
    group = next((g for g in candidates.graph.groups if g.root == root), None)
    if group is None:
        raise PruningError(f"internal: group {root} not found on the copy")
    plan = channel_plan(candidates.graph, {group.index: scores[group.index]}, 0.0, rounding,
                        group_ratios={group.index: ratio})
    m, kept = candidates.cut(plan)
    return m, kept, group.channels, group.channels - len(plan.get(group.index, []))


def _recovered_uncut(model: nn.Module, calib_data: Iterable[Any] | None, recover_batches: int) -> nn.Module:
    """The baseline the cut rows are compared with: ``model`` through the same recovery with nothing
    cut (``model`` itself without recovery). The recovery re-estimates every BatchNorm on a few
    calibration images, which moves the score by itself: on YOLOv8n (docs/benchmarks/yolo-75.md,
    fifth run) 16 images took the label-free mAP from 1.0 to 0.90 with nothing cut, and scored
    against the untouched model that offset was counted as every group's loss."""
    if calib_data is None or recover_batches <= 0:
        return model
    base = copy.deepcopy(model)
    recover(base, model, calib_data, kept={}, batches=recover_batches)
    return base


def analyse(
    model: nn.Module,
    *,
    csv_path: str | Path,
    key: str,
    calib_data: Iterable[Any] | None,
    recover_batches: int = 2,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    cfg: PruneSection | None = None,
    macs_input_size: int = 320,
    trace_size: int = 256,
    groups: Sequence[str] | None = None,
    score: Callable[[nn.Module], dict[str, float]],
    on_row: Callable[[SensitivityRow, int, int], None] | None = None,
    restart: bool = False,
) -> tuple[list[SensitivityRow], int]:
    """Measure every (group, ratio) not yet in ``csv_path`` (rows of another ``key`` are refused;
    ``restart``: the rows already there are dropped and every row is measured again).
    ``score(model)`` returns ``{"mAP", "mAP50"}`` on the validation subset; ``calib_data``: the
    recovery batches (``None`` or ``recover_batches=0``: no recovery). Returns (rows, resumed)."""
    cfg = cfg or PruneSection()
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise RecipeError("sensitivity ratios must be fractions strictly between 0 and 1")
    csv_path = Path(csv_path)
    done: list[SensitivityRow] = []
    if csv_path.exists() and not restart:
        old_key, done = read_table(csv_path)
        if old_key is not None and old_key != key:
            raise RecipeError(f"{csv_path} holds the sensitivity of another checkpoint or other settings; "
                              "pass another --csv (or remove it)")
    resumed = len(done)
    have = {(r.group, round(r.ratio, 6)) for r in done}
    rows = list(done)
    model.eval()
    graph = trace(copy.deepcopy(model), trace_size=trace_size, skip=cfg.skip)
    names = [g.root for g in graph.groups if g.prunable]
    if groups:
        unknown = [g for g in groups if g not in names]
        if unknown:
            raise RecipeError(f"not a prunable group root: {', '.join(unknown)} (see `surgery inspect`)")
        names = [n for n in names if n in groups]
    todo = [(DENSE, 0.0)] + [(n, float(r)) for n in names for r in ratios]
    todo = [t for t in todo if (t[0], round(t[1], 6)) not in have]
    candidates = Candidates(graph, cfg.skip)
    rounding = Rounding(cfg.round_to, cfg.min_channels, strict=cfg.strict_round_to)
    scores: dict[int, torch.Tensor] = {}  # ranked once, on the first cut
    dense_macs = macs_of(model, macs_input_size)
    dense_row = next((r for r in rows if r.group == DENSE), None)
    total = len(todo)
    for i, (name, ratio) in enumerate(todo):
        t0 = time.perf_counter()
        if name == DENSE:
            s = score(_recovered_uncut(model, calib_data, recover_batches))
            row = SensitivityRow(DENSE, 0.0, 0, 0, dense_macs, 1.0, s["mAP"], s["mAP50"])
            dense_row = row
        else:
            scores = scores or group_scores(graph, cfg.method, calib_data=calib_data, calib_batches=cfg.calib_batches)
            cut, kept, channels, k = _cut_one(candidates, scores, rounding, name, ratio)
            if k == channels and dense_row is not None:  # nothing cut (floors): the dense model
                row = SensitivityRow(name, ratio, channels, k, dense_macs, 1.0, dense_row.map, dense_row.map50)
            else:
                if calib_data is not None and recover_batches > 0:
                    recover(cut, model, calib_data, kept=kept, batches=recover_batches)
                s = score(cut)
                macs = macs_of(cut, macs_input_size)
                row = SensitivityRow(name, ratio, channels, k, macs, macs / max(1, dense_macs), s["mAP"], s["mAP50"])
            del cut
        row.seconds = time.perf_counter() - t0
        rows.append(row)
        _write_table(csv_path, key, rows)
        if on_row is not None:
            on_row(row, i + 1, total)
    return rows, resumed


def plot_table(rows: Sequence[SensitivityRow], path: str | Path) -> Path:
    """Distiller's sensitivity plot: mAP against the ratio cut, one line per group."""
    import matplotlib  # only when a plot is asked for: the analysis itself needs no matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    dense = next((r for r in rows if r.group == DENSE), None)
    by_group: dict[str, list[SensitivityRow]] = {}
    for r in rows:
        if r.group != DENSE:
            by_group.setdefault(r.group, []).append(r)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, rs) in enumerate(by_group.items()):
        rs = sorted(rs, key=lambda r: r.ratio)
        style = ("-", "--", ":", "-.")[i // 10 % 4]  # the colour cycle repeats every 10 lines
        xs = [0.0] + [r.ratio for r in rs] if dense else [r.ratio for r in rs]
        ys = [dense.map] + [r.map for r in rs] if dense else [r.map for r in rs]
        ax.plot(xs, ys, marker="o", linestyle=style, linewidth=1, markersize=3, label=name)
    ax.set_xlabel("fraction of the group's channels cut (this group alone, recovered)")
    ax.set_ylabel("mAP@[.5:.95] (validation subset)")
    ax.set_title("Sensitivity of each coupled group")
    ax.grid(alpha=0.3)
    if len(by_group) <= 40:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# allocation


@dataclass
class SensitivityAllocation:
    """Per-group ratios a sensitivity table gives for a MACs budget (the allocator's report)."""

    ratios: dict[str, float]  # group root -> fraction of its channels to cut
    estimated_macs_ratio: float  # from the table, assuming single-group savings add up
    measured_macs_ratio: float | None  # on a cut copy (None without measure)
    met: bool
    steps: int  # points of the greedy path examined
    notes: list[str] = field(default_factory=list)


def _curve(rows: Sequence[SensitivityRow], dense: SensitivityRow) -> tuple[list[float], list[float], list[float]]:
    """(ratios, mAP loss, MACs saved) from 0, made non-decreasing."""
    rs = sorted(rows, key=lambda r: r.ratio)
    xs, loss, saved = [0.0], [0.0], [0.0]
    for r in rs:
        xs.append(r.ratio)
        loss.append(max(loss[-1], dense.map - r.map))
        saved.append(max(saved[-1], dense.macs - r.macs))
    return xs, loss, saved


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    for i in range(1, len(xs)):
        if x <= xs[i] + 1e-12:
            t = (x - xs[i - 1]) / max(1e-12, xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def _loss_at(xs: list[float], loss: list[float], x: float) -> float:
    """The estimated mAP loss at ratio ``x``: quadratic from 0 to the first measured ratio, then
    linear between the measured ratios (the module docstring says why)."""
    if len(xs) > 1 and x < xs[1]:
        return loss[1] * (x / xs[1]) ** 2 if xs[1] > 0 else 0.0
    return _interp(xs, loss, x)


def greedy_path(groups: Sequence[str], table: Sequence[SensitivityRow], *, step: float = 0.05) -> list[dict[str, float]]:
    """Allocations of ever-deeper cuts: each point raises one group's ratio by ``step``, the group
    with the least estimated mAP loss per MAC saved (ties: the larger saving)."""
    dense = next((r for r in table if r.group == DENSE), None)
    if dense is None:
        raise RecipeError("the sensitivity table has no 'dense' row")
    curves = {}
    for g in groups:
        rows = [r for r in table if r.group == g]
        if rows:
            curves[g] = _curve(rows, dense)
    state = dict.fromkeys(curves, 0.0)
    path = [dict(state)]
    while True:
        best, best_key = None, None
        for g, (xs, loss, saved) in curves.items():
            r = state[g]
            if r >= xs[-1] - 1e-9:
                continue
            r2 = min(xs[-1], r + step)
            ds = _interp(xs, saved, r2) - _interp(xs, saved, r)
            if ds <= 0:
                state[g] = r2  # no saving here: move on without a point
                continue
            dl = _loss_at(xs, loss, r2) - _loss_at(xs, loss, r)
            k = (dl / ds, -ds)
            if best_key is None or k < best_key:
                best, best_key = (g, r2), k
        if best is None:
            break
        state[best[0]] = best[1]
        path.append(dict(state))
    return path


def _more_rows_hint(roots: Sequence[str], curves: dict[str, Any]) -> str:
    """What the table lacks: groups never measured (a table of some --group only) or larger ratios."""
    unmeasured = [r for r in roots if r not in curves]
    if unmeasured:
        return (f"{len(unmeasured)} of the model's {len(roots)} groups have no rows in the table "
                f"({', '.join(unmeasured[:3])}{'...' if len(unmeasured) > 3 else ''}): measure them "
                "(surgery sensitivity without --group), or add larger --ratios")
    return "add larger --ratios"


def allocate_by_sensitivity(
    groups: Sequence[Any],
    table: Sequence[SensitivityRow],
    target_macs: float,
    *,
    measure: Callable[[dict[str, float]], float] | None = None,
    step: float = 0.05,
) -> SensitivityAllocation:
    """Per-group ratios that keep ``target_macs`` of the dense MACs with the least estimated mAP
    loss (see the module docstring). ``groups``: the prunable groups (``ChannelGroup`` or root
    names); ``measure(ratios)``: the kept MACs fraction of a copy cut that way (``None``: the
    table's additive estimate decides)."""
    if not 0.0 < target_macs < 1.0:
        raise RecipeError("target_macs must be a fraction strictly between 0 and 1")
    roots = [g if isinstance(g, str) else g.root for g in groups]
    missing = {r.group for r in table if r.group != DENSE} - set(roots)
    if missing:
        raise RecipeError(f"the sensitivity table names groups this model does not have ({', '.join(sorted(missing)[:3])}"
                          "...): it was measured on another model")
    dense = next((r for r in table if r.group == DENSE), None)
    if dense is None:
        raise RecipeError("the sensitivity table has no 'dense' row")
    path = greedy_path(roots, table, step=step)
    curves = {g: _curve([r for r in table if r.group == g], dense) for g in roots if any(r.group == g for r in table)}

    def estimate(state: dict[str, float]) -> float:
        saved = sum(_interp(*curves[g][::2], state[g]) for g in state)
        return max(0.0, dense.macs - saved) / max(1, dense.macs)

    notes: list[str] = []
    if measure is None:
        i = next((i for i, s in enumerate(path) if estimate(s) <= target_macs), len(path) - 1)
        chosen, measured = path[i], None
        met = estimate(chosen) <= target_macs
        examined = i + 1
    else:
        cache: dict[int, float] = {}

        def kept(i: int) -> float:
            if i not in cache:
                cache[i] = measure({g: r for g, r in path[i].items() if r > 0})
            return cache[i]

        lo = next((i for i, s in enumerate(path) if estimate(s) <= target_macs), len(path) - 1)
        lo = max(0, lo - 1)  # the estimate over-counts savings: the answer is at or after it
        hi = len(path) - 1
        if kept(hi) > target_macs:
            notes.append(f"cutting every group to the table's largest ratio keeps {kept(hi):.1%} of the MACs "
                         f"> the target {target_macs:.1%}: {_more_rows_hint(roots, curves)}")
            lo = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if kept(mid) <= target_macs:
                hi = mid
            else:
                lo = mid + 1
        chosen, measured, examined = path[lo], kept(lo), len(cache)
        met = measured <= target_macs
    ratios = {g: round(r, 4) for g, r in chosen.items() if r > 0}
    return SensitivityAllocation(ratios=ratios, estimated_macs_ratio=estimate(chosen), measured_macs_ratio=measured, met=met,
                      steps=examined, notes=notes)


def allocate_sensitivity(candidates: Candidates, scores: dict[int, torch.Tensor], budget: Sensitivity,
                         rounding: Rounding) -> Allocation:
    """The :class:`~surgery.pruning.budget.Sensitivity` allocator: :func:`allocate_by_sensitivity`'s
    per-group ratios from ``budget.table``, each candidate's MACs counted on a cut copy."""
    _, table = read_table(budget.table)
    graph = candidates.graph
    index = {g.root: g.index for g in graph.groups if g.prunable}
    # rows of groups this model has but keeps whole (prune.skip, keep_head) have nothing to allocate
    whole = {g.root for g in graph.groups if not g.prunable}
    table = [r for r in table if r.group not in whole]
    dense = candidates.dense_macs(budget.input_size)

    def plan(ratios: dict[str, float]) -> ChannelPlan:
        return channel_plan(graph, scores, 0.0, rounding, group_ratios={index[g]: r for g, r in ratios.items()})

    def kept(ratios: dict[str, float]) -> float:
        return candidates.count(plan(ratios), budget.input_size).macs / max(1, dense)

    alloc = allocate_by_sensitivity(list(index), table, budget.keep_macs, measure=kept)
    return Allocation(plan=plan(alloc.ratios), group_ratios={i: alloc.ratios.get(g, 0.0) for g, i in index.items()},
                      info={"sensitivity": alloc})


__all__ = [
    "COLUMNS",
    "LABEL_FREE",
    "SensitivityAllocation",
    "SensitivityResult",
    "SensitivityRow",
    "allocate_by_sensitivity",
    "allocate_sensitivity",
    "analyse",
    "greedy_path",
    "plot_table",
    "read_table",
    "run_key",
]
