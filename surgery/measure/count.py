"""Parameters and MACs (fvcore)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import MeasureError
from .workload import (
    MACS_ROIS,
    configured_rois,
    example_images,
    fixed_workload,
    is_two_stage,
    model_device,
    quiet,
)


class ParamCount(NamedTuple):
    total: int  # every parameter element
    nonzero: int  # those not exactly 0 (a masked model keeps its shape: only this drops)


def count_params(model: nn.Module) -> ParamCount:
    """``(total, nonzero)`` parameter elements; a parameter shared by two modules counts once."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()).item())
    return ParamCount(total, nonzero)


@dataclass
class MacsResult:
    """MACs of one forward on one ``3 x input_size x input_size`` image (eval mode)."""

    total: int
    by_module: dict[str, int]  # top-level children: backbone, rpn, roi_heads, head, transform...
    uncounted: dict[str, int]  # ops fvcore has no rule for -> number of calls (their cost is not in total)
    input_size: int
    rois: int | None = None  # RoIs the box head actually saw (two-stage), else None
    detections: int | None = None  # detections per image the fixed workload asked for
    roi_align_macs: int = 0  # included in total: RoIAlign bilinear interpolation cost
    backbone_input: tuple[int, int] | None = None  # (H, W) after the model's transform resized the image
    notes: list[str] = field(default_factory=list)


def _roi_align_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``torchvision::roi_align``: output elements x sampling points per bin x 4.

    Each sampling point is a bilinear interpolation (4 weighted reads = 4 MACs) and the
    ``sampling_ratio**2`` points of a bin are averaged. An adaptive ``sampling_ratio <= 0`` depends
    on each RoI's size; it is counted as 2 (torchvision's detectors all use 2)."""
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(outputs[0]) or []
    try:
        sr = int(inputs[5].toIValue())
    except Exception:  # noqa: BLE001 - not a constant in the trace
        sr = 2
    sr = sr if sr > 0 else 2
    return int(math.prod(shape)) * sr * sr * 4


def _watch_shapes(model: nn.Module, seen: dict[str, int]) -> list[Any]:
    """Hooks recording the RoIs the box head saw (``seen["rois"]``) and the backbone's input size
    (``seen["h"]``, ``seen["w"]``); returns their handles."""
    hooks = []
    heads = getattr(model, "roi_heads", None)
    if is_two_stage(model) and isinstance(getattr(heads, "box_roi_pool", None), nn.Module):
        hooks.append(
            heads.box_roi_pool.register_forward_hook(lambda m, i, o: seen.__setitem__("rois", int(o.shape[0])))
        )
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):  # a single-stage YOLO: its network (letterboxed input) instead
        backbone = next((getattr(model, n) for n in getattr(model, "network_modules", ()) if isinstance(getattr(model, n, None), nn.Module)), None)
    if isinstance(backbone, nn.Module):

        def grab(m: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen["h"], seen["w"] = int(args[0].shape[-2]), int(args[0].shape[-1])

        hooks.append(backbone.register_forward_pre_hook(grab))
    return hooks


def _notes(
    model: nn.Module, input_size: int, rois: int | None, seen: dict[str, int], bb: tuple[int, int] | None, roi_align: bool
) -> list[str]:
    notes = ["element-wise ops (add, mul, sigmoid, nms, topk...) are not counted; see uncounted"]
    if roi_align:
        notes.append("roi_align counted as output elements x sampling points x 4 (bilinear)")
    if is_two_stage(model) and seen.get("rois") is not None and rois is not None and seen["rois"] != rois:
        notes.append(f"asked for {rois} RoIs, the box head saw {seen['rois']} (too few anchors)")
    if bb is not None and bb != (input_size, input_size):
        notes.append(
            f"the model's transform resizes the {input_size}x{input_size} image to {bb[0]}x{bb[1]} "
            "(its min_size/max_size); the backbone runs at that size"
        )
    return notes


def count_macs(
    model: nn.Module,
    input_size: int,
    *,
    rois: int | None = MACS_ROIS,
    detections: int | None = 100,
    count_roi_align: bool = True,
) -> MacsResult:
    """Count multiply-accumulates with fvcore (one fused multiply-add = one fvcore "flop" = 1 MAC).

    The model runs in eval mode on one random ``3 x input_size x input_size`` image inside
    :func:`fixed_workload` (``rois`` proposals into the box head of a two-stage model, ``detections``
    kept per image); ``rois=None`` uses the model's own test-time post-NMS top-n, i.e. the most RoIs
    it ever processes. Thresholds and train/eval mode are restored afterwards.

    ``torchvision::roi_align`` is counted as its interpolation cost (:func:`_roi_align_macs`,
    reported separately in ``roi_align_macs``) unless ``count_roi_align=False``, in which case it
    shows up in ``uncounted``. Torch-Pruning's counter is not used: it counts ``ConvTranspose2d`` at
    output resolution (4x too high on Mask R-CNN's mask head); fvcore counts it correctly.
    """
    with quiet():
        from fvcore.nn import FlopCountAnalysis

    if rois is None:
        rois = configured_rois(model)
    seen: dict[str, int] = {}
    hooks = _watch_shapes(model, seen)
    was_training = model.training
    model.eval()
    image = example_images(1, input_size, model_device(model))
    ra_total = 0

    def roi_align_handle(inputs: list[Any], outputs: list[Any]) -> int:
        nonlocal ra_total
        n = _roi_align_macs(inputs, outputs)
        ra_total += n
        return n

    try:
        with quiet(), fixed_workload(model, rois, detections), torch.no_grad():
            fa = FlopCountAnalysis(model, (image,))
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            fa.tracer_warnings("none")
            if count_roi_align:
                fa.set_op_handle("torchvision::roi_align", roi_align_handle)
            total = int(fa.total())
            by_mod = fa.by_module()
            uncounted = dict(fa.unsupported_ops())
    except Exception as e:
        raise MeasureError(f"cannot count MACs of {type(model).__name__} at {input_size}px: {e}") from e
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    by_module = {name: int(by_mod.get(name, 0)) for name, _ in model.named_children()}
    bb = (seen["h"], seen["w"]) if "h" in seen else None
    notes = _notes(model, input_size, rois, seen, bb, count_roi_align and ra_total > 0)
    return MacsResult(
        total=total,
        by_module=by_module,
        uncounted=uncounted,
        input_size=input_size,
        rois=seen.get("rois"),
        detections=detections,
        roi_align_macs=ra_total,
        backbone_input=bb,
        notes=notes,
    )
