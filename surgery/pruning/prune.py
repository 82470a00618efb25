"""Structured pruning as one pipeline: rank -> allocate -> cut -> recover.

``prune_to(model, budget, data=...)`` is the Python API (what ``surgery prune`` runs)::

    >>> import surgery
    >>> model = surgery.build_model("fcos_resnet18_slim", num_classes=3, min_size=64, max_size=64)
    >>> result = surgery.prune_to(model, surgery.CutRatio(0.5), trace_size=64)
    >>> result.report.params_after < 0.5 * result.report.params_before
    True

(``docs/reference/python-api.md``: every budget, recovery, the result's parts.)

The stages, each one function with one signature:

1. **rank** ``graph, data -> scores`` (:func:`surgery.pruning.calibrate.group_scores`);
2. **allocate** ``candidates, scores, budget, rounding -> Allocation``: the allocator
   :data:`ALLOCATORS` lists for the budget's type (:mod:`surgery.pruning.budget`);
3. **cut** ``graph, plan -> kept`` (:func:`surgery.pruning.cut.cut`, anchors too);
4. **recover** ``dense, pruned, kept, data -> report``: the method :data:`RECOVERY_METHODS`
   names (no gradient step).

:func:`surgery.pruning.budget.from_config` turns a recipe's ``prune`` section into a
:class:`~surgery.pruning.budget.PruneJob` (:func:`prune_model` takes the section directly). The result's
:class:`~surgery.pruning.plan.StructuredPlan` goes into the checkpoint; :mod:`surgery.storage.checkpoint` rebuilds
the model from the original builder, the plan's anchor part and the saved shapes.
:func:`surgery.workflows.prune_and_save` loads a model, calls this and saves.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config.recipe import AnchorSection, PruneSection
from ..errors import PruningError
from ..measure import count_macs, count_params
from ..measure.workload import MACS_ROIS, is_two_stage
from .allocate import (
    Allocation,
    ChannelPlan,
    allocate_ratio,
    check_patterns,
    keep_count,
    plan_channels,
    thin_round_to,
)
from .budget import (
    Budget,
    CutRatio,
    KeepLatency,
    KeepMacs,
    KeepParams,
    PruneJob,
    Recovery,
    Rounding,
    Sensitivity,
    from_config,
)
from .calibrate import group_scores
from .candidate import Candidates
from .cut import apply_channel_plan, cut
from .graph import DetectorGraph, trace
from .importance import get_importance, needs_data
from .latency import allocate_for_latency
from .plan import StructuredPlan
from .reconstruct import ReconstructReport, reconstruct
from .recover import RecoveryResult, recover
from .sensitivity import allocate_sensitivity
from .target import allocate_for_target

Allocator = Callable[[Candidates, dict[int, torch.Tensor], Any, Rounding], Allocation]
# budget type -> its allocator: every allocator, listed here
ALLOCATORS: dict[type, Allocator] = {
    CutRatio: allocate_ratio,
    KeepMacs: allocate_for_target,
    KeepParams: allocate_for_target,
    KeepLatency: allocate_for_latency,
    Sensitivity: allocate_sensitivity,
}


def refit(dense: nn.Module, pruned: nn.Module, kept: dict[str, list[int]], data: Iterable[Any],
          recovery: Recovery) -> RecoveryResult:
    """Least-squares re-fit of the cut layers' consumers + BatchNorm re-estimation (:mod:`surgery.pruning.recover`)."""
    return recover(pruned, dense, data, kept=kept, batches=recovery.batches)


def reconstruction(dense: nn.Module, pruned: nn.Module, kept: dict[str, list[int]], data: Iterable[Any],
                   recovery: Recovery) -> ReconstructReport:
    """The re-fit, then Adam steps matching the dense model's outputs on the calibration images,
    labels never read (:mod:`surgery.pruning.reconstruct`)."""
    return reconstruct(dense, pruned, data, kept=kept, batches=recovery.batches, steps=recovery.steps,
                       seconds=recovery.seconds, lr=recovery.lr)


RecoveryMethod = Callable[[nn.Module, nn.Module, dict[str, list[int]], Iterable[Any], Recovery], Any]
# recovery method name (prune.recover_method) -> fn(dense, pruned, kept, data, recovery) -> a report
# with summary(): every method, listed here
RECOVERY_METHODS: dict[str, RecoveryMethod] = {
    "refit": refit,
    "reconstruct": reconstruction,
}


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
    target: Any = None  # surgery.pruning.target.TargetResult when the ratio was searched for a target
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
    # order (what surgery.pruning.recover matches the dense model's outputs with)
    kept: dict[str, list[int]] = field(default_factory=dict, repr=False)
    allocation: Allocation | None = field(default=None, repr=False)  # the allocator's answer
    recovery: Any = None  # the recovery method's report (RecoveryResult for "refit"), None without recovery
    cut_metrics: Any = None  # what on_cut returned, right after the cut (before recovery)


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv/linear layer (what the report and the plots show)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = int(m.out_features)
    return out


