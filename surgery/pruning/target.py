"""Reach a MACs or parameter budget: search the pruning ratio that keeps a given fraction (the
``target`` allocator of :mod:`surgery.pruning.allocate`).

``find_ratio_for_target`` ranks once (the scores do not depend on the ratio), then bisects the
ratio (uniform or global ranking, overrides keep their own ratios) on a cheap *cost model*:
every conv/linear/norm layer's new width follows from the channel plan without cutting
anything, so

- parameters are counted exactly from the widths;
- MACs are ``sum_layers macs_l * (out'/out) * ((in'/groups')/(in/groups))`` over conv and
  linear layers, each layer's dense MACs recorded once by forward hooks (same fixed workload and
  input size as :func:`surgery.measure.count_macs`), plus the rest of fvcore's count (norm
  layers, RoIAlign, upsampling, pooling) scaled by the layers' average shrink.

The ratio found is then verified for real: a deep copy is traced, cut (anchors too) and counted
with :func:`surgery.measure.count_macs`. If the real fraction misses the target by more than
``tol`` (relative), the cost model's goal is corrected by the observed error and the search runs
again (at most ``max_rounds`` real cuts). ``round_to``, ``min_channels``, GroupNorm divisibility
and unprunable groups make the fraction a step function of the ratio (and bound it from below):
when no ratio lands within ``tol``, the closest verified one is returned with
``within_tolerance=False`` and a ``note`` saying why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config.recipe import PruneSection
from ..errors import PruningError
from ..measure import fixed_workload
from ..measure.workload import MACS_ROIS
from .allocate import Allocation, ChannelPlan, channel_plan, check_patterns
from .budget import KeepMacs, KeepParams, Rounding
from .calibrate import group_scores
from .candidate import Candidates
from .graph import LAYER_TYPES, NORM_TYPES, DetectorGraph, trace

MAX_RATIO = 0.995


@dataclass
class TargetResult:
    """The ratio found for a MACs/params target and what it achieves (real counts)."""

    ratio: float
    target_macs: float | None
    target_params: float | None
    achieved_macs_ratio: float | None
    achieved_params_ratio: float
    macs_before: int | None
    macs_after: int | None
    params_before: int
    params_after: int
    tol: float
    within_tolerance: bool
    estimates: int  # cost-model evaluations
    verifications: int  # real cuts of a copy
    note: str = ""

    @property
    def target(self) -> float:
        return self.target_macs if self.target_macs is not None else float(self.target_params)

    @property
    def achieved(self) -> float | None:
        return self.achieved_macs_ratio if self.target_macs is not None else self.achieved_params_ratio

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# cost model: widths from a channel plan, params and MACs from widths


def _layer_macs(model: nn.Module, size: int) -> dict[nn.Module, int]:
    """MACs of each conv/linear layer (summed over its calls) for one ``size`` x ``size`` image
    in eval mode under :func:`surgery.measure.fixed_workload` (what ``count_macs`` runs)."""
    macs: dict[nn.Module, int] = {}

    def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        if isinstance(m, nn.modules.conv._ConvNd):
            k = math.prod(m.kernel_size)
            n = x.numel() * (m.out_channels // m.groups) * k if m.transposed else out.numel() * (m.in_channels // m.groups) * k
        else:
            n = out.numel() * m.in_features
        macs[m] = macs.get(m, 0) + int(n)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LAYER_TYPES)]
    was_training = model.training
    device = next(model.parameters()).device
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        model.eval()
        with fixed_workload(model, MACS_ROIS, 100), torch.no_grad():
            model([image])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def _dims(m: nn.Module) -> tuple[int, int, int]:
    """(out, in, groups) of a layer; norm layers: (channels, channels, 1)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels, m.in_channels, m.groups
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features, 1
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, m.num_channels, 1
    w = getattr(m, "weight", None)
    c = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim >= 1 else int(getattr(m, "num_features", 0) or 0)
    return c, c, 1


