"""What a checkpoint is and where it came from, read without building the model (no user code
runs): provenance (the chain of checkpoints and prunings it came from, builder and arguments,
the recipe saved with it), what was cut per layer and per stage, and the metrics recorded so far."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..deployment.export import read_metadata
from ..deployment.runtime import ort_session
from ..pruning.plan import MaskedPlan, plan_chain
from .checkpoint import Checkpoint, read_checkpoint


@dataclass
class LayerCut:
    layer: str
    before: int  # output channels of the dense model
    after: int

    @property
    def kept(self) -> float:
        return self.after / self.before if self.before else 1.0


@dataclass
class StageCut:
    stage: str  # e.g. backbone.body.layer3, backbone.fpn.layer_blocks, head.classification_head.conv
    layers: int
    before: int  # summed output channels
    after: int


@dataclass
class Step:
    """One link of the provenance chain, newest first."""

    what: str  # "retrained", "structured l1 ratio 0.5 (uniform)", "masked 80% (layer)"
    source: str | None  # the checkpoint (or builder) it started from


@dataclass
class CheckpointInfo:
    path: str
    kind: str
    builder: str
    kwargs: dict[str, Any]
    code: dict[str, Any] | None  # user builders: the file and its sha256
    created: str | None
    class_names: list[str] | None
    chain: list[Step]
    recipe: dict[str, Any] | None
    layers: list[LayerCut]
    stages: list[StageCut]
    metrics: dict[str, Any]  # scalars recorded (last evaluation, params, MACs, training losses)
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation during training

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_of(layer: str, depth: int = 3) -> str:
    """A layer's stage: its first ``depth`` name parts, stopping before a numeric index
    (``backbone.body.layer3.1.conv2`` -> ``backbone.body.layer3``)."""
    parts: list[str] = []
    for p in layer.split("."):
        if p.isdigit() or len(parts) == depth:
            break
        parts.append(p)
    return ".".join(parts) or layer


def _describe_plan(plan: Any) -> str:
    if isinstance(plan, MaskedPlan):
        return f"masked {plan.sparsity:.0%} of weights ({plan.scope})"
    how = "global" if plan.global_ranking else "per-group ratios" if plan.overrides else "uniform"  # sensitivity, compress
    target = ""
    if plan.target_macs is not None or plan.target_params is not None:
        what, t = ("MACs", plan.target_macs) if plan.target_macs is not None else ("params", plan.target_params)
        target = f", target {t:.0%} of the {what} kept"
    return f"structured {plan.method} ratio {plan.ratio:.4g} ({how}{target})"


def _chain(ckpt: Checkpoint) -> list[Step]:
    steps: list[Step] = []
    inp = ckpt.metrics.get("input")
    if isinstance(inp, dict) and inp.get("checkpoint"):
        steps.append(Step("retrained", str(inp["checkpoint"])))
    elif ckpt.train_state and ckpt.plan is None:
        steps.append(Step("trained from scratch", ckpt.spec.name))
    for p in plan_chain(ckpt.plan):
        steps.append(Step(_describe_plan(p), p.source))
    return steps


def _cuts(ckpt: Checkpoint) -> tuple[list[LayerCut], list[StageCut]]:
    before: dict[str, int] = {}
    for p in reversed(plan_chain(ckpt.plan)):  # oldest first: the dense widths win
        for k, v in getattr(p, "widths_before", {}).items():
            before.setdefault(k, int(v))
    after: dict[str, int] = {}
    for p in plan_chain(ckpt.plan):  # newest first: the latest widths win
        for k, v in getattr(p, "widths_after", {}).items():
            after.setdefault(k, int(v))
    layers = [LayerCut(k, before[k], after.get(k, before[k])) for k in before]
    stages: dict[str, StageCut] = {}
    for c in layers:
        s = stages.setdefault(stage_of(c.layer), StageCut(stage_of(c.layer), 0, 0, 0))
        s.layers += 1
        s.before += c.before
        s.after += c.after
    return layers, list(stages.values())


MAX_METRICS_DEPTH = 8  # surgery records two levels; a crafted 5000-deep dict is not recursed into


def _scalars(metrics: dict[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict) and depth >= MAX_METRICS_DEPTH:
            out[f"{prefix}{k}"] = f"<{len(v)} more nested keys, not shown>"
        elif isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}.", depth + 1))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def describe_checkpoint(path: str | Path) -> CheckpointInfo:
    """Everything :class:`CheckpointInfo` holds, from the file alone (nothing is built or run)."""
    ckpt = read_checkpoint(path)
    layers, stages = _cuts(ckpt)
    history = list((ckpt.train_state or {}).get("history") or [])
    return CheckpointInfo(
        path=str(path), kind=ckpt.kind, builder=ckpt.spec.name, kwargs=dict(ckpt.spec.kwargs), code=ckpt.spec.code,
        created=ckpt.meta.get("created"), class_names=ckpt.class_names, chain=_chain(ckpt), recipe=ckpt.recipe,
        layers=layers, stages=stages, metrics=_scalars(ckpt.metrics), history=history,
    )  # fmt: skip


@dataclass
class OnnxFileInfo:
    """What an ONNX file written by ``surgery export`` / ``quantize`` says about itself."""

    path: str
    model: str  # the builder it was exported from ("-" for a file surgery did not write)
    kind: str
    precision: str  # float32 | int8 | unknown
    input_shape: list[Any]  # [3, S, S], or names for dynamic axes
    outputs: list[str]
    class_names: list[str] | None
    params: int | None
    macs: int | None
    metadata: dict[str, str]  # every surgery.* entry, prefix removed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_onnx(path: str | Path) -> OnnxFileInfo:
    """An ONNX file's ``surgery.*`` metadata and signature (ONNX Runtime opens it; nothing runs)."""
    import json


    sess = ort_session(path)
    meta = read_metadata(sess)
    names = json.loads(meta["class_names"]) if meta.get("class_names") else None

    def number(key: str) -> int | None:
        try:
            return int(float(meta[key]))
        except (KeyError, ValueError):
            return None

    return OnnxFileInfo(
        path=str(path), model=meta.get("model", "-"), kind=meta.get("kind", "-"),
        precision=meta.get("precision", "unknown"), input_shape=list(sess.get_inputs()[0].shape),
        outputs=[o.name for o in sess.get_outputs()], class_names=names, params=number("params"),
        macs=number("macs"), metadata=meta,
    )  # fmt: skip


__all__ = ["CheckpointInfo", "LayerCut", "OnnxFileInfo", "StageCut", "Step", "describe_checkpoint", "describe_onnx", "stage_of"]