def prune_to(
    model: nn.Module,
    budget: Budget,
    *,
    data: Iterable[Any] | None = None,
    method: str = "l1",
    rounding: Rounding | None = None,
    skip: Sequence[str] = (),
    anchors: AnchorSection | None = None,
    calib_batches: int = 4,
    recovery: Recovery | None = None,
    recover_data: Iterable[Any] | None = None,
    trace_size: int = 256,
    macs_size: int | None = None,
    on_cut: Callable[[nn.Module], Any] | None = None,
) -> PruneResult:
    """Prune ``model`` in place to ``budget`` (:mod:`surgery.pruning.budget`), as ``surgery prune`` does.

    ``data``: ``(images, targets)`` batches for the data-driven criteria (``method`` taylor,
    fisher: ``calib_batches`` of them) and, unless ``recover_data`` is given, for ``recovery``
    (e.g. ``Recovery(16)``: the least-squares re-fit on 16 batches). ``rounding``: kept widths
    (default ``Rounding()``). ``macs_size``: count MACs before/after at this image side (default:
    the budget's MACs size, if it has one). ``on_cut(model)``: called right after the cut, before
    recovery (its answer is ``result.cut_metrics``). Returns the plan (what the checkpoint
    records), the report, the allocation and the recovery report. See :mod:`surgery.pruning.prune`."""
    job = PruneJob(budget=budget, method=method, rounding=rounding or Rounding(), skip=tuple(skip), anchors=anchors,
                   calib_batches=calib_batches, recovery=recovery)
    return run_job(model, job, data=data, recover_data=recover_data, trace_size=trace_size, macs_size=macs_size,
                   on_cut=on_cut)


def prune_model(
    model: nn.Module,
    cfg: PruneSection,
    *,
    trace_size: int = 256,
    macs_input_size: int | None = None,
    calib_data: Iterable[Any] | None = None,
    recover_data: Iterable[Any] | None = None,
) -> PruneResult:
    """:func:`prune_to` with a recipe's ``prune`` section (:func:`surgery.pruning.budget.from_config`
    makes the budget: ``target_macs`` -> KeepMacs at ``macs_input_size``, ``target_params``,
    ``target_latency``, ``allocation: sensitivity``, else the cut ratio)."""
    job = from_config(cfg, macs_input_size=macs_input_size, latency_size=trace_size)
    return run_job(model, job, data=calib_data, recover_data=recover_data, trace_size=trace_size,
                   macs_size=macs_input_size)


def run_job(
    model: nn.Module,
    job: PruneJob,
    *,
    data: Iterable[Any] | None = None,
    recover_data: Iterable[Any] | None = None,
    trace_size: int = 256,
    macs_size: int | None = None,
    on_cut: Callable[[nn.Module], Any] | None = None,
) -> PruneResult:
    """The stages of ``job`` on ``model`` (in place): rank, allocate, cut, recover."""
    recover_data = recover_data if recover_data is not None else data
    _check_job(model, job, data, recover_data)
    macs_size = macs_size or (job.budget.input_size if isinstance(job.budget, (KeepMacs, Sensitivity)) else None)
    counted = _macs(model, macs_size)
    params_before = count_params(model).total
    widths_before = layer_widths(model)
    dense = copy.deepcopy(model) if job.recovery is not None else None  # what recovery matches

    t0 = time.perf_counter()
    graph = trace(model, trace_size=trace_size, skip=job.skip)
    scores = group_scores(graph, job.method, calib_data=data, calib_batches=job.calib_batches)
    candidates = Candidates(graph, job.skip, job.anchors, {macs_size: int(counted.total)} if counted else {})
    allocation = allocate(candidates, scores, job.budget, job.rounding)
    t1 = time.perf_counter()
    kept, anchors_plan = cut(graph, allocation.plan, job.anchors)
    t2 = time.perf_counter()
    cut_metrics = on_cut(model) if on_cut is not None else None
    recovery = None
    if job.recovery is not None:
        recovery = recover_cut(job.recovery, dense, model, kept, recover_data)

    groups = _group_reports(graph, allocation.plan)
    report = PruneReport(
        method=job.method,
        ratio=_recorded_ratio(allocation, groups),
        global_ranking=job.global_ranking,
        groups=groups,
        output_layers=graph.output_layers,
        params_before=params_before,
        params_after=count_params(model).total,
        seconds_analysis=t1 - t0,
        seconds_cut=t2 - t1,
        anchors=anchors_plan,
        macs_before=int(counted.total) if counted is not None else None,
        macs_after=int(_macs(model, macs_size).total) if counted is not None else None,
        target=allocation.target,
        macs_input_size=macs_size if counted is not None else None,
        macs_rois=MACS_ROIS if counted is not None and is_two_stage(model) else None,
        macs_network_input=counted.backbone_input if counted is not None else None,
    )
    plan = _structured_plan(job, graph, allocation, report, widths_before, layer_widths(model), recovery)
    return PruneResult(plan=plan, report=report, graph=graph, kept=kept, allocation=allocation, recovery=recovery,
                       cut_metrics=cut_metrics)