class CostModel:
    """Params and MACs of ``graph.model`` after a channel plan, without cutting."""

    def __init__(self, graph: DetectorGraph, macs_input_size: int | None = None, macs_total: int | None = None) -> None:
        self.graph = graph
        model = graph.model
        dg = graph.dg
        # per prunable group: (module, cuts its outputs?, root index of each of its indices)
        self.items: dict[int, list[tuple[nn.Module, bool, torch.Tensor]]] = {}
        for g in graph.groups:
            if not g.prunable:
                continue
            rows = []
            for item in g.tp_group:
                layer = item.dep.target.module
                if not isinstance(layer, LAYER_TYPES + NORM_TYPES) or any(r is None for r in item.root_idxs):
                    continue
                if dg.is_out_channel_pruning_fn(item.dep.handler):
                    out = True
                elif dg.is_in_channel_pruning_fn(item.dep.handler):
                    out = False
                else:
                    continue
                rows.append((layer, out, torch.as_tensor([int(r) for r in item.root_idxs], dtype=torch.long)))
            self.items[g.index] = rows
        self.channels = {g.index: g.channels for g in graph.groups}
        self.dims = {m: _dims(m) for m in model.modules() if isinstance(m, LAYER_TYPES + NORM_TYPES)}
        self.other_params = sum(
            p.numel() for m in model.modules() if not isinstance(m, LAYER_TYPES + NORM_TYPES)
            for p in m.parameters(recurse=False)
        )  # fmt: skip
        self.params_before = sum(p.numel() for p in model.parameters())
        self.layer_macs: dict[nn.Module, int] = {}
        self.rest_macs = 0
        self.macs_before: int | None = None
        if macs_input_size is not None:
            self.layer_macs = _layer_macs(model, macs_input_size)
            counted = sum(self.layer_macs.values())
            self.macs_before = int(macs_total) if macs_total is not None else counted
            self.rest_macs = max(0, self.macs_before - counted)

    def widths(self, plan: dict[int, list[int]]) -> dict[nn.Module, tuple[int, int, int]]:
        """(out, in, groups) of every layer after ``plan``."""
        out_cut: dict[nn.Module, int] = {}
        in_cut: dict[nn.Module, int] = {}
        for gi, idxs in plan.items():
            if not idxs:
                continue
            mask = torch.zeros(self.channels[gi], dtype=torch.bool)
            mask[torch.as_tensor(idxs, dtype=torch.long)] = True
            for layer, is_out, root in self.items.get(gi, ()):
                n = int(mask[root].sum())
                d = out_cut if is_out else in_cut
                d[layer] = d.get(layer, 0) + n
        new = {}
        for m, (o, i, groups) in self.dims.items():
            o2 = o - out_cut.get(m, 0)
            if groups > 1 and groups == i:  # depthwise: in, out and groups shrink together
                new[m] = (o2, o2 * i // o if o else o2, o2 * groups // o if o else groups)
            else:
                new[m] = (o2, i - in_cut.get(m, 0), groups)
        return new

    def params(self, widths: dict[nn.Module, tuple[int, int, int]]) -> int:
        total = self.other_params
        for m, (o, i, groups) in widths.items():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, LAYER_TYPES) and name == "weight":
                    o0, i0, g0 = self.dims[m]
                    total += p.numel() // (o0 * (i0 // g0)) * o * (i // groups) if o0 and i0 else p.numel()
                elif p.ndim == 1 and p.shape[0] == self.dims[m][0]:
                    total += o
                else:
                    total += p.numel()
        return total

    def macs(self, widths: dict[nn.Module, tuple[int, int, int]]) -> float:
        if self.macs_before is None:
            raise PruningError("internal: the cost model was built without macs_input_size")
        dense = kept = 0.0
        for m, n in self.layer_macs.items():
            o0, i0, g0 = self.dims[m]
            o, i, groups = widths[m]
            if isinstance(m, LAYER_TYPES):
                f = (o / o0) * ((i / groups) / (i0 / g0)) if o0 and i0 else 1.0
            else:
                f = o / o0 if o0 else 1.0
            dense += n
            kept += n * f
        shrink = kept / dense if dense else 1.0
        return kept + self.rest_macs * shrink


# --------------------------------------------------------------------------------------------
# search


def _bisect(fraction, goal: float, at_most: bool = False) -> tuple[float, float, int]:  # noqa: ANN001 - callable
    """Ratio whose (non-increasing, step-wise) ``fraction(ratio)`` is closest to ``goal``
    (``at_most``: closest at or below it, when one was seen)."""
    seen: dict[float, float] = {}

    def f(r: float) -> float:
        if r not in seen:
            seen[r] = fraction(r)
        return seen[r]

    lo, hi = 0.0, MAX_RATIO
    f(lo)
    if f(hi) < goal:
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if f(mid) > goal:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-4:
                break
    under = [r for r in seen if seen[r] <= goal] if at_most else []
    best = min(under or seen, key=lambda r: (abs(seen[r] - goal), r))
    return best, seen[best], len(seen)


