"""Cut: remove a channel plan's channels from every coupled layer (and the anchors a recipe
drops); then the recover hook. Stage 3 and 4 of :func:`surgery.prune.prune_model` (see
:mod:`surgery.allocate` for the stages).

Recover is a hook point: a function registered in :data:`RECOVERERS` under a name repairs the cut
model without gradient steps (e.g. BatchNorm re-estimation); :func:`recover` runs the one a
section names in its ``recover`` field (no field or none named: nothing runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .anchors import prune_anchors
from .errors import PruningError
from .graph import DetectorGraph
from .recipe import PruneSection
from .registry import Registry

# name -> fn(model, graph, cfg, calib_data) -> a report (a dict) or None
Recoverer = Callable[[nn.Module, DetectorGraph, PruneSection, Iterable[Any] | None], Any]
RECOVERERS: Registry[Recoverer] = Registry("recovery", PruningError)


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


def cut(graph: DetectorGraph, plan: dict[int, list[int]], cfg: PruneSection) -> dict[str, Any] | None:
    """Apply ``plan`` to ``graph.model`` and prune the anchors ``cfg.anchors`` names; returns the
    anchor plan (``None`` without one)."""
    apply_channel_plan(graph, plan)
    if cfg.anchors is None:
        return None
    return prune_anchors(graph.model, cfg.anchors, graph.output_layers)


def recover(graph: DetectorGraph, cfg: PruneSection, calib_data: Iterable[Any] | None = None) -> Any:
    """Run the recoverer ``cfg.recover`` names on the cut model (a hook: none by default)."""
    name = getattr(cfg, "recover", None)
    if not name or not isinstance(name, str):
        return None
    return RECOVERERS.get(name)(graph.model, graph, cfg, calib_data)
