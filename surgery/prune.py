"""Structured pruning: rank each coupled group's channels and physically cut the weakest.

``prune_model`` = trace (``graph``) -> rank (``importance``) -> plan widths -> cut -> anchors.
The result's :class:`~surgery.plan.StructuredPlan` goes into the checkpoint; :mod:`surgery.checkpoint`
rebuilds the model from the original builder, the plan's anchor part and the saved shapes.
:func:`surgery.workflows.prune_and_save` is the whole step (resolve a model, prune, save).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import PruningError
from .graph import ChannelGroup, DetectorGraph, match_layer, trace
from .importance import get_importance
from .measure import count_params
from .measure.workload import is_two_stage
from .plan import StructuredPlan
from .recipe import PruneSection


@dataclass
class GroupReport:
    index: int
    root: str
    layers: list[str]
    channels_before: int
    channels_after: int
    prunable: bool
    reason: str = ""


@dataclass
class PruneReport:
    method: str
    ratio: float
    global_ranking: bool
    groups: list[GroupReport]
    output_layers: list[str]
    params_before: int
    params_after: int
    seconds_analysis: float
    seconds_cut: float
    anchors: dict[str, Any] | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    target: Any = None  # surgery.target.TargetResult when the ratio was searched for a target
    macs_input_size: int | None = None  # MACs are counted on one square image of this side
    macs_rois: int | None = None  # two-stage models: RoIs fed to the box head while counting
    macs_network_input: tuple[int, int] | None = None  # (H, W) the backbone ran at (after the model's resize)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(1, self.params_before)

    @property
    def macs_ratio(self) -> float | None:
        if self.macs_before and self.macs_after is not None:
            return self.macs_after / self.macs_before
        return None

    @property
    def channels_before(self) -> int:
        return sum(g.channels_before for g in self.groups if g.prunable)

    @property
    def channels_after(self) -> int:
        return sum(g.channels_after for g in self.groups if g.prunable)


@dataclass
class PruneResult:
    plan: StructuredPlan
    report: PruneReport
    graph: DetectorGraph | None = field(default=None, repr=False)
    # conv/linear layers whose output channels were cut: the dense output channels each kept, in
    # order (what surgery.recover matches the dense model's outputs with)
    kept: dict[str, list[int]] = field(default_factory=dict, repr=False)


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv/linear layer (what the report and the plots show)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = int(m.out_features)
    return out


def check_patterns(model: nn.Module, patterns: Sequence[str], what: str) -> None:
    """Every layer pattern must match at least one module, else one clear error."""
    names = [n for n, _ in model.named_modules() if n]
    for p in patterns:
        if not any(match_layer(n, [p]) for n in names):
            close = difflib.get_close_matches(p, names, n=3)
            hint = f" Close names: {', '.join(close)}." if close else " Run `surgery inspect` for the layer names."
            raise PruningError(f"{what} pattern {p!r} matches no layer of this model.{hint}")


def _ratio_for(group: ChannelGroup, cfg: PruneSection) -> float:
    for pattern, r in cfg.overrides.items():
        if any(match_layer(x, [pattern]) for x in group.producers):
            return float(r)
    return cfg.ratio


THIN_GROUP_FACTOR = 4  # round_to applies in full to groups at least this many times as wide


def thin_round_to(channels: int, round_to: int) -> int:
    """``round_to`` for a group of ``channels``: halved until the group is at least
    :data:`THIN_GROUP_FACTOR` times as wide. A 16-channel layer at ``round_to: 8`` could only keep 8
    or 16 channels: on YOLOv8n/YOLO11n (16-32 channel stems) that made a 50% MACs target land at
    54.8% / 45.4%, whatever the ratio; at 4 it lands within 2%. Thin layers cost few MACs, so
    their alignment matters least for speed."""
    step = max(1, round_to)
    while step > 1 and channels < THIN_GROUP_FACTOR * step:
        step //= 2
    return step


def group_dither(index: int) -> float:
    """A rounding threshold in [0, 1) per group, spread evenly over the groups (golden-ratio
    sequence): deterministic, independent of the weights."""
    return (0.5 + index * 0.6180339887498949) % 1.0


def keep_count(channels: int, ratio: float, *, round_to: int = 1, min_channels: int = 1, multiple_of: int = 1,
               strict_round_to: bool = True, dither: float | None = None) -> int:
    """Channels kept in a group: ``ceil(channels * (1 - ratio))`` rounded up to ``round_to`` (and
    to GroupNorm's group count, at least two channels per group), at least ``min_channels``, never
    more than ``channels``. Without ``strict_round_to`` thin groups round to less
    (:func:`thin_round_to`). ``dither`` in [0, 1): round to the step down or up at that fraction
    instead of always up (:func:`group_dither`)."""
    if not strict_round_to:
        round_to = thin_round_to(channels, round_to)
    step = math.lcm(max(1, round_to), max(1, multiple_of))
    keep = math.ceil(channels * (1.0 - ratio) - 1e-9)
    if dither is not None and step > 1:
        # round down or up to the step at a per-group threshold: groups of one width then change
        # width at different ratios, so the kept MACs follow the ratio smoothly instead of jumping
        # for all of them at once (which made MACs targets miss), and on average keep the exact count
        keep = max(1, math.floor(channels * (1.0 - ratio) / step + dither)) * step
    # GroupNorm needs more than one value per group: with one channel per group a 1x1 map (P7 of a
    # small image) fails, so keep at least two channels per group.
    floor = 2 * multiple_of if multiple_of > 1 else 1
    keep = max(keep, min_channels, floor)
    keep = math.ceil(keep / step) * step
    if keep >= channels or channels % max(1, multiple_of) != 0:
        return channels
    return keep


def plan_channels(
    graph: DetectorGraph, cfg: PruneSection, *, scores: dict[int, torch.Tensor] | None = None
) -> dict[int, list[int]]:
    """Which root channels to cut in each prunable group: ``{group index: sorted indices}``.

    ``scores``: precomputed importance per group index (:func:`surgery.calibrate.group_scores`,
    required for the data-driven ``taylor`` and ``fisher``); groups missing from it are scored
    with ``cfg.method``."""
    given = scores or {}
    scores = {}
    ratios: dict[int, float] = {}
    for g in graph.groups:
        if not g.prunable:
            continue
        r = _ratio_for(g, cfg)
        if r <= 0.0:
            continue
        ratios[g.index] = r
        s = given[g.index] if g.index in given else get_importance(cfg.method)(g)
        if s.numel() != g.channels:
            raise PruningError(f"internal: importance of group {g.root} has {s.numel()} entries for {g.channels} channels")
        scores[g.index] = s

    keep: dict[int, int] = {}
    by_index = {g.index: g for g in graph.groups}
    overridden = {i for i, r in ratios.items() if r != cfg.ratio}
    if cfg.global_ranking:
        # Normalise each group by its mean so groups of different layer sizes compare, then cut
        # the globally weakest channels (per-group floors still apply).
        pool = [i for i in scores if i not in overridden]
        if pool:
            normed = torch.cat([scores[i] / scores[i].mean().clamp_min(1e-12) for i in pool])
            n_cut = int(round(normed.numel() * cfg.ratio))
            threshold = normed.kthvalue(max(1, n_cut)).values.item() if n_cut > 0 else -math.inf
            for i in pool:
                local = scores[i] / scores[i].mean().clamp_min(1e-12)
                r_i = float((local <= threshold).float().mean()) if n_cut > 0 else 0.0
                g = by_index[i]
                keep[i] = keep_count(g.channels, r_i, round_to=cfg.round_to, min_channels=cfg.min_channels,
                                     strict_round_to=cfg.strict_round_to,
                                     dither=None if cfg.strict_round_to else group_dither(i),
                                     multiple_of=g.multiple_of)
    for i, r in ratios.items():
        if i in keep:
            continue
        g = by_index[i]
        keep[i] = keep_count(g.channels, r, round_to=cfg.round_to, min_channels=cfg.min_channels,
                             strict_round_to=cfg.strict_round_to,
                             dither=None if cfg.strict_round_to else group_dither(i),
                             multiple_of=g.multiple_of)

    plan: dict[int, list[int]] = {}
    for i, k in keep.items():
        n = by_index[i].channels
        if k >= n:
            continue
        blocks = _norm_blocks(graph, by_index[i], k)
        if blocks > 1:
            plan[i] = _cut_per_block(scores[i], n, k, blocks)
            continue
        order = torch.argsort(scores[i], stable=True)  # weakest first; ties by index
        plan[i] = sorted(int(x) for x in order[: n - k].tolist())
    return plan


def _norm_blocks(graph: DetectorGraph, group: ChannelGroup, keep: int) -> int:
    """GroupNorm's group count when the cut can keep its groups intact, else 1.

    GroupNorm normalises each run of ``channels / num_groups`` consecutive channels together.
    Ranking the whole width and cutting the weakest channels wherever they are leaves new groups
    that mix channels of different original groups, so every normalisation statistic changes.
    Cutting the same number of channels from every original group keeps each new group a subset
    of one old group. (Measured on the quickstart FCOS at 50% channels, 200 retraining steps:
    mAP 0.650 against 0.644 with free ranking; right after the cut both are near 0, the cut
    regression tower moves the boxes.)"""
    g = group.multiple_of
    if g <= 1 or group.channels % g or keep % g:
        return 1
    if group.chunks > 1:  # chunk(n) splits evenly at run time: equal cuts per chunk are required
        return g
    for name in group.producers:
        layer = graph.module(name)
        if isinstance(layer, nn.GroupNorm) and (layer.num_groups != g or layer.num_channels != group.channels):
            return 1  # a norm over a concatenation or another width: no simple block structure
    return g


def _cut_per_block(scores: torch.Tensor, n: int, keep: int, blocks: int) -> list[int]:
    """The weakest ``(n - keep) / blocks`` channels of each of ``blocks`` consecutive blocks."""
    size, cut = n // blocks, (n - keep) // blocks
    out: list[int] = []
    for b in range(blocks):
        order = torch.argsort(scores[b * size : (b + 1) * size], stable=True)
        out += [b * size + int(x) for x in order[:cut].tolist()]
    return sorted(out)


def apply_channel_plan(graph: DetectorGraph, plan: dict[int, list[int]]) -> dict[str, list[int]]:
    """Cut the planned channels out of every coupled layer. Returns, for every conv/linear layer
    whose output channels were cut, the indices of the original output channels it kept."""
    dg = graph.dg
    model = graph.model
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    by_index = {g.index: g for g in graph.groups}
    names = {m: n for n, m in model.named_modules()}
    kept: dict[str, list[int]] = {}
    with torch.no_grad():
        for i, idxs in plan.items():
            root = graph.module(by_index[i].root)
            pruner = dg.get_pruner_of_module(root)
            group = dg.get_pruning_group(root, pruner.prune_out_channels, idxs)
            if not dg.check_pruning_group(group):
                raise PruningError(f"cutting {len(idxs)} channels of {by_index[i].root} would leave a layer empty")
            _record_kept(dg, group, names, kept)
            group.prune()
    # Torch-Pruning recreates parameters with requires_grad=True: keep frozen layers frozen.
    for n, p in model.named_parameters():
        if n in requires_grad:
            p.requires_grad_(requires_grad[n])
    return kept


def _record_kept(dg: Any, group: Any, names: dict[nn.Module, str], kept: dict[str, list[int]]) -> None:
    """Before ``group`` is cut: which of each conv/linear layer's current output channels survive
    (indices are relative to the current width, so successive cuts compose)."""
    for item in group:
        layer = item.dep.target.module
        if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) or layer not in names:
            continue
        if not dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        name = names[layer]
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        current = kept.get(name, list(range(width)))
        gone = {int(x) for x in item.idxs}
        kept[name] = [c for pos, c in enumerate(current) if pos not in gone]


def prune_model(
    model: nn.Module,
    cfg: PruneSection,
    *,
    trace_size: int = 256,
    macs_input_size: int | None = None,
    calib_data: Iterable[Any] | None = None,
) -> PruneResult:
    """Prune ``model`` in place with the structured criterion in ``cfg`` (l1, l2, bn, taylor, fisher).

    ``macs_input_size``: also count MACs before/after (fvcore, see :mod:`surgery.measure`).
    ``calib_data``: ``(images, targets)`` batches for the data-driven criteria (``taylor``,
    ``fisher``; ``cfg.calib_batches`` of them are used, see :mod:`surgery.calibrate`).
    ``cfg.target_macs`` / ``cfg.target_params``: the ratio is searched so that this fraction of
    the dense MACs / params is kept (:func:`surgery.target.find_ratio_for_target`).
    """
    from .calibrate import group_scores
    from .importance import needs_data

    if cfg.method == "magnitude":
        raise PruningError("method 'magnitude' is masked weight pruning: use surgery.masked.prune_masked")
    get_importance(cfg.method)  # fail fast on an unknown method
    if needs_data(cfg.method) and calib_data is None:
        raise PruningError(
            f"method {cfg.method!r} ranks channels on data: pass calib_data (CLI: --data / the recipe's data "
            "section), or choose l1, l2 or bn"
        )
    if cfg.target_macs is not None and macs_input_size is None:
        raise PruningError("target_macs needs macs_input_size (the recipe's bench.input_size) to count MACs")
    check_patterns(model, list(cfg.overrides), "override")
    check_patterns(model, cfg.skip, "skip")

    counted = _macs(model, macs_input_size)
    macs_before = int(counted.total) if counted is not None else None
    params_before = count_params(model).total
    widths_before = layer_widths(model)

    t0 = time.perf_counter()
    graph = trace(model, trace_size=trace_size, skip=cfg.skip)
    scores = group_scores(graph, cfg.method, calib_data=calib_data, calib_batches=cfg.calib_batches)
    target = None
    if cfg.target_macs is not None or cfg.target_params is not None:
        from .target import find_ratio_for_target

        target = find_ratio_for_target(
            model, cfg, target_macs=cfg.target_macs, target_params=cfg.target_params,
            macs_input_size=macs_input_size, trace_size=trace_size, graph=graph, scores=scores,
            macs_before=macs_before,
        )  # fmt: skip
        cfg = dataclasses.replace(cfg, ratio=target.ratio)
    if cfg.target_latency is not None:  # per-group widths for a latency budget (surgery.latency)
        from .latency import cut_with_overrides, latency_ratios

        target = latency_ratios(
            model, graph, scores, cfg, target=cfg.target_latency, runtime=cfg.runtime,
            input_size=macs_input_size or trace_size, cut=cut_with_overrides(graph, cfg, scores),
        )  # fmt: skip
        roots = {g.index: g.root for g in graph.groups}
        cfg = dataclasses.replace(cfg, overrides={**cfg.overrides, **{roots[i]: r for i, r in target.ratios.items()}})
    t1 = time.perf_counter()
    channel_plan = plan_channels(graph, cfg, scores=scores)
    kept = apply_channel_plan(graph, channel_plan)
    anchors_plan = None
    if cfg.anchors is not None:
        from .anchors import prune_anchors

        anchors_plan = prune_anchors(model, cfg.anchors, graph.output_layers)
    t2 = time.perf_counter()

    groups = [
        GroupReport(
            index=g.index,
            root=g.root,
            layers=g.producers,
            channels_before=g.channels,
            channels_after=g.channels - len(channel_plan.get(g.index, [])),
            prunable=g.prunable,
            reason=g.reason,
        )
        for g in graph.groups
    ]
    report = PruneReport(
        method=cfg.method,
        ratio=cfg.ratio,
        global_ranking=cfg.global_ranking,
        groups=groups,
        output_layers=graph.output_layers,
        params_before=params_before,
        params_after=count_params(model).total,
        seconds_analysis=t1 - t0,
        seconds_cut=t2 - t1,
        anchors=anchors_plan,
        macs_before=macs_before,
        macs_after=int(_macs(model, macs_input_size).total) if macs_input_size is not None else None,
        target=target,
        macs_input_size=macs_input_size if macs_before is not None else None,
        macs_rois=MACS_ROIS if macs_before is not None and is_two_stage(model) else None,
        macs_network_input=counted.backbone_input if counted is not None else None,
    )
    from .importance import needs_data

    plan = StructuredPlan(
        method=cfg.method,
        ratio=cfg.ratio,  # with a target: the ratio the search found
        global_ranking=cfg.global_ranking,
        round_to=cfg.round_to,
        min_channels=cfg.min_channels,
        overrides=dict(cfg.overrides),
        skip=list(cfg.skip),
        output_layers=list(graph.output_layers),
        groups=[{**g.to_dict(), "pruned": channel_plan.get(g.index, [])} for g in graph.groups],
        anchors=anchors_plan,
        widths_before=widths_before,
        widths_after=layer_widths(model),
        params_before=params_before,
        params_after=report.params_after,
        target_macs=cfg.target_macs,
        target_params=cfg.target_params,
        achieved_params_ratio=report.params_ratio,
        achieved_macs_ratio=report.macs_ratio,
        calib_batches=cfg.calib_batches if needs_data(cfg.method) else None,
    )
    return PruneResult(plan=plan, report=report, graph=graph, kept=kept)


def inspect_model(model: nn.Module, *, trace_size: int = 256, skip: Sequence[str] = ()) -> DetectorGraph:
    """Trace without cutting (what ``surgery inspect`` shows)."""
    check_patterns(model, skip, "skip")
    return trace(model, trace_size=trace_size, skip=skip)


MACS_ROIS = 100  # the RoI count two-stage MACs are counted at (count_macs' default, as bench does)


def _macs(model: nn.Module, size: int | None) -> Any:
    """The :class:`surgery.measure.MacsResult` at ``size`` (None without a size)."""
    if size is None:
        return None
    from .measure import count_macs

    return count_macs(model, size, rois=MACS_ROIS)


__all__ = [
    "GroupReport",
    "PruneReport",
    "PruneResult",
    "apply_channel_plan",
    "check_patterns",
    "inspect_model",
    "keep_count",
    "thin_round_to",
    "layer_widths",
    "plan_channels",
    "prune_model",
]