def find_ratio_for_target(
    model: nn.Module,
    cfg: PruneSection,
    *,
    target_macs: float | None = None,
    target_params: float | None = None,
    macs_input_size: int | None = None,
    tol: float = 0.02,
    trace_size: int = 256,
    graph: DetectorGraph | None = None,
    scores: dict[int, torch.Tensor] | None = None,
    calib_data: Any = None,
    macs_before: int | None = None,
    max_rounds: int = 3,
) -> TargetResult:
    """The pruning ratio (``cfg.ratio``'s replacement) that keeps ``target_macs`` of the dense
    MACs (counted with :func:`surgery.measure.count_macs` at ``macs_input_size``) or
    ``target_params`` of the parameters, within ``tol`` relative to the target.

    ``model`` is not changed. Ranking follows ``cfg`` (method, uniform or global, overrides,
    skip, round_to, min_channels, anchors). ``graph``/``scores``: a trace of ``model`` and its
    group scores when the caller has them (otherwise traced here and scored with ``cfg.method``,
    with ``calib_data`` for taylor/fisher); ``macs_before``: the dense count if already known.
    """
    if (target_macs is None) == (target_params is None):
        raise PruningError("give exactly one of target_macs and target_params")
    target = float(target_macs if target_macs is not None else target_params)
    if not 0.0 < target < 1.0:
        raise PruningError(f"a target is the fraction to keep, strictly between 0 and 1 (got {target})")
    if target_macs is not None and macs_input_size is None:
        raise PruningError("target_macs needs macs_input_size (the recipe's bench.input_size)")
    if graph is None:
        check_patterns(model, cfg.skip, "skip")
        check_patterns(model, list(cfg.overrides), "override")
        graph = trace(model, trace_size=trace_size, skip=cfg.skip)
    if scores is None:
        scores = group_scores(graph, cfg.method, calib_data=calib_data, calib_batches=cfg.calib_batches)
    candidates = Candidates(graph, cfg.skip, cfg.anchors)
    if macs_input_size is not None and macs_before is not None:
        candidates.known_macs[macs_input_size] = macs_before
    rounding = Rounding(cfg.round_to, cfg.min_channels, strict=cfg.strict_round_to)

    def plan_at(ratio: float) -> ChannelPlan:
        return channel_plan(graph, scores, ratio, rounding, global_ranking=cfg.global_ranking,
                            overrides=cfg.overrides, method=cfg.method)

    return search_ratio(candidates, plan_at, target_macs=target_macs, target_params=target_params,
                        macs_input_size=macs_input_size, tol=tol, max_rounds=max_rounds)


def search_ratio(candidates: Candidates, plan_at: Callable[[float], ChannelPlan], *, target_macs: float | None,
                 target_params: float | None, macs_input_size: int | None, tol: float = 0.02,
                 max_rounds: int = 3, at_most: bool = False) -> TargetResult:
    """The ratio whose plan (``plan_at(ratio)``) keeps the target: bisected on the cost model,
    verified on cut copies (see the module docstring). ``at_most``: the target is a ceiling, so
    a verified cut within ``tol`` above it is accepted but the one returned is the closest at or
    below ``target x (1 + tol)`` when one was verified."""
    macs_before = candidates.dense_macs(macs_input_size) if macs_input_size is not None else None
    target = float(target_macs if target_macs is not None else target_params)
    cost = CostModel(candidates.graph, macs_input_size, macs_before)
    params_before = cost.params_before

    def fraction(ratio: float) -> float:
        widths = cost.widths(plan_at(ratio))
        return cost.macs(widths) / cost.macs_before if target_macs is not None else cost.params(widths) / params_before

    def measure(ratio: float) -> tuple[int, int | None]:
        counts = candidates.count(plan_at(ratio), macs_input_size)
        return counts.params, counts.macs

    best, tried, estimates = _search(fraction, target, max_rounds, tol, measure,
                                     lambda p, m: m / macs_before if target_macs is not None else p / params_before,
                                     at_most=at_most)
    params_after, macs_after = tried[best]
    achieved = macs_after / macs_before if target_macs is not None else params_after / params_before
    result = TargetResult(
        ratio=round(best, 6),
        target_macs=target_macs,
        target_params=target_params,
        achieved_macs_ratio=(macs_after / macs_before) if macs_after is not None and macs_before else None,
        achieved_params_ratio=params_after / params_before,
        macs_before=macs_before,
        macs_after=macs_after,
        params_before=params_before,
        params_after=params_after,
        tol=tol,
        within_tolerance=abs(achieved / target - 1.0) <= tol,
        estimates=estimates,
        verifications=len(tried),
    )
    if not result.within_tolerance:
        result.note = _miss_note(result, target, achieved, fraction(MAX_RATIO), "MACs" if target_macs is not None else "params")
    return result


