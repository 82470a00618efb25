"""Cut: remove a channel plan's channels from every coupled layer (and the anchors a job drops).
Stage 3 of :func:`surgery.pruning.prune.prune_model` (``graph, plan -> kept``; see :mod:`surgery.pruning.allocate`
for the stages).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config.recipe import AnchorSection
from ..detectors.anchors import prune_anchors
from ..errors import PruningError
from .graph import DetectorGraph


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


def cut(
    graph: DetectorGraph, plan: dict[int, list[int]], anchors: AnchorSection | None = None
) -> tuple[dict[str, list[int]], dict[str, Any] | None]:
    """Apply ``plan`` to ``graph.model`` and prune the anchor shapes ``anchors`` names; returns the
    output channels each cut layer kept (:func:`apply_channel_plan`) and the anchor plan (``None``
    without one)."""
    kept = apply_channel_plan(graph, plan)
    if anchors is None:
        return kept, None
    return kept, prune_anchors(graph.model, anchors, graph.output_layers)
