"""Distillation for Ultralytics YOLO detectors: letterbox-aware feature imitation and response
distillation in the form of the head's own loss.

torchvision detectors get their imitation masks from their transform and anchor generator
(:mod:`surgery.training.distill`); a YOLO has neither. Here everything is read in the letterboxed batch the
network sees (:class:`~surgery.yolo.interface.LetterboxTransform`: boxes already in its pixels):

- **imitation** (Wang et al. 2019): the student imitates the teacher's neck features (the Detect
  head's inputs, P3-P5) through per-level 1x1 adaptation convs, at the grid cells whose centre lies
  inside a box and within ``center_radius`` strides of its centre (FCOS' centre sampling, the rule
  the torchvision anchor-free path uses), plus the cell holding each box centre (boxes smaller than
  a stride); normalised by the teacher's feature energy there, as in :mod:`surgery.training.distill`.
- **response**: the head's own loss with the teacher's outputs as targets: the class scores'
  BCE against the teacher's sigmoid scores (minus the teacher's own entropy, so it is a KL that is
  0 when they agree), normalised by the sum of the soft targets like Ultralytics normalises by the
  sum of its assigned scores; and the DFL box distributions' KL (localization distillation, Zheng
  et al. CVPR 2022), each anchor weighted by the teacher's best class score. Ultralytics' own
  gains (cls 0.5, dfl 1.5) weigh the two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import TrainingError
from ..pruning.masked import unwrap
from ..training.hooks import TeacherHook
from .response import (
    CLS_GAIN,
    DFL_GAIN,
    detect_head,
    end_to_end_branch,
    head_outputs,
    is_ultralytics,
    response_losses,
)

if TYPE_CHECKING:
    from ..config.recipe import DistillSection
    from ..training.train import Trainer



def letterbox_masks(feature_shapes: list[tuple[int, int]], canvas: int, targets: list[dict[str, Tensor]],
                    center_radius: float = 1.5, device: torch.device | str = "cpu") -> list[Tensor]:
    """One bool mask ``(batch, H, W)`` per level: cells whose centre is inside a box and within
    ``center_radius`` strides of its centre, or that hold a box centre. ``targets``' boxes are in
    the letterboxed batch's pixels (what the transform returns); ``canvas`` is its side."""
    masks = []
    for h, w in feature_shapes:
        stride_y, stride_x = canvas / h, canvas / w
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride_y
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride_x
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        level = torch.zeros(len(targets), h, w, dtype=torch.bool, device=device)
        for b, t in enumerate(targets):
            boxes = t["boxes"].to(device, torch.float32)
            if boxes.numel() == 0:
                continue
            x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
            bx, by = (x0 + x1) / 2, (y0 + y1) / 2
            inside = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)
            near = ((cx - bx).abs() < center_radius * stride_x) & ((cy - by).abs() < center_radius * stride_y)
            pos = (inside & near).any(0)
            col = (bx.flatten() / stride_x).long().clamp(0, w - 1)
            row = (by.flatten() / stride_y).long().clamp(0, h - 1)
            pos[row, col] = True
            level[b] = pos
        masks.append(level)
    return masks


