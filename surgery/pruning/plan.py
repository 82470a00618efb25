"""The pruning plan a checkpoint records: what was done to the dense architecture, typed.

A plan is a chain: each pruning (structured or masked) points to the plan of the checkpoint it
started from (``previous``), oldest last. :func:`surgery.storage.checkpoint.load` re-applies the structural
part of the chain (anchor shapes) and takes every cut width from the saved tensor shapes, so the
plan is a record (what was cut, why, with which settings) rather than a program to replay.

Checkpoints store ``plan.to_dict()`` (JSON-able); :func:`plan_from_dict` reads it back, including
the untyped dicts written by surgery 0.1 (their ``history`` entry, Torch-Pruning's
``pruning_history()``, was never replayed and is dropped).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from ..errors import CheckpointError


@dataclass
class StructuredPlan:
    """Channels physically cut from coupled groups."""

    kind: ClassVar[str] = "structured"

    method: str = "l1"
    ratio: float = 0.5
    global_ranking: bool = False
    round_to: int = 1
    min_channels: int = 1
    overrides: dict[str, float] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    output_layers: list[str] = field(default_factory=list)
    # one entry per coupled group: index, root, channels, producers, consumers, prunable, reason, pruned
    groups: list[dict[str, Any]] = field(default_factory=list)
    anchors: dict[str, Any] | None = None  # surgery.detectors.anchors plan (shapes removed with their outputs)
    widths_before: dict[str, int] = field(default_factory=dict)
    widths_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    # targets (fractions of the dense model kept) and what the cut reached
    target_macs: float | None = None
    target_params: float | None = None
    achieved_macs_ratio: float | None = None
    achieved_params_ratio: float | None = None
    calib_batches: int | None = None  # data-driven criteria: batches the ranking saw
    source: str | None = None  # the checkpoint (or builder) this was pruned from: default teacher
    round: int | None = None  # progressive pruning: 1-based round of this cut
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by newer versions, kept
    previous: Plan | None = None

    @property
    def pruned_channels(self) -> int:
        return sum(len(g.get("pruned") or []) for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass
class MaskedPlan:
    """Unstructured magnitude masks: shapes unchanged, ``sparsity`` of the maskable weights zero."""

    kind: ClassVar[str] = "masked"

    method: str = "magnitude"
    sparsity: float = 0.0
    scope: str = "layer"
    total_params: int | None = None
    nonzeros_before: int | None = None
    nonzeros_after: int | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    previous: Plan | None = None

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


Plan = Union[StructuredPlan, MaskedPlan]  # noqa: UP007 - a runtime alias, also on Python 3.10


def _to_dict(plan: Plan) -> dict[str, Any]:
    d = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name not in ("previous", "extra")}
    d = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in d.items()}
    return {"kind": plan.kind, **plan.extra, **d, "previous": plan.previous.to_dict() if plan.previous else None}


_DROPPED = {"history", "kind"}  # 0.1: Torch-Pruning's pruning_history(), never replayed


def plan_from_dict(d: Any, *, where: str = "checkpoint") -> Plan | None:
    """A typed plan from a checkpoint's ``plan`` entry (``None`` stays ``None``)."""
    if d is None:
        return None
    if isinstance(d, (StructuredPlan, MaskedPlan)):
        return d
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: 'plan' must be a mapping, got {type(d).__name__}")
    kind = d.get("kind") or ("masked" if d.get("method") == "magnitude" else "structured")
    cls: type[StructuredPlan] | type[MaskedPlan] = MaskedPlan if kind == "masked" else StructuredPlan
    names = {f.name for f in dataclasses.fields(cls)} - {"previous", "extra"}
    kwargs = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names and k not in _DROPPED and k != "previous"}
    try:
        plan = cls(**kwargs, extra=extra)
    except TypeError as e:  # pragma: no cover - every key is a known field here
        raise CheckpointError(f"{where}: bad plan ({e})") from e
    _check_types(plan, where)
    plan.previous = plan_from_dict(d.get("previous"), where=where)
    return plan


def _check_types(plan: Plan, where: str) -> None:
    for f in dataclasses.fields(plan):
        v = getattr(plan, f.name)
        bad = (
            (f.name in ("groups", "skip", "output_layers") and not isinstance(v, list))
            or (f.name in ("overrides", "widths_before", "widths_after") and not isinstance(v, dict))
            or (f.name == "anchors" and v is not None and not isinstance(v, dict))
        )
        if bad:
            raise CheckpointError(f"{where}: plan.{f.name} has the wrong type ({type(v).__name__})")


def plan_chain(plan: Plan | None) -> list[Plan]:
    """The plan and its predecessors, newest first."""
    out = []
    while plan is not None:
        out.append(plan)
        plan = plan.previous
    return out


__all__ = ["MaskedPlan", "Plan", "StructuredPlan", "plan_chain", "plan_from_dict"]
