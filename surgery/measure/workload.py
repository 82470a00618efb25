"""A fixed workload for counting and timing: post-processing made deterministic in size, and the
random example images every measurement runs on."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import compat

# The one RoI count two-stage MACs are counted at when none is given: prune's report, the target
# search, inspect and bench (its --rois / bench.rois overrides it) all count at this fixed workload.
MACS_ROIS = 100


def is_two_stage(model: nn.Module) -> bool:
    """An R-CNN-style detector (``rpn`` + ``roi_heads``)."""
    return hasattr(model, "rpn") and hasattr(model, "roi_heads")


def configured_rois(model: nn.Module) -> int | None:
    """The RPN's test-time post-NMS top-n (the most RoIs the box head ever sees), or ``None``."""
    rpn = getattr(model, "rpn", None)
    return compat.rpn_top_n(rpn, "post", "testing") if rpn is not None else None


def configured_detections(model: nn.Module) -> int | None:
    """Detections kept per image (``detections_per_img`` of the model or its ``roi_heads``)."""
    holder = getattr(model, "roi_heads", model)
    d = getattr(holder, "detections_per_img", None)
    return int(d) if d is not None else None


@contextlib.contextmanager
def fixed_workload(model: nn.Module, rois: int | None = 100, detections: int | None = 100) -> Iterator[None]:
    """Temporarily make the number of RoIs / detections independent of the weights, then restore.

    Two-stage (``rpn`` + ``roi_heads``): the RPN keeps ``rois`` proposals (pre- and post-NMS top-n
    for training and testing set to ``rois``, ``nms_thresh=1.0`` so NMS removes nothing,
    ``score_thresh=0``, ``min_size=0``), so the box head sees exactly ``rois`` RoIs (fewer only if
    the image has fewer anchors); ``roi_heads`` keeps ``detections`` (``score_thresh=0``,
    ``nms_thresh=1.0``, ``detections_per_img``), so mask/keypoint heads see a fixed count.
    One-stage (FCOS, RetinaNet, SSD): ``score_thresh=0``, ``nms_thresh=1.0``,
    ``detections_per_img=detections``. ``None`` keeps the model's own value.

    Without this an untrained or pruned model emits a different number of boxes than the dense
    one, and the heads' cost (and latency) would change for reasons unrelated to the pruning.
    """
    undo: list[Callable[[], Any]] = []

    def put(obj: Any, attr: str, value: Any) -> None:
        if obj is None or not hasattr(obj, attr):
            return
        old = getattr(obj, attr)
        undo.append(lambda: setattr(obj, attr, old))
        setattr(obj, attr, value)

    def put_top_n(rpn: nn.Module, value: int) -> None:
        for stage in ("pre", "post"):
            for mode in ("training", "testing"):
                old = compat.set_rpn_top_n(rpn, stage, mode, value)
                if old is not None:
                    undo.append(lambda s=stage, m=mode, v=old: compat.set_rpn_top_n(rpn, s, m, v))

    try:
        if is_two_stage(model):
            rpn, heads = model.rpn, model.roi_heads
            if rois is not None:
                put_top_n(rpn, rois)
                put(rpn, "nms_thresh", 1.0)
                put(rpn, "score_thresh", 0.0)
                put(rpn, "min_size", 0.0)
            if detections is not None:
                put(heads, "score_thresh", 0.0)
                put(heads, "nms_thresh", 1.0)
                put(heads, "detections_per_img", detections)
        elif detections is not None:
            put(model, "score_thresh", 0.0)
            put(model, "nms_thresh", 1.0)
            put(model, "detections_per_img", detections)
        yield
    finally:
        for step in reversed(undo):
            step()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence fvcore's logging and the tracer/torchvision warnings it triggers."""
    loggers = [logging.getLogger(n) for n in ("fvcore", "fvcore.nn.jit_analysis", "iopath")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def example_images(n: int, size: int, device: torch.device | str, seed: int = 0) -> list[torch.Tensor]:
    """``n`` seeded random ``3 x size x size`` images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g).to(device) for _ in range(n)]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