def allocate(candidates: Candidates, scores: dict[int, torch.Tensor], budget: Budget, rounding: Rounding) -> Allocation:
    """The allocate stage: the allocator :data:`ALLOCATORS` lists for ``type(budget)``."""
    allocator = ALLOCATORS.get(type(budget))
    if allocator is None:
        names = ", ".join(t.__name__ for t in ALLOCATORS)
        raise PruningError(f"no allocator for a {type(budget).__name__} budget (one of {names})")
    return allocator(candidates, scores, budget, rounding)


def recover_cut(recovery: Recovery, dense: nn.Module, pruned: nn.Module, kept: dict[str, list[int]],
                data: Iterable[Any]) -> Any:
    """The recover stage: the method :data:`RECOVERY_METHODS` names, on ``recovery.batches`` batches."""
    method = RECOVERY_METHODS.get(recovery.method)
    if method is None:
        raise PruningError(f"unknown recovery method {recovery.method!r} (one of {', '.join(RECOVERY_METHODS)})")
    return method(dense, pruned, kept, data, recovery)


def _check_job(model: nn.Module, job: PruneJob, data: Any, recover_data: Any) -> None:
    if job.method == "magnitude":
        raise PruningError("method 'magnitude' is masked weight pruning: use surgery.pruning.masked.prune_masked")
    get_importance(job.method)  # fail fast on an unknown method
    if needs_data(job.method) and data is None:
        raise PruningError(
            f"method {job.method!r} ranks channels on data: pass calib_data (CLI: --data / the recipe's data "
            "section), or choose l1, l2 or bn"
        )
    if job.recovery is not None:
        if job.recovery.method not in RECOVERY_METHODS:
            raise PruningError(f"unknown recovery method {job.recovery.method!r} (one of {', '.join(RECOVERY_METHODS)})")
        if recover_data is None:
            raise PruningError("recovery after the cut needs calibration batches: pass data (CLI: --data)")
    if type(job.budget) not in ALLOCATORS:
        allocate(None, {}, job.budget, job.rounding)  # type: ignore[arg-type] - raises the error
    check_patterns(model, list(job.overrides), "override")
    check_patterns(model, job.skip, "skip")


def _recorded_ratio(allocation: Allocation, groups: list[GroupReport]) -> float:
    """The ratio a plan records: the one the allocator used, or, for per-group ratios, the fraction
    of the prunable channels removed (what the reports print as "% channels"; the mean of the cut
    groups' ratios said 28% for a YOLO26n sensitivity cut to half the MACs that removed 38%)."""
    if allocation.ratio is not None:
        return allocation.ratio
    before = sum(g.channels_before for g in groups if g.prunable)
    removed = sum(g.channels_before - g.channels_after for g in groups if g.prunable)
    return round(removed / before, 4) if before else 0.0


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
    job: PruneJob, graph: DetectorGraph, allocation: Allocation, report: PruneReport,
    widths_before: dict[str, int], widths_after: dict[str, int], recovery: Any,
) -> StructuredPlan:
    budget = job.budget
    roots = {g.index: g.root for g in graph.groups}
    plan = StructuredPlan(
        method=job.method,
        ratio=report.ratio,  # with a target: the ratio the search found
        global_ranking=job.global_ranking,
        round_to=job.rounding.round_to,
        min_channels=job.rounding.min_channels,
        overrides={**job.overrides, **{roots[i]: r for i, r in allocation.group_ratios.items()}},
        skip=list(job.skip),
        output_layers=list(graph.output_layers),
        groups=[{**g.to_dict(), "pruned": allocation.plan.get(g.index, [])} for g in graph.groups],
        anchors=report.anchors,
        widths_before=widths_before,
        widths_after=widths_after,
        params_before=report.params_before,
        params_after=report.params_after,
        target_macs=budget.fraction if isinstance(budget, KeepMacs) else getattr(budget, "keep_macs", None),
        target_params=budget.fraction if isinstance(budget, KeepParams) else None,
        achieved_params_ratio=report.params_ratio,
        achieved_macs_ratio=report.macs_ratio,
        calib_batches=job.calib_batches if needs_data(job.method) else None,
    )
    sens = allocation.info.get("sensitivity")
    if sens is not None:
        plan.extra["allocation"] = {"kind": "sensitivity", "table": budget.table, "target_macs": budget.keep_macs,
                                    "met": sens.met, "estimated_macs_ratio": round(sens.estimated_macs_ratio, 4)}
    if recovery is not None and callable(getattr(recovery, "summary", None)):
        plan.extra["recovery"] = recovery.summary()
    return plan


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
    "ALLOCATORS",
    "RECOVERY_METHODS",
    "ChannelPlan",
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
    "prune_to",
    "run_job",
]
