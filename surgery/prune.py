"""Structured pruning: rank each coupled group's channels and physically cut the weakest.

``prune_model`` = trace (``graph``) -> rank (``importance``, ``calibrate``) -> allocate
(``allocate``: uniform, global, a MACs/params target...) -> cut (channels and anchors, ``cut``)
-> recover (a hook, ``cut.recover``).
The result's :class:`~surgery.plan.StructuredPlan` goes into the checkpoint; :mod:`surgery.checkpoint`
rebuilds the model from the original builder, the plan's anchor part and the saved shapes.
:func:`surgery.workflows.prune_and_save` is the whole step (resolve a model, prune, save).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import latency as _latency  # noqa: F401 - registers the "latency" allocator
from . import sensitivity as _sensitivity  # noqa: F401 - registers the "sensitivity" allocator
from . import target as _target  # noqa: F401 - registers the "target" allocator
from .allocate import (
    ALLOCATORS,
    AllocationContext,
    ChannelPlan,
    allocate,
    allocation_name,
    check_patterns,
    keep_count,
    plan_channels,
    thin_round_to,
)
from .calibrate import group_scores
from .cut import apply_channel_plan, cut, recover
from .errors import PruningError
from .graph import DetectorGraph, trace
from .importance import get_importance, needs_data
from .measure import count_macs, count_params
from .measure.workload import MACS_ROIS, is_two_stage
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


def _check_section(model: nn.Module, cfg: PruneSection, macs_input_size: int | None, calib_data: Any) -> None:
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
    ALLOCATORS.get(allocation_name(cfg))  # fail fast on an unknown allocation
    check_patterns(model, list(cfg.overrides), "override")
    check_patterns(model, cfg.skip, "skip")


def prune_model(
    model: nn.Module,
    cfg: PruneSection,
    *,
    trace_size: int = 256,
    macs_input_size: int | None = None,
    calib_data: Iterable[Any] | None = None,
) -> PruneResult:
    """Prune ``model`` in place with the structured criterion in ``cfg`` (l1, l2, bn, taylor, fisher).

    The stages: trace, rank (:func:`surgery.calibrate.group_scores`), allocate
    (:func:`surgery.allocate.allocate`), cut and recover (:mod:`surgery.cut`).
    ``macs_input_size``: also count MACs before/after (fvcore, see :mod:`surgery.measure`).
    ``calib_data``: ``(images, targets)`` batches for the data-driven criteria (``taylor``,
    ``fisher``; ``cfg.calib_batches`` of them are used, see :mod:`surgery.calibrate`).
    ``cfg.target_macs`` / ``cfg.target_params``: the ratio is searched so that this fraction of
    the dense MACs / params is kept (the ``target`` allocator, :mod:`surgery.target`).
    """
    _check_section(model, cfg, macs_input_size, calib_data)
    counted = _macs(model, macs_input_size)
    macs_before = int(counted.total) if counted is not None else None
    params_before = count_params(model).total
    widths_before = layer_widths(model)

    t0 = time.perf_counter()
    graph = trace(model, trace_size=trace_size, skip=cfg.skip)
    scores = group_scores(graph, cfg.method, calib_data=calib_data, calib_batches=cfg.calib_batches)
    ctx = AllocationContext(model, graph, scores, cfg, macs_input_size, macs_before, calib_data)
    allocation = allocate(ctx)
    cfg = allocation.cfg
    t1 = time.perf_counter()
    anchors_plan, kept = cut(graph, allocation.plan, cfg)
    recover(graph, cfg, calib_data)
    t2 = time.perf_counter()

    report = PruneReport(
        method=cfg.method,
        ratio=cfg.ratio,
        global_ranking=cfg.global_ranking,
        groups=_group_reports(graph, allocation.plan),
        output_layers=graph.output_layers,
        params_before=params_before,
        params_after=count_params(model).total,
        seconds_analysis=t1 - t0,
        seconds_cut=t2 - t1,
        anchors=anchors_plan,
        macs_before=macs_before,
        macs_after=int(_macs(model, macs_input_size).total) if macs_input_size is not None else None,
        target=allocation.target,
        macs_input_size=macs_input_size if macs_before is not None else None,
        macs_rois=MACS_ROIS if macs_before is not None and is_two_stage(model) else None,
        macs_network_input=counted.backbone_input if counted is not None else None,
    )
    plan = _structured_plan(cfg, graph, allocation.plan, report, widths_before, layer_widths(model))
    return PruneResult(plan=plan, report=report, graph=graph, kept=kept)


def _group_reports(graph: DetectorGraph, channel_plan: ChannelPlan) -> list[GroupReport]:
    return [
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


def _structured_plan(
    cfg: PruneSection, graph: DetectorGraph, channel_plan: ChannelPlan, report: PruneReport,
    widths_before: dict[str, int], widths_after: dict[str, int],
) -> StructuredPlan:
    return StructuredPlan(
        method=cfg.method,
        ratio=cfg.ratio,  # with a target: the ratio the search found
        global_ranking=cfg.global_ranking,
        round_to=cfg.round_to,
        min_channels=cfg.min_channels,
        overrides=dict(cfg.overrides),
        skip=list(cfg.skip),
        output_layers=list(graph.output_layers),
        groups=[{**g.to_dict(), "pruned": channel_plan.get(g.index, [])} for g in graph.groups],
        anchors=report.anchors,
        widths_before=widths_before,
        widths_after=widths_after,
        params_before=report.params_before,
        params_after=report.params_after,
        target_macs=cfg.target_macs,
        target_params=cfg.target_params,
        achieved_params_ratio=report.params_ratio,
        achieved_macs_ratio=report.macs_ratio,
        calib_batches=cfg.calib_batches if needs_data(cfg.method) else None,
    )


def inspect_model(model: nn.Module, *, trace_size: int = 256, skip: Sequence[str] = ()) -> DetectorGraph:
    """Trace without cutting (what ``surgery inspect`` shows)."""
    check_patterns(model, skip, "skip")
    return trace(model, trace_size=trace_size, skip=skip)


def _macs(model: nn.Module, size: int | None) -> Any:
    """The :class:`surgery.measure.MacsResult` at ``size`` (None without a size)."""
    if size is None:
        return None
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
