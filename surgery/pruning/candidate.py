"""Candidates: a channel plan tried on a copy of the model, the one routine every budget search
shares (the MACs/params target, the latency budget, the sensitivity allocation and analysis).

:class:`Candidates` holds the traced dense model; :meth:`Candidates.cut` deep-copies it, traces
the copy again (a plan's group indices refer to the dense trace, so the copy must trace into the
same groups), cuts the plan (and the anchors a job drops) and returns the copy with the channels
each cut layer kept; :meth:`Candidates.count` counts its parameters and MACs. A search times a
cut copy itself (:func:`surgery.pruning.latency.network_ms`). The dense model is never changed, and the
scores are the dense trace's: a candidate is never ranked again.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..config.recipe import AnchorSection
from ..detectors.anchors import prune_anchors
from ..errors import PruningError
from ..measure import count_macs, count_params
from ..measure.workload import MACS_ROIS
from .cut import apply_channel_plan
from .graph import DetectorGraph, trace

ChannelPlan = dict[int, list[int]]


@dataclass
class Counts:
    """Parameters and MACs (``None`` when not counted) of a cut copy."""

    params: int
    macs: int | None


@dataclass
class Candidates:
    """Cut copies of ``graph.model`` (traced with ``skip``; ``anchors``: also pruned on each copy)."""

    graph: DetectorGraph
    skip: Sequence[str] = ()
    anchors: AnchorSection | None = None
    known_macs: dict[int, int] = field(default_factory=dict)  # size -> the dense MACs, when already counted

    def dense_macs(self, size: int) -> int:
        """The dense model's MACs at ``size`` (counted once per size)."""
        if size not in self.known_macs:
            self.known_macs[size] = macs_of(self.graph.model, size)
        return self.known_macs[size]

    def cut(self, plan: ChannelPlan) -> tuple[nn.Module, dict[str, list[int]]]:
        """A deep copy of the model with ``plan`` cut, and the output channels each cut layer kept."""
        clone = copy.deepcopy(self.graph.model)
        twin = trace(clone, trace_size=self.graph.trace_size, skip=self.skip)
        if [g.root for g in twin.groups] != [g.root for g in self.graph.groups]:
            raise PruningError("internal: the copy of the model traced into different groups")
        kept = apply_channel_plan(twin, plan)
        if self.anchors is not None:
            prune_anchors(clone, self.anchors, twin.output_layers)
        return clone, kept

    def count(self, plan: ChannelPlan, macs_size: int | None = None) -> Counts:
        """Parameters and (at ``macs_size``) MACs of the model cut with ``plan``."""
        clone, _ = self.cut(plan)
        return Counts(count_params(clone).total, macs_of(clone, macs_size) if macs_size is not None else None)


def macs_of(model: nn.Module, size: int) -> int:
    """MACs of one ``size`` x ``size`` image under the fixed detection workload (what every
    budget and report counts: :func:`surgery.measure.count_macs`, :data:`MACS_ROIS` RoIs)."""
    return int(count_macs(model, size, rois=MACS_ROIS).total)


__all__ = ["Candidates", "Counts", "macs_of"]