def _search(fraction, target: float, max_rounds: int, tol: float, measure, achieved_of,  # noqa: ANN001
            at_most: bool = False):
    """Bisect on the cost model, verify the ratio on a real cut (``measure(ratio) -> (params,
    MACs)``), correct the goal by the observed error; returns the best verified ratio, every
    verified ``{ratio: (params, MACs)}`` and the number of cost-model estimates."""
    goal = target
    estimates = 0
    tried: dict[float, tuple[int, int | None]] = {}
    best: float | None = None

    def achieved(r: float) -> float:
        return achieved_of(*tried[r])

    def key(r: float) -> tuple[bool, float]:  # at_most: a cut over the ceiling ranks after every one under it
        return (at_most and achieved(r) > target * (1.0 + tol), abs(achieved(r) - target))

    for _ in range(max_rounds):
        ratio, _est, n = _bisect(fraction, goal, at_most)
        estimates += n
        if ratio not in tried:
            tried[ratio] = measure(ratio)
        real = achieved(ratio)
        if best is None or key(ratio) < key(best):
            best = ratio
        if abs(real / target - 1.0) <= tol:
            break
        # the cost model missed (RoIAlign, anchors, ops fvcore attributes elsewhere): move its goal
        new_goal = min(0.999, max(1e-4, goal * target / real))
        if abs(new_goal - goal) < 1e-6:
            break
        goal = new_goal
    assert best is not None
    return best, tried, estimates


def _miss_note(result: TargetResult, target: float, achieved: float, floor: float, what: str) -> str:
    why = (
        f"the most this model can be cut to is about {floor:.1%} of its {what} (unprunable groups, min_channels)"
        if target < floor
        else "round_to/min_channels make the kept fraction jump between ratios"
    )
    return (
        f"target {target:.1%} of the {what} not reached within {result.tol:.0%}: closest is {achieved:.1%} "
        f"at ratio {result.ratio:.4f} ({why})"
    )


def allocate_for_target(candidates: Candidates, scores: dict[int, torch.Tensor], budget: KeepMacs | KeepParams,
                        rounding: Rounding) -> Allocation:
    """The :class:`~surgery.pruning.budget.KeepMacs` / :class:`~surgery.pruning.budget.KeepParams` allocator: the
    uniform or global plan at the ratio that keeps the budget's fraction."""
    graph = candidates.graph
    macs = isinstance(budget, KeepMacs)
    weights = weighted_groups(graph, budget.group_weights) if macs and budget.group_weights else None

    def shaped(ratio: float) -> dict[int, float] | None:
        return None if weights is None else {i: min(MAX_WEIGHTED_RATIO, ratio * w) for i, w in weights.items()}

    def plan_at(ratio: float) -> ChannelPlan:
        return channel_plan(graph, scores, ratio, rounding, global_ranking=budget.global_ranking,
                            overrides=budget.overrides, group_ratios=shaped(ratio))

    result = search_ratio(candidates, plan_at, target_macs=budget.fraction if macs else None,
                          target_params=None if macs else budget.fraction,
                          macs_input_size=budget.input_size if macs else None, tol=budget.tol if macs else 0.02,
                          at_most=macs and budget.at_most)
    if weights is not None:  # per-group ratios: the plan records each group's, the report their mean
        return Allocation(plan=plan_at(result.ratio), group_ratios=shaped(result.ratio) or {}, target=result)
    return Allocation(plan=plan_at(result.ratio), ratio=result.ratio, target=result)


MAX_WEIGHTED_RATIO = 0.9  # with group weights, never cut more of one group


def weighted_groups(graph: DetectorGraph, weights: Mapping[str, float]) -> dict[int, float]:
    """Prunable group index -> its weight over the lightest (so the lightest is cut by the searched
    ratio itself); groups ``weights`` does not name weigh 1. A name that is no prunable group's root
    is refused."""
    roots = {g.root: g.index for g in graph.groups if g.prunable}
    unknown = [k for k in weights if k not in roots]
    if unknown:
        raise PruningError(f"group weights name {unknown[0]!r}, not the root of a prunable group "
                           "(`surgery inspect` lists the roots)")
    raw = {i: float(weights.get(root, 1.0)) for root, i in roots.items()}
    lightest = min(raw.values(), default=1.0)
    return {i: w / lightest for i, w in raw.items()}


__all__ = ["MAX_WEIGHTED_RATIO", "CostModel", "TargetResult", "allocate_for_target", "find_ratio_for_target",
           "search_ratio", "weighted_groups"]
