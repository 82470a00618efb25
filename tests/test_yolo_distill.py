"""Distillation for Ultralytics YOLO: letterbox-aware imitation masks (closed form), response
distillation that is zero when student and teacher agree, and a training step on a pruned YOLOv8n."""

from __future__ import annotations

import copy

import torch

from surgery.config.recipe import DistillSection, PruneSection, TrainSection
from surgery.pruning.prune import prune_model
from surgery.training.distill import distill_hook_for
from surgery.training.train import build_trainer
from surgery.yolo.distill import YoloDistillation, letterbox_masks, response_losses


def test_letterbox_masks_are_the_cells_near_each_box_centre():
    # one 40x30 box centred at (30, 25) on a 128 px canvas; strides 8, 16, 32
    boxes = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]])}, {"boxes": torch.zeros(0, 4)}]
    m8, m16, m32 = letterbox_masks([(16, 16), (8, 8), (4, 4)], 128, boxes, center_radius=1.5)
    assert m8.shape == (2, 16, 16) and not m8[1].any()  # an image without boxes: no location
    # stride 8: centres (4 + 8k) inside the box and within 12 px of (30, 25): x in {20, 28, 36}, y in {20, 28, 36}
    assert m8[0].nonzero().tolist() == [[r, c] for r in (2, 3, 4) for c in (2, 3, 4)]
    # stride 32: cell centres (16, 16) and (48, 16) are inside and within 48 px of the centre
    assert m32[0].nonzero().tolist() == [[0, 0], [0, 1]]
    assert m16[0].any()
    # a box smaller than a stride holds no cell centre: the cell holding its centre is used
    (tiny,) = letterbox_masks([(4, 4)], 128, [{"boxes": torch.tensor([[100.0, 100.0, 102.0, 102.0]])}])
    assert tiny[0].nonzero().tolist() == [[3, 3]]


def test_response_distillation_is_zero_when_equal_and_positive_otherwise():
    torch.manual_seed(0)
    boxes, scores = torch.randn(2, 64, 50), torch.randn(2, 4, 50)
    cls, dfl = response_losses(boxes, scores, boxes, scores, reg_max=16)
    assert float(cls) == 0.0 and abs(float(dfl)) < 1e-6
    cls2, dfl2 = response_losses(boxes + torch.randn_like(boxes), scores + 1.0, boxes, scores, reg_max=16)
    assert float(cls2) > 0 and float(dfl2) > 0


class _Tiny(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        img = torch.rand(3, 96, 96) * 0.2
        img[:, 20 + i : 60 + i, 30:70] = 1.0
        return img, {"boxes": torch.tensor([[30.0, 20.0 + i, 70.0, 60.0 + i]]), "labels": torch.tensor([1 + i % 2])}


def test_yolo_student_learns_from_its_dense_teacher(tmp_path):
    from surgery.detectors.builders import ModelSpec, build_model

    spec = ModelSpec("ultralytics:yolov8n.yaml", {"nc": 2, "size": 96})
    teacher = build_model(spec)
    student = copy.deepcopy(teacher)
    prune_model(student, PruneSection(method="l1", ratio=0.5), trace_size=96)
    hook = distill_hook_for(teacher, student, DistillSection(type="imitation", weight=1.0, response_weight=1.0))
    assert isinstance(hook, YoloDistillation)
    assert [a.in_channels for a in hook.adapters.values()] == [32, 64, 128]  # the cut widths
    assert [a.out_channels for a in hook.adapters.values()] == [64, 128, 256]  # the teacher's
    cfg = TrainSection(steps=2, batch_size=2, warmup_steps=0, checkpoint_every=0, log_every=1)
    trainer = build_trainer(student, spec, _Tiny(), cfg, hooks=[hook], out=tmp_path / "s.pt")
    adapter_before = copy.deepcopy(hook.adapters.state_dict())
    trainer.train()
    for k in ("imitation", "response_cls", "response_dfl"):
        assert k in trainer.last_losses and trainer.last_losses[k] > 0, k
    assert any(not torch.equal(adapter_before[k], v) for k, v in hook.adapters.state_dict().items())  # trained
    # a response-only hook on the same pair has no imitation term
    only = distill_hook_for(teacher, student, DistillSection(type="response", weight=1.0))
    assert not only.imitate and only.response_weight == 1.0


def test_yolo26_end_to_end_student_distils_from_the_teachers_one_to_one_branch(tmp_path):
    """YOLO26's end-to-end head: the teacher's eval forward runs only the one-to-one branch, so the
    student's one-to-one outputs are compared with it (the branch read used to be the empty
    one-to-many dict: a KeyError on the first distilled step)."""
    from surgery.detectors.builders import ModelSpec, build_model
    from surgery.yolo.distill import end_to_end_branch

    spec = ModelSpec("ultralytics:yolo26n.yaml", {"nc": 2, "size": 96})
    teacher = build_model(spec)
    student = copy.deepcopy(teacher)
    prune_model(student, PruneSection(method="l1", ratio=0.5), trace_size=96)
    hook = distill_hook_for(teacher, student, DistillSection(type="imitation", weight=1.0, response_weight=1.0))
    cfg = TrainSection(steps=2, batch_size=2, warmup_steps=0, checkpoint_every=0, log_every=1)
    trainer = build_trainer(student, spec, _Tiny(), cfg, hooks=[hook], out=tmp_path / "s.pt")
    trainer.train()
    for k in ("imitation", "response_cls"):
        assert k in trainer.last_losses and trainer.last_losses[k] > 0, k
    assert end_to_end_branch((None, {"one2many": {}, "one2one": {"boxes": 1}})) == "one2one"
    assert end_to_end_branch({"one2many": {"boxes": 1}, "one2one": {"boxes": 1}}) == "one2many"
    assert end_to_end_branch({"boxes": 1, "scores": 1}) is None
