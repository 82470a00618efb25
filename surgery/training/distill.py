"""Distillation while retraining a pruned detector: fine-grained feature imitation.

Wang et al., "Distilling Object Detectors with Fine-grained Feature Imitation" (CVPR 2019): the
student (the pruned model) imitates the teacher's (the dense model's) neck features, but only at
the locations near objects, through a per-level adaptation layer from the student's width to the
teacher's. :class:`FeatureImitation` is a trainer hook (:mod:`surgery.training.hooks`) that adds the loss
term ``imitation`` (and optionally ``response``: the teacher's classification outputs) and brings
the adaptation layers as modules to optimize; they are never part of the saved model.

Every family with torchvision's interface works the same way, with no per-model code: the hook
captures what the student's ``transform`` and ``backbone`` (backbone + FPN, or SSD's feature
extractor) return during its own forward, runs the teacher's ``backbone`` on the very same
normalised batch, and builds the imitation mask from the model's anchor generator
(``model.anchor_generator`` or ``model.rpn.anchor_generator``):

- anchor-based heads (RPN, RetinaNet, SSD): for every ground-truth box the IoU with every anchor;
  locations where an anchor's IoU exceeds ``psi`` x that box's best anchor IoU (the paper's rule);
- anchor-free heads (FCOS: one "anchor" per location whose size is the level's stride): the
  locations inside a box and within ``center_radius`` x stride of its centre (FCOS's own centre
  sampling);
- without an anchor generator: the locations inside the boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from ..errors import TrainingError
from ..pruning.masked import unwrap
from ..pruning.plan import plan_chain
from ..storage.checkpoint import looks_like_path
from ..yolo.distill import YoloDistillation, is_ultralytics
from .hooks import HookBase, TeacherHook

if TYPE_CHECKING:
    from ..config.recipe import DistillSection
    from .train import Trainer


def _as_dict(features: Any) -> dict[str, torch.Tensor]:
    if isinstance(features, torch.Tensor):
        return {"0": features}
    if isinstance(features, (list, tuple)):  # backbones returning their levels in order (YOLOv2)
        return {str(i): f for i, f in enumerate(features)}
    return dict(features)


def anchor_generator_of(model: nn.Module) -> nn.Module | None:
    """The anchor generator a detector's dense head reads (RPN's for two-stage models)."""
    gen = getattr(model, "anchor_generator", None)
    if gen is None and hasattr(model, "rpn"):
        gen = getattr(model.rpn, "anchor_generator", None)
    return gen


def is_anchor_free(model: nn.Module) -> bool:
    """FCOS-style heads: one point per location, positives by centre sampling."""
    return hasattr(model, "center_sampling_radius")


def imitation_masks(
    model: nn.Module,
    image_list: Any,
    features: Sequence[torch.Tensor],
    targets: Sequence[dict[str, torch.Tensor]],
    *,
    psi: float = 0.5,
    center_radius: float = 1.5,
) -> list[torch.Tensor]:
    """One bool mask ``(batch, H, W)`` per feature level: the locations near ground truth.

    ``image_list`` and ``targets`` are what the model's ``transform`` returned (boxes in the
    resized image's pixels); ``features`` are the levels the head reads, in order.
    """
    shapes = [f.shape[-2:] for f in features]
    batch = features[0].shape[0]
    device = features[0].device
    gen = anchor_generator_of(model)
    per_loc = _anchors_per_location(gen, len(features)) if gen is not None else None
    if gen is None or per_loc is None:
        return _inside_boxes(image_list, shapes, targets, device)
    with torch.no_grad():
        anchors = gen(image_list, list(features))
    counts = [int(h) * int(w) * a for (h, w), a in zip(shapes, per_loc, strict=True)]
    if any(int(a.shape[0]) != sum(counts) for a in anchors):
        return _inside_boxes(image_list, shapes, targets, device)
    masks = [torch.zeros(batch, int(h), int(w), dtype=torch.bool, device=device) for h, w in shapes]
    anchor_free = is_anchor_free(model)
    for b in range(batch):
        gt = targets[b]["boxes"].to(device)
        if gt.numel() == 0:
            continue
        a = anchors[b].to(device)
        if anchor_free:
            pos = _centre_sampled(a, gt, center_radius)
        else:
            iou = box_iou(a, gt)  # (anchors, boxes)
            best = iou.max(dim=0).values.clamp_min(1e-6)
            pos = (iou > psi * best[None, :]).any(dim=1)
        for lvl, chunk in enumerate(pos.split(counts)):
            h, w = shapes[lvl]
            masks[lvl][b] = chunk.view(int(h), int(w), per_loc[lvl]).any(dim=-1)
    return masks


def _anchors_per_location(gen: nn.Module, levels: int) -> list[int] | None:
    try:
        per_loc = [int(n) for n in gen.num_anchors_per_location()]
    except (AttributeError, TypeError):
        return None
    return per_loc if len(per_loc) == levels else None


def _centre_sampled(anchors: torch.Tensor, gt: torch.Tensor, radius: float) -> torch.Tensor:
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    stride = (anchors[:, 2] - anchors[:, 0]).clamp_min(1.0)
    gt_c = (gt[:, :2] + gt[:, 2:]) / 2
    inside = (centres[:, None, 0] > gt[None, :, 0]) & (centres[:, None, 0] < gt[None, :, 2]) & (
        centres[:, None, 1] > gt[None, :, 1]
    ) & (centres[:, None, 1] < gt[None, :, 3])
    dist = (centres[:, None, :] - gt_c[None, :, :]).abs().max(dim=-1).values
    return (inside & (dist < radius * stride[:, None])).any(dim=1)


def _inside_boxes(image_list: Any, shapes: list[torch.Size], targets: Sequence[dict], device: torch.device) -> list[torch.Tensor]:
    pad_h, pad_w = image_list.tensors.shape[-2:]
    out = []
    for h, w in shapes:
        m = torch.zeros(len(targets), int(h), int(w), dtype=torch.bool, device=device)
        for b, t in enumerate(targets):
            for x1, y1, x2, y2 in t["boxes"].tolist():
                c0, c1 = math.floor(x1 / pad_w * int(w)), math.ceil(x2 / pad_w * int(w))
                r0, r1 = math.floor(y1 / pad_h * int(h)), math.ceil(y2 / pad_h * int(h))
                m[b, r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = True
        out.append(m)
    return out


def feature_widths(model: nn.Module, size: int = 64) -> dict[str, int]:
    """Channels of each level the backbone returns (one forward at ``size``, eval mode)."""
    model = unwrap(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = _as_dict(model.backbone(torch.zeros(1, 3, size, size, device=next(model.parameters()).device)))
    finally:
        model.train(was)
    return {k: int(v.shape[1]) for k, v in feats.items()}


class FeatureImitation(TeacherHook):
    """Trainer hook: imitate ``teacher``'s neck features at object locations (and, with
    ``cfg.response_weight``, its classification outputs). See the module docstring.

    ``student`` is the model being trained (used to size the adaptation layers)."""

    def __init__(
        self, teacher: nn.Module, student: nn.Module, cfg: DistillSection, *, teacher_path: str | None = None
    ) -> None:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        for attr in ("transform", "backbone"):
            if not hasattr(student, attr) or not hasattr(teacher, attr):
                raise TrainingError(
                    f"feature imitation needs torchvision's detector interface (a '{attr}' module); "
                    f"{type(student).__name__} has none: retrain with distill type 'none'"
                )
        if not isinstance(student.transform, GeneralizedRCNNTransform):
            # the object masks come from torchvision's transform (ImageList + resized targets) and
            # anchor generators; YOLO letterboxing and grids are not wired in yet
            raise TrainingError(
                f"feature imitation supports torchvision's detectors (GeneralizedRCNNTransform); "
                f"{type(student).__name__} uses {type(student.transform).__name__}: retrain with distill type 'none'"
            )
        super().__init__(teacher, cfg, teacher_path=teacher_path)
        size = int(getattr(getattr(student, "transform", None), "min_size", (64,))[0] or 64)
        s_w, t_w = feature_widths(student, min(size, 320)), feature_widths(self.teacher, min(size, 320))
        if list(s_w) != list(t_w):
            raise TrainingError(f"teacher and student have different feature levels: {list(t_w)} vs {list(s_w)}")
        levels = cfg.levels or list(s_w)
        unknown = [lv for lv in levels if lv not in s_w]
        if unknown:
            raise TrainingError(f"distill.levels {unknown} are not feature levels of this model ({list(s_w)})")
        self.levels = levels
        self.set_adapters({lv: (s_w[lv], t_w[lv]) for lv in levels})

    def before_train(self, trainer: Trainer) -> None:
        super().before_train(trainer)
        student = trainer.module
        self._handles = [
            student.transform.register_forward_hook(lambda m, i, o: self._seen.__setitem__("transform", o)),
            student.backbone.register_forward_hook(lambda m, i, o: self._seen.__setitem__("features", o)),
        ]
        if (self.cfg.response_weight > 0 or self.cfg.type == "response") and hasattr(student, "head"):
            self._handles.append(student.head.register_forward_hook(lambda m, i, o: self._seen.__setitem__("head", o)))

    def loss_terms(self, trainer: Trainer, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seen, self._seen = self._seen, {}
        if "transform" not in seen or "features" not in seen:
            raise TrainingError("feature imitation saw no student forward (transform/backbone hooks did not fire)")
        image_list, resized_targets = seen["transform"]
        student_feats = _as_dict(seen["features"])
        zero = next(iter(student_feats.values())).sum() * 0.0
        active = trainer.step >= self.cfg.warmup_steps
        imitate = self.cfg.type != "response"
        terms = {"imitation": zero} if imitate else {}
        response_weight = self.cfg.weight if not imitate else self.cfg.response_weight
        if response_weight > 0:
            terms["response"] = zero
        if not active or resized_targets is None:
            return terms
        with torch.no_grad():
            teacher_feats = _as_dict(self.teacher.backbone(image_list.tensors))
        masks = imitation_masks(trainer.module, image_list, list(student_feats.values()), resized_targets,
                                psi=self.cfg.psi, center_radius=self.cfg.center_radius)
        names = list(student_feats)
        error, energy = zero, 0.0
        for lv in self.levels if imitate else []:
            m = masks[names.index(lv)]
            if not bool(m.any()):
                continue
            t = teacher_feats[lv]
            diff = (self.adapters[lv](student_feats[lv]) - t).pow(2).sum(dim=1)  # (B, H, W)
            error = error + (diff * m).sum()
            energy += float((t.pow(2).sum(dim=1) * m).sum())
        if imitate and energy > 0:
            # The paper's sum of squared differences over the masked locations / (2 N_p), divided
            # here by the teacher's own energy there (a relative error): FPN features of different
            # detectors differ in scale by 1000x, and one default weight should fit them all.
            terms["imitation"] = self.cfg.weight * error / (2 * energy)
        if response_weight > 0 and "head" in seen:
            terms["response"] = response_weight * self._response(seen["head"], teacher_feats)
        return terms

    def _response(self, student_out: Any, teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Classification distillation for dense heads returning ``cls_logits`` (RetinaNet, FCOS:
        sigmoid outputs; SSD: softmax over classes)."""
        if not isinstance(student_out, dict) or "cls_logits" not in student_out:
            return torch.zeros((), device=next(iter(teacher_feats.values())).device)
        with torch.no_grad():
            t_out = self.teacher.head(list(teacher_feats.values()))
        s, t = student_out["cls_logits"], t_out["cls_logits"]
        temp = self.cfg.temperature
        if type(self.teacher).__name__ == "SSD":  # softmax over classes (background included)
            kl = F.kl_div(F.log_softmax(s / temp, -1), F.softmax(t / temp, -1), reduction="none").sum(-1)
            return kl.mean() * temp**2
        # focal-loss heads (RetinaNet, FCOS, user heads): independent sigmoids per class
        return F.binary_cross_entropy_with_logits(s / temp, torch.sigmoid(t / temp)) * temp**2

    def state_dict(self) -> dict[str, Any]:
        return {"adapters": {k: v.detach().cpu() for k, v in self.adapters.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("adapters"):
            self.adapters.load_state_dict(state["adapters"])


def distill_hook_for(teacher: nn.Module, student: nn.Module, cfg: DistillSection, *,
                     teacher_path: str | None = None) -> HookBase:
    """The distillation hook for this student: letterbox-aware imitation and head-loss response
    distillation for Ultralytics YOLO (:mod:`surgery.yolo.distill`), feature imitation (and
    classification response) for torchvision's interface."""
    if is_ultralytics(student):
        return YoloDistillation(teacher, student, cfg, teacher_path=teacher_path)
    return FeatureImitation(teacher, student, cfg, teacher_path=teacher_path)


def teacher_path(plan: Any, configured: str | None) -> str | None:
    """The teacher checkpoint: the configured one, else the oldest checkpoint the plan chain was
    pruned from (the dense model), else ``None``."""
    if configured not in (None, "", "auto"):
        return configured
    sources = [p.source for p in plan_chain(plan) if p.source and looks_like_path(p.source)]
    return sources[-1] if sources else None


__all__ = ["FeatureImitation", "anchor_generator_of", "distill_hook_for", "feature_widths", "imitation_masks", "teacher_path"]
