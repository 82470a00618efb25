"""Structured pruning: rank each coupled group's channels and physically cut the weakest.

``prune_model`` = trace (``graph``) -> rank (``importance``) -> plan widths -> cut -> anchors.
The plan is JSON-able and goes into the checkpoint; :mod:`surgery.checkpoint` rebuilds the model
from the original builder, the plan's anchor part and the saved shapes.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import resolve_model, save_checkpoint
from .errors import PruningError
from .graph import ChannelGroup, DetectorGraph, trace
from .importance import get_importance
from .models import ModelSpec
from .recipe import PruneSection, Recipe


@dataclass
class GroupReport:
    index: int
    root: str
    layers: list[str]
    channels_before: int
    channels_after: int
    prunable: bool
    reason: str = ""

    @property
    def removed(self) -> int:
        return self.channels_before - self.channels_after


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
    plan: dict[str, Any]
    report: PruneReport
    graph: DetectorGraph | None = field(default=None, repr=False)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
        if not any(fnmatch.fnmatchcase(n, p) or n == p or n.startswith(p + ".") for n in names):
            close = difflib.get_close_matches(p, names, n=3)
            hint = f" Close names: {', '.join(close)}." if close else " Run `surgery inspect` for the layer names."
            raise PruningError(f"{what} pattern {p!r} matches no layer of this model.{hint}")


def _ratio_for(group: ChannelGroup, cfg: PruneSection) -> float:
    for pattern, r in cfg.overrides.items():
        if any(fnmatch.fnmatchcase(x, pattern) or x == pattern or x.startswith(pattern + ".") for x in group.producers):
            return float(r)
    return cfg.ratio


def keep_count(channels: int, ratio: float, *, round_to: int = 1, min_channels: int = 1, multiple_of: int = 1) -> int:
    """Channels kept in a group: ``ceil(channels * (1 - ratio))`` rounded up to ``round_to`` (and
    to GroupNorm's group count, at least two channels per group), at least ``min_channels``, never
    more than ``channels``."""
    step = math.lcm(max(1, round_to), max(1, multiple_of))
    keep = math.ceil(channels * (1.0 - ratio) - 1e-9)
    # GroupNorm needs more than one value per group: with one channel per group a 1x1 map (P7 of a
    # small image) fails, so keep at least two channels per group.
    floor = 2 * multiple_of if multiple_of > 1 else 1
    keep = max(keep, min_channels, floor)
    keep = math.ceil(keep / step) * step
    if keep >= channels or channels % max(1, multiple_of) != 0:
        return channels
    return keep


def plan_channels(graph: DetectorGraph, cfg: PruneSection) -> dict[int, list[int]]:
    """Which root channels to cut in each prunable group: ``{group index: sorted indices}``."""
    score_fn = get_importance(cfg.method)
    scores: dict[int, torch.Tensor] = {}
    ratios: dict[int, float] = {}
    for g in graph.groups:
        if not g.prunable:
            continue
        r = _ratio_for(g, cfg)
        if r <= 0.0:
            continue
        ratios[g.index] = r
        s = score_fn(g)
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
                                     multiple_of=g.norm_groups)
    for i, r in ratios.items():
        if i in keep:
            continue
        g = by_index[i]
        keep[i] = keep_count(g.channels, r, round_to=cfg.round_to, min_channels=cfg.min_channels,
                             multiple_of=g.norm_groups)

    plan: dict[int, list[int]] = {}
    for i, k in keep.items():
        n = by_index[i].channels
        if k >= n:
            continue
        order = torch.argsort(scores[i], stable=True)  # weakest first; ties by index
        plan[i] = sorted(int(x) for x in order[: n - k].tolist())
    return plan


def apply_channel_plan(graph: DetectorGraph, plan: dict[int, list[int]]) -> None:
    """Cut the planned channels out of every coupled layer."""
    dg = graph.dg
    model = graph.model
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    by_index = {g.index: g for g in graph.groups}
    with torch.no_grad():
        for i, idxs in plan.items():
            root = graph.module(by_index[i].root)
            pruner = dg.get_pruner_of_module(root)
            group = dg.get_pruning_group(root, pruner.prune_out_channels, idxs)
            if not dg.check_pruning_group(group):
                raise PruningError(f"cutting {len(idxs)} channels of {by_index[i].root} would leave a layer empty")
            group.prune()
    # Torch-Pruning recreates parameters with requires_grad=True: keep frozen layers frozen.
    for n, p in model.named_parameters():
        if n in requires_grad:
            p.requires_grad_(requires_grad[n])


def prune_model(
    model: nn.Module,
    cfg: PruneSection,
    *,
    trace_size: int = 256,
    macs_input_size: int | None = None,
) -> PruneResult:
    """Prune ``model`` in place with the structured criterion in ``cfg`` (l1, l2 or bn).

    ``macs_input_size``: also count MACs before/after (fvcore, see :mod:`surgery.measure`).
    """
    if cfg.method == "magnitude":
        raise PruningError("method 'magnitude' is masked weight pruning: use surgery.masked.prune_masked")
    get_importance(cfg.method)  # fail fast on an unknown method
    check_patterns(model, list(cfg.overrides), "override")
    check_patterns(model, cfg.skip, "skip")

    macs_before = _macs(model, macs_input_size)
    params_before = count_params(model)
    widths_before = layer_widths(model)

    t0 = time.perf_counter()
    graph = trace(model, trace_size=trace_size, skip=cfg.skip)
    t1 = time.perf_counter()
    channel_plan = plan_channels(graph, cfg)
    apply_channel_plan(graph, channel_plan)
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
        params_after=count_params(model),
        seconds_analysis=t1 - t0,
        seconds_cut=t2 - t1,
        anchors=anchors_plan,
        macs_before=macs_before,
        macs_after=_macs(model, macs_input_size),
    )
    plan = {
        "method": cfg.method,
        "ratio": cfg.ratio,
        "global_ranking": cfg.global_ranking,
        "round_to": cfg.round_to,
        "min_channels": cfg.min_channels,
        "overrides": dict(cfg.overrides),
        "skip": list(cfg.skip),
        "output_layers": list(graph.output_layers),
        "groups": [
            {**g.to_dict(), "pruned": channel_plan.get(g.index, [])} for g in graph.groups
        ],
        # Torch-Pruning's replayable record: [root layer, is_out_channel_pruning, indices]
        "history": [[n, bool(o), [int(i) for i in idx]] for n, o, idx in graph.dg.pruning_history()],
        "anchors": anchors_plan,
        "widths_before": widths_before,
        "widths_after": layer_widths(model),
        "params_before": params_before,
        "params_after": report.params_after,
    }
    return PruneResult(plan=plan, report=report, graph=graph)


@dataclass
class PruneOutcome:
    """What :func:`prune_checkpoint` wrote."""

    path: Path
    kind: str  # structured | masked
    spec: ModelSpec
    structured: PruneResult | None = None
    masked: Any = None  # surgery.masked.MaskedResult


def prune_checkpoint(
    source: str,
    recipe: Recipe,
    out: str | Path,
    *,
    trace_size: int = 256,
    macs_input_size: int | None = None,
) -> PruneOutcome:
    """Prune a model (registered name, ``module:function`` or checkpoint) as the recipe says and
    write the pruned checkpoint atomically. ``method: magnitude`` gives a masked model."""
    model, spec, prior = resolve_model(source, recipe.model.kwargs, recipe.model.weights)
    cfg = recipe.prune
    previous = prior.plan if prior is not None else None
    if cfg.method == "magnitude":
        from .masked import prune_masked

        prior_masks = prior.masks if prior is not None and prior.kind == "masked" else None
        masked = prune_masked(model, cfg.sparsity, cfg.scope)
        if prior_masks:
            _carry_masks(masked, prior_masks, cfg.sparsity, source)
        plan = {"method": "magnitude", "sparsity": cfg.sparsity, "scope": cfg.scope, "previous": previous,
                **{k: v for k, v in masked.to_dict().items() if k != "layer_sparsity"}}
        path = save_checkpoint(out, model, spec, kind="masked", plan=plan, masks=masked.masks,
                               recipe=recipe.to_dict(), metrics={"params": count_params(model)})
        return PruneOutcome(path=path, kind="masked", spec=spec, masked=masked)
    if prior is not None and prior.kind == "masked" and prior.masks:
        raise PruningError(
            f"{source} is a masked (unstructured) checkpoint: cutting channels would silently drop its masks. "
            "Prune the dense model it came from, or mask again with --method magnitude"
        )
    result = prune_model(model, cfg, trace_size=trace_size, macs_input_size=macs_input_size)
    result.plan["previous"] = previous
    metrics = {"params": result.report.params_after}
    if result.report.macs_after is not None:
        metrics["macs"] = result.report.macs_after
    path = save_checkpoint(out, model, spec, kind="structured", plan=result.plan, recipe=recipe.to_dict(),
                           metrics=metrics)
    return PruneOutcome(path=path, kind="structured", spec=spec, structured=result)


def _carry_masks(masked: Any, prior: dict[str, torch.Tensor], sparsity: float, source: str) -> None:
    """Masking a masked checkpoint again keeps every weight it had pruned (pruned weights are zero,
    so new magnitude masks contain the old ones); a lower target than it already has is refused."""
    from .masked import masks_sparsity

    before = masks_sparsity(prior)
    if sparsity + 1e-6 < before:
        raise PruningError(
            f"{source} is already {before:.0%} masked; sparsity {sparsity:g} would un-prune weights: use >= {before:.3g}"
        )
    for name, m in prior.items():
        if name in masked.masks:
            masked.masks[name] = masked.masks[name] & m.to(masked.masks[name].device, torch.bool)


def inspect_model(model: nn.Module, *, trace_size: int = 256, skip: Sequence[str] = ()) -> DetectorGraph:
    """Trace without cutting (what ``surgery inspect`` shows)."""
    check_patterns(model, skip, "skip")
    return trace(model, trace_size=trace_size, skip=skip)


def _macs(model: nn.Module, size: int | None) -> int | None:
    if size is None:
        return None
    from .measure import count_macs

    return int(count_macs(model, size).total)


__all__ = [
    "GroupReport",
    "PruneReport",
    "PruneResult",
    "apply_channel_plan",
    "check_patterns",
    "count_params",
    "inspect_model",
    "keep_count",
    "layer_widths",
    "plan_channels",
    "prune_checkpoint",
    "prune_model",
]
