"""YOLOv2 (Redmon & Farhadi 2017, "YOLO9000") as the weight-vs-filter pruning study ran it, in
torchvision's detection interface: ``yolov2_darknet19``.

- **Darknet-19** backbone (3x3/1x1 conv + BatchNorm + leaky ReLU 0.1, five 2x2 max-pools, stride 32).
- **Head**: two 3x3 convs on the stride-32 map; the **passthrough** (reorg) layer takes the
  stride-16 map, reduces it with a 1x1 conv (64 channels at full width), moves each 2x2 block into
  channels (``pixel_unshuffle``: 64 -> 256 channels at stride 32) and is **concatenated** with the
  head before a 3x3 conv and the 1x1 output conv.
- **5 anchors** (the VOC priors of ``yolo-voc.cfg``, in stride-32 cells), each predicting
  ``tx, ty, tw, th``, objectness and class logits.
- **Region loss** with the study's scales: coord 1, object 5, no-object 1, class 1. Each ground
  truth is assigned to the anchor with the best shape IoU in the cell holding its centre; the
  objectness target is the IoU of that prediction with the box ("rescore"); predictions whose
  best IoU with any ground truth is above 0.6 are not penalised as no-object. Class scores are
  softmax probabilities with a squared error, as in Darknet's region layer. Darknet's warm-up term
  pulling every box towards its prior during the first 12800 images is left out.

``num_classes`` counts the background like torchvision's builders (21 for VOC, 5 for the synthetic
set); ``width`` scales every layer's channels (1.0 is the paper's network); ``size`` is the
letterbox size (416 in the paper).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..detectors.specs import register_model
from .interface import YoloInterface

VOC_ANCHORS = ((1.3221, 1.73145), (3.19275, 4.00944), (5.05587, 8.09892), (9.47112, 4.84053), (11.2364, 10.0071))
STUDY_SCALES = {"coord": 1.0, "object": 5.0, "noobject": 1.0, "class": 1.0}
IGNORE_IOU = 0.6
STRIDE = 32


def _conv(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1, inplace=True)
    )


class Darknet19(nn.Module):
    """Darknet-19 without its classifier; returns the stride-16 and stride-32 maps."""

    # (channels, kernel) per conv, "M" a 2x2 max-pool; stage4 ends at stride 16 (the passthrough source)
    STAGE4 = [(32, 3), "M", (64, 3), "M", (128, 3), (64, 1), (128, 3), "M", (256, 3), (128, 1), (256, 3), "M",
              (512, 3), (256, 1), (512, 3), (256, 1), (512, 3)]  # fmt: skip
    STAGE5 = ["M", (1024, 3), (512, 1), (1024, 3), (512, 1), (1024, 3)]

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        self.width = width
        c = 3
        self.stage4, c = self._stage(self.STAGE4, c)
        self.stage5, c = self._stage(self.STAGE5, c)
        self.out_channels = (self.ch(512), c)

    def ch(self, n: int) -> int:
        return max(8, int(round(n * self.width)))

    def _stage(self, spec: list[Any], c: int) -> tuple[nn.Sequential, int]:
        layers: list[nn.Module] = []
        for item in spec:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                n, k = item
                layers.append(_conv(c, self.ch(n), k))
                c = self.ch(n)
        return nn.Sequential(*layers), c

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s16 = self.stage4(x)
        return s16, self.stage5(s16)


class YOLOv2(YoloInterface):
    """Darknet-19 + passthrough head + region loss, in torchvision's detection interface."""

    def __init__(
        self,
        num_classes: int = 21,
        *,
        width: float = 1.0,
        size: int = 416,
        anchors: tuple[tuple[float, float], ...] = VOC_ANCHORS,
        scales: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(size, **kwargs)
        if num_classes < 2:
            raise ValueError("num_classes counts the background: at least 2")
        self.num_classes = num_classes - 1  # object classes predicted (no background output)
        self.scales = {**STUDY_SCALES, **(scales or {})}
        self.backbone = Darknet19(width)
        c16, c32 = self.backbone.out_channels
        ch = self.backbone.ch
        self.head = nn.Sequential(_conv(c32, ch(1024), 3), _conv(ch(1024), ch(1024), 3))
        self.passthrough = _conv(c16, ch(64), 1)
        self.fuse = _conv(ch(64) * 4 + ch(1024), ch(1024), 3)
        self.num_anchors = len(anchors)
        self.output = nn.Conv2d(ch(1024), self.num_anchors * (5 + self.num_classes), 1)
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)

    # what `surgery bench` times as the network (surgery.measure.split): every conv, no decoding
    network_modules = ("backbone", "head", "passthrough", "fuse", "output")

    def raw(self, batch: Tensor) -> Tensor:
        """``[B, A, H, W, 5 + C]`` raw outputs (tx, ty, tw, th, objectness, class logits)."""
        s16, s32 = self.backbone(batch)
        reorg = F.pixel_unshuffle(self.passthrough(s16), 2)  # the passthrough layer
        out = self.output(self.fuse(torch.cat([reorg, self.head(s32)], dim=1)))
        b, _, h, w = out.shape
        return out.view(b, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2)

    def _decode(self, p: Tensor) -> Tensor:
        """Predicted boxes ``[B, A, H, W, 4]`` xyxy in batch pixels."""
        _, _, h, w, _ = p.shape
        gy, gx = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device), indexing="ij")
        cx = (p[..., 0].sigmoid() + gx) * STRIDE
        cy = (p[..., 1].sigmoid() + gy) * STRIDE
        aw = self.anchors[:, 0].view(1, -1, 1, 1) * STRIDE
        ah = self.anchors[:, 1].view(1, -1, 1, 1) * STRIDE
        bw = aw * p[..., 2].clamp(max=8.0).exp()
        bh = ah * p[..., 3].clamp(max=8.0).exp()
        return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)

    def predict(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        p = self.raw(batch)
        boxes = self._decode(p)
        scores = p[..., 4:5].sigmoid() * p[..., 5:].softmax(-1)
        b = p.shape[0]
        return boxes.reshape(b, -1, 4), scores.reshape(b, -1, self.num_classes)

    def losses(self, batch: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        p = self.raw(batch)
        boxes = self._decode(p)
        _, a, h, w, _ = p.shape
        obj = p[..., 4].sigmoid()
        probs = p[..., 5:].softmax(-1)
        coord = obj.new_zeros(())
        objectness = obj.new_zeros(())
        cls = obj.new_zeros(())
        noobj_mask = torch.ones_like(obj, dtype=torch.bool)
        anchor_wh = self.anchors * STRIDE
        for i, t in enumerate(targets):
            gt = t["boxes"].to(p.dtype)
            labels = t["labels"]
            if gt.numel() == 0:
                continue
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"target labels must be in 1..{self.num_classes} (num_classes={self.num_classes + 1})")
            ious = box_iou(boxes[i].reshape(-1, 4), gt).max(dim=1).values.view(a, h, w)
            noobj_mask[i] &= ious <= IGNORE_IOU
            gcx, gcy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
            gw, gh = (gt[:, 2] - gt[:, 0]).clamp(min=1.0), (gt[:, 3] - gt[:, 1]).clamp(min=1.0)
            gi = (gcx / STRIDE).long().clamp(0, w - 1)
            gj = (gcy / STRIDE).long().clamp(0, h - 1)
            inter = torch.min(gw[:, None], anchor_wh[None, :, 0]) * torch.min(gh[:, None], anchor_wh[None, :, 1])
            shape_iou = inter / (gw[:, None] * gh[:, None] + anchor_wh[:, 0] * anchor_wh[:, 1] - inter)
            best = shape_iou.argmax(dim=1)
            cell = p[i, best, gj, gi]  # [N, 5 + C] responsible predictions
            noobj_mask[i, best, gj, gi] = False
            tx, ty = gcx / STRIDE - gi, gcy / STRIDE - gj
            tw, th = torch.log(gw / anchor_wh[best, 0]), torch.log(gh / anchor_wh[best, 1])
            coord = coord + ((cell[:, 0].sigmoid() - tx) ** 2 + (cell[:, 1].sigmoid() - ty) ** 2
                             + (cell[:, 2] - tw) ** 2 + (cell[:, 3] - th) ** 2).sum()  # fmt: skip
            pred_box = boxes[i, best, gj, gi]
            rescore = box_iou(pred_box, gt).diagonal().detach()
            objectness = objectness + ((cell[:, 4].sigmoid() - rescore) ** 2).sum()
            onehot = F.one_hot(labels, self.num_classes).to(p.dtype)
            cls = cls + ((probs[i, best, gj, gi] - onehot) ** 2).sum()
        noobj = (obj[noobj_mask] ** 2).sum()
        n = float(p.shape[0])
        s = self.scales
        return {
            "loss_coord": s["coord"] * coord / n,
            "loss_object": s["object"] * objectness / n,
            "loss_noobject": s["noobject"] * noobj / n,
            "loss_class": s["class"] * cls / n,
        }


@register_model("yolov2_darknet19")
def yolov2_darknet19(
    num_classes: int = 21,
    width: float = 1.0,
    size: int = 416,
    score_thresh: float = 0.005,
    nms_thresh: float = 0.45,
    detections_per_img: int = 100,
    weights: str | None = None,
) -> YOLOv2:
    """YOLOv2 with Darknet-19 (see the module docstring); ``width`` < 1 for CPU-sized runs."""
    if weights is not None:
        raise ValueError("yolov2_darknet19 has no pretrained weights; pass a checkpoint path instead")
    if not 0.05 <= float(width) <= 2.0:
        raise ValueError(f"width must be in [0.05, 2], got {width}")
    return YOLOv2(num_classes, width=float(width), size=size, score_thresh=score_thresh, nms_thresh=nms_thresh,
                  detections_per_img=detections_per_img)  # fmt: skip