class YoloDistillation(TeacherHook):
    """Trainer hook for Ultralytics students: ``imitation`` (``cfg.type == "imitation"``, weight
    ``cfg.weight``) and ``response_cls`` / ``response_dfl`` (``cfg.response_weight``; for
    ``cfg.type == "response"`` the weight is ``cfg.weight`` and imitation is off)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DistillSection, *,
                 teacher_path: str | None = None) -> None:
        if not is_ultralytics(student) or not is_ultralytics(teacher):
            raise TrainingError("YOLO distillation needs Ultralytics detectors (a Detect head) as teacher and student")
        super().__init__(teacher, cfg, teacher_path=teacher_path)
        self.imitate = cfg.type == "imitation" and cfg.weight > 0
        self.response_weight = cfg.weight if cfg.type == "response" else cfg.response_weight
        s_w, t_w = _feature_widths(student), _feature_widths(self.teacher)
        if len(s_w) != len(t_w):
            raise TrainingError(f"teacher and student have different feature levels: {len(t_w)} vs {len(s_w)}")
        levels = [int(x) for x in cfg.levels] if cfg.levels else list(range(len(s_w)))
        if any(not 0 <= lv < len(s_w) for lv in levels):
            raise TrainingError(f"distill.levels {cfg.levels} are not feature levels of this model (0..{len(s_w) - 1})")
        self.levels = levels
        self.set_adapters({str(lv): (s_w[lv], t_w[lv]) for lv in levels})

    def before_train(self, trainer: Trainer) -> None:
        super().before_train(trainer)
        student = trainer.module
        head = detect_head(student)
        assert head is not None
        self._handles = [
            student.transform.register_forward_hook(lambda m, i, o: self._seen.__setitem__("batch", o)),
            head.register_forward_pre_hook(lambda m, i: self._seen.__setitem__("feats", list(i[0]))),
            head.register_forward_hook(lambda m, i, o: self._seen.__setitem__("out", o)),
        ]

    def loss_terms(self, trainer: Trainer, images: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        seen, self._seen = self._seen, {}
        if "batch" not in seen or "feats" not in seen:
            raise TrainingError("YOLO distillation saw no student forward (transform/Detect hooks did not fire)")
        batch, scaled, _ = seen["batch"]
        s_feats = seen["feats"]
        zero = s_feats[0].sum() * 0.0
        terms: dict[str, Tensor] = {}
        if self.imitate:
            terms["imitation"] = zero
        if self.response_weight > 0:
            terms["response_cls"] = zero
            terms["response_dfl"] = zero
        if trainer.step < self.cfg.warmup_steps or scaled is None:
            return terms
        t_head = detect_head(self.teacher)
        captured: dict[str, Any] = {}
        handles = [t_head.register_forward_pre_hook(lambda m, i: captured.__setitem__("feats", list(i[0]))),
                   t_head.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))]
        try:
            with torch.no_grad():
                self.teacher.predict(batch)  # the teacher's network on the student's letterboxed batch
        finally:
            for h in handles:
                h.remove()
        t_feats = captured["feats"]
        if self.imitate:
            masks = letterbox_masks([tuple(f.shape[-2:]) for f in s_feats], int(batch.shape[-1]), scaled,
                                    self.cfg.center_radius, device=batch.device)
            error, energy = zero, 0.0
            for lv in self.levels:
                m = masks[lv]
                if not bool(m.any()):
                    continue
                t = t_feats[lv]
                diff = (self.adapters[str(lv)](s_feats[lv]) - t).pow(2).sum(dim=1)
                error = error + (diff * m).sum()
                energy += float((t.pow(2).sum(dim=1) * m).sum())
            if energy > 0:
                terms["imitation"] = self.cfg.weight * error / (2 * energy)
        if self.response_weight > 0:
            head = detect_head(trainer.module)
            # the teacher's eval forward ran only the one-to-one branch of an end-to-end head: the
            # student's same branch is compared with it (the one that predicts at inference)
            branch = end_to_end_branch(captured["out"])
            s_boxes, s_scores = head_outputs(seen["out"], head, branch)
            t_boxes, t_scores = head_outputs(captured["out"], t_head, branch)
            cls, dfl = response_losses(s_boxes, s_scores, t_boxes, t_scores, int(head.reg_max), self.cfg.temperature)
            terms["response_cls"] = self.response_weight * CLS_GAIN * cls
            terms["response_dfl"] = self.response_weight * DFL_GAIN * dfl
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {"adapters": {k: v.detach().cpu() for k, v in self.adapters.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("adapters"):
            self.adapters.load_state_dict(state["adapters"])


def _feature_widths(model: nn.Module) -> list[int]:
    """Channels of each level the Detect head reads (one eval forward at the model's size)."""
    model = unwrap(model)
    head = detect_head(model)
    assert head is not None
    seen: dict[str, Any] = {}
    handle = head.register_forward_pre_hook(lambda m, i: seen.__setitem__("feats", list(i[0])))
    was = model.training
    model.eval()
    try:
        size = model.transform.canvas()
        with torch.no_grad():
            model([torch.zeros(3, size, size, device=next(model.parameters()).device)])
    finally:
        handle.remove()
        model.train(was)
    return [int(f.shape[1]) for f in seen["feats"]]


__all__ = ["YoloDistillation", "end_to_end_branch", "head_outputs", "is_ultralytics", "letterbox_masks", "response_losses"]
