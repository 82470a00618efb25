"""Allocate: how many channels each coupled group keeps, and which, given the groups' importance.

Pruning runs in stages (:func:`surgery.prune.prune_model` composes them):

1. **rank** - each group's channel importance (:mod:`surgery.importance`, :mod:`surgery.calibrate`);
2. **allocate** - this module: a channel plan ``{group index: sorted channel indices to cut}``;
3. **cut** - :mod:`surgery.cut` removes the planned channels (and anchors) from every coupled layer;
4. **recover** - repair the cut model without gradient steps (:func:`surgery.cut.recover`, a hook).

Allocators
----------
An allocator is one function registered under a name::

    @register_allocator("mine")
    def allocate_mine(ctx: AllocationContext) -> Allocation:
        ...

It receives an :class:`AllocationContext` (the traced model ``ctx.graph``, the ranked
``ctx.scores``, the recipe's ``ctx.cfg``, the MACs input size and the dense MACs when known, the
calibration batches) and returns an :class:`Allocation`: the channel plan, the ``PruneSection`` it
was made with (e.g. with the ratio a search found: it is what the checkpoint's plan records) and
an optional ``target`` report. It must not change the model; measuring a candidate on a copy is
fine (the ``target`` allocator does). Most allocators decide a ratio per group and call
:func:`plan_channels` with ``cfg.overrides`` (a per-layer ratio) or :func:`keep_count` and pick the
weakest channels themselves. Registered here: ``uniform`` (every group cut by ``cfg.ratio``),
``global`` (one threshold over mean-normalised scores); :mod:`surgery.target` registers ``target``
(the ratio that keeps a MACs/params fraction). :func:`allocation_name` picks one from the recipe:
``target`` when ``target_macs``/``target_params`` is set, else ``cfg.allocation`` when the section
has that field, else ``global`` or ``uniform`` from ``global_ranking``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .errors import PruningError
from .graph import ChannelGroup, DetectorGraph, match_layer
from .importance import get_importance
from .recipe import PruneSection
from .registry import Registry, close_matches

ChannelPlan = dict[int, list[int]]  # group index -> sorted root channel indices to cut


@dataclass
class AllocationContext:
    """What an allocator may use: the model (not to be changed), its trace and group scores."""

    model: nn.Module
    graph: DetectorGraph
    scores: dict[int, torch.Tensor]
    cfg: PruneSection
    macs_input_size: int | None = None  # MACs are counted on one square image of this side
    macs_before: int | None = None  # the dense model's MACs at that size, when counted
    calib_data: Iterable[Any] | None = None


@dataclass
class Allocation:
    """A channel plan and the section it was made with (recorded in the checkpoint's plan)."""

    plan: ChannelPlan
    cfg: PruneSection
    target: Any = None  # surgery.target.TargetResult for a MACs/params target
    info: dict[str, Any] = field(default_factory=dict)  # anything else an allocator reports


Allocator = Callable[[AllocationContext], Allocation]
ALLOCATORS: Registry[Allocator] = Registry("allocation", PruningError)


def register_allocator(name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``@register_allocator("name")`` makes ``fn(ctx) -> Allocation`` an allocator."""
    return ALLOCATORS.register(name)


def list_allocators() -> list[str]:
    return ALLOCATORS.names()


def allocation_name(cfg: PruneSection) -> str:
    """The allocator a prune section asks for (see the module docstring)."""
    if cfg.target_macs is not None or cfg.target_params is not None:
        return "target"
    if getattr(cfg, "target_latency", None) is not None:
        return "latency"
    chosen = getattr(cfg, "allocation", None)
    if chosen and chosen != "uniform":  # "uniform" is the default: global_ranking still says "global"
        return str(chosen)
    return "global" if cfg.global_ranking else "uniform"


def allocate(ctx: AllocationContext, name: str | None = None) -> Allocation:
    """Run allocator ``name`` (default: :func:`allocation_name` of ``ctx.cfg``)."""
    return ALLOCATORS.get(name or allocation_name(ctx.cfg))(ctx)


@register_allocator("uniform")
def allocate_uniform(ctx: AllocationContext) -> Allocation:
    """Every prunable group cut by ``cfg.ratio`` (``cfg.overrides``: per-layer ratios)."""
    cfg = replace(ctx.cfg, global_ranking=False)
    return Allocation(plan=plan_channels(ctx.graph, cfg, scores=ctx.scores), cfg=ctx.cfg)


@register_allocator("global")
def allocate_global(ctx: AllocationContext) -> Allocation:
    """``cfg.ratio`` of all channels, cut below one threshold over mean-normalised group scores."""
    cfg = replace(ctx.cfg, global_ranking=True)
    return Allocation(plan=plan_channels(ctx.graph, cfg, scores=ctx.scores), cfg=ctx.cfg)


def check_patterns(model: nn.Module, patterns: Sequence[str], what: str) -> None:
    """Every layer pattern must match at least one module, else one clear error."""
    names = [n for n, _ in model.named_modules() if n]
    for p in patterns:
        if not any(match_layer(n, [p]) for n in names):
            close = close_matches(p, names, n=3)
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
