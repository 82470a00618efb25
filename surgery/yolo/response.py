"""The YOLO head's response, as distillation and label-free recovery read it: which model is an
Ultralytics detector, its Detect head, the head's raw outputs, and the response distillation terms
(class-score KL against the teacher's sigmoid scores, box-distribution KL weighted by the teacher's
confidence). Torch only: the recovery pipeline imports it without the trainer, the data or Ultralytics."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TrainingError
from ..pruning.masked import unwrap
from .interface import LetterboxTransform

CLS_GAIN, DFL_GAIN = 0.5, 1.5  # Ultralytics' default loss gains (cls, dfl)


def is_ultralytics(model: nn.Module) -> bool:
    head = detect_head(model)
    return isinstance(getattr(model, "transform", None), LetterboxTransform) and head is not None


def detect_head(model: nn.Module) -> nn.Module | None:
    """The Detect head (the last layer, with ``reg_max``, ``nc`` and ``stride``), else ``None``."""
    net = getattr(unwrap(model), "net", None)
    layers = getattr(net, "model", None)
    if layers is None:
        return None
    head = layers[-1]
    return head if all(hasattr(head, a) for a in ("reg_max", "nc", "stride")) else None


def end_to_end_branch(out: Any) -> str | None:
    """Which branch of an end-to-end head (YOLOv10, YOLO26) ``out`` carries outputs of: ``one2many``
    when it ran, else ``one2one`` (an eval forward runs the one-to-one branch alone); ``None`` for
    a head with one branch."""
    raw = out[1] if isinstance(out, tuple) and len(out) == 2 else out
    if not (isinstance(raw, dict) and "one2one" in raw):
        return None
    return "one2many" if raw.get("one2many") else "one2one"


def head_outputs(out: Any, head: nn.Module, branch: str | None = None) -> tuple[Tensor, Tensor]:
    """``(boxes [B, 4*reg_max, A], scores [B, nc, A])`` (logits) from what Detect returned, in
    train mode (a dict, or a per-level list in older Ultralytics) or eval mode (``(y, raw)``).
    ``branch``: of an end-to-end head, the one to read (default :func:`end_to_end_branch`)."""
    if isinstance(out, tuple) and len(out) == 2:
        out = out[1]
    if isinstance(out, dict) and "one2one" in out:
        out = out[branch or end_to_end_branch(out)]
    if isinstance(out, dict):
        return out["boxes"], out["scores"]
    if isinstance(out, (list, tuple)) and all(torch.is_tensor(x) and x.ndim == 4 for x in out):
        b = out[0].shape[0]
        cat = torch.cat([x.view(b, x.shape[1], -1) for x in out], dim=-1)
        return cat[:, : 4 * head.reg_max], cat[:, 4 * head.reg_max :]
    raise TrainingError(f"YOLO distillation: cannot read the Detect head's outputs ({type(out).__name__})")


def response_losses(s_boxes: Tensor, s_scores: Tensor, t_boxes: Tensor, t_scores: Tensor, reg_max: int,
                    temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(cls, dfl)`` response distillation terms (see the module docstring); 0 when equal."""
    temp = float(temperature)
    p = torch.sigmoid(t_scores / temp)
    bce = F.binary_cross_entropy_with_logits(s_scores / temp, p, reduction="none")
    floor = F.binary_cross_entropy_with_logits(t_scores / temp, p, reduction="none")
    cls = (bce - floor).sum() / p.sum().clamp_min(1.0) * temp**2
    b, _, a = s_boxes.shape
    ls = F.log_softmax(s_boxes.view(b, 4, reg_max, a) / temp, dim=2)
    lt = F.log_softmax(t_boxes.view(b, 4, reg_max, a) / temp, dim=2)
    kl = (lt.exp() * (lt - ls)).sum(2).mean(1)  # (B, A): mean over the 4 sides
    weight = p.max(dim=1).values  # (B, A): the teacher's confidence there
    dfl = (kl * weight).sum() / weight.sum().clamp_min(1.0) * temp**2
    return cls, dfl
