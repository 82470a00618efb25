"""torchvision's detection interface around a single-stage YOLO network.

``model(images, targets)`` takes a list of ``[3, H, W]`` images in [0, 1] (any sizes); in train mode
with targets (``boxes`` xyxy in image pixels, ``labels`` starting at 1 as in torchvision, 0 being
the background) it returns a dict of losses; in eval mode a list of ``{"boxes", "scores",
"labels"}`` per image after NMS, boxes in the original image's pixels. The network sees one
``S x S`` letterboxed batch (``S = max_size`` rounded up to the stride): each image is scaled so its
longer side is ``max_size`` and padded bottom/right with grey, so mapping boxes back is one divide.

Subclasses implement ``losses(batch, targets)`` (targets in batch pixels, ``labels`` as class
indices from 0) and ``predict(batch) -> (boxes [B, A, 4] xyxy, scores [B, A, C] in [0, 1])``.
NMS-free (end-to-end) networks set ``nms = False``: their candidates are already one box per
object, so post-processing keeps the top scores without NMS.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..detectors.postprocess import batched_nms

PAD_VALUE = 114 / 255  # the usual YOLO letterbox grey


class LetterboxTransform(nn.Module):
    """Scale each image so its longer side is ``max_size``, pad to one ``S x S`` batch.

    ``min_size``/``max_size`` follow torchvision's ``GeneralizedRCNNTransform`` names (the trace and
    benches resize through them); only ``max_size`` matters here. ``fixed_size`` is ``None`` so the
    size can be changed."""

    fixed_size = None

    def __init__(self, max_size: int, stride: int = 32) -> None:
        super().__init__()
        self.min_size: tuple[int, ...] = (max_size,)
        self.max_size = int(max_size)
        self.stride = int(stride)

    def canvas(self) -> int:
        return int(math.ceil(self.max_size / self.stride) * self.stride)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[dict[str, Tensor]] | None, list[tuple[float, int, int]]]:
        s = self.canvas()
        # each image padded in the graph (F.pad), not copied into a grey canvas tensor: traced for ONNX,
        # a canvas made with new_full becomes a 1x3xSxS float constant (4.9 MB at 640 px) in the file
        padded: list[Tensor] = []
        metas: list[tuple[float, int, int]] = []
        for img in images:
            h, w = int(img.shape[-2]), int(img.shape[-1])
            scale = self.max_size / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            if (nh, nw) != (h, w):
                img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            padded.append(F.pad(img, (0, s - nw, 0, s - nh), value=PAD_VALUE))
            metas.append((scale, h, w))
        batch = torch.stack(padded)
        if targets is None:
            return batch, None, metas
        scaled = []
        for t, (scale, _, _) in zip(targets, metas):
            scaled.append({**t, "boxes": t["boxes"].to(batch.dtype) * scale, "labels": t["labels"].long() - 1})
        return batch, scaled, metas


class YoloInterface(nn.Module):
    """Base class: the letterbox, the loss/predict dispatch and the NMS post-processing."""

    nms = True  # False: an end-to-end (NMS-free) network, see the module docstring

    def __init__(
        self,
        size: int,
        *,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.7,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
    ) -> None:
        super().__init__()
        self.transform = LetterboxTransform(size)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.topk_candidates = int(topk_candidates)

    # implemented by subclasses
    def losses(self, batch: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("in training mode the model needs targets (boxes and labels per image)")
            batch, scaled, _ = self.transform(images, targets)
            assert scaled is not None
            return self.losses(batch, scaled)
        batch, _, metas = self.transform(images)
        boxes, scores = self.predict(batch)
        return [self._postprocess(b, s, m) for b, s, m in zip(boxes, scores, metas)]

    def _postprocess(self, boxes: Tensor, scores: Tensor, meta: tuple[float, int, int]) -> dict[str, Tensor]:
        """Top candidates over (anchor, class) pairs, score threshold, class-wise NMS (unless the
        network is NMS-free), back to the original image's pixels; labels start at 1 (torchvision's
        convention)."""
        scale, h, w = meta
        flat = scores.flatten()
        k = min(self.topk_candidates, flat.numel())
        top, idx = flat.topk(k)
        keep = top > self.score_thresh
        top, idx = top[keep], idx[keep]
        num_classes = scores.shape[1]
        anchor, label = idx // num_classes, idx % num_classes
        b = boxes[anchor]
        if self.nms:
            kept = batched_nms(b, top, label, self.nms_thresh, self.detections_per_img)  # one NMS, capped
        else:  # topk sorted the scores: the best ones come first
            kept = torch.arange(min(self.detections_per_img, int(top.numel())), device=top.device)
        b = b[kept] / scale
        b = torch.stack(
            [b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], dim=1
        )
        return {"boxes": b, "scores": top[kept], "labels": label[kept] + 1}


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


__all__ = ["LetterboxTransform", "YoloInterface", "xyxy_to_cxcywh"]
