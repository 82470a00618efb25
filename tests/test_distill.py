"""Feature-imitation distillation: the imitation masks, every family, checkpoints, resume, DDP."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from surgery.config.recipe import DistillSection, PruneSection, TrainSection, recipe_from_dict
from surgery.detectors.builders import ModelSpec, build_model, list_models
from surgery.errors import TrainingError
from surgery.pruning.graph import dummy_inputs
from surgery.pruning.prune import prune_model
from surgery.storage.checkpoint import read_checkpoint, save_checkpoint
from surgery.training.distill import FeatureImitation, feature_widths, imitation_masks
from surgery.training.hooks import HookBase
from surgery.training.train import build_trainer
from tests.helpers import by_family
from tests.test_train import Kill, Shapes

SIZES = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}


class _Head(nn.Module):
    def __init__(self, size: int, anchor_free: bool = False) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator(sizes=((size,),), aspect_ratios=((1.0,),))
        if anchor_free:
            self.center_sampling_radius = 1.5


def _masks(model: nn.Module, box: list[float]) -> torch.Tensor:
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    feats = [torch.zeros(1, 4, 8, 8)]  # stride 8
    return imitation_masks(model, images, feats, [{"boxes": torch.tensor([box])}], psi=0.5)[0][0]


def test_anchor_iou_rule_selects_anchors_near_the_box():
    # 32x32 anchors every 8 px; the box is exactly the anchor at (4, 4): IoU 1. One stride off in
    # one axis IoU 0.6 (> 0.5 x 1), diagonal 0.39 and two strides 0.33 (both below)
    mask = _masks(_Head(32), [16.0, 16.0, 48.0, 48.0])
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for r, c in [(4, 4), (3, 4), (5, 4), (4, 3), (4, 5)]:
        expected[r, c] = True
    assert torch.equal(mask, expected)


def test_anchor_free_rule_selects_the_box_centre_region():
    # one point per location (size 8 = stride); centre (40, 32), radius 1.5 x 8 = 12 px
    mask = _masks(_Head(8, anchor_free=True), [20.0, 20.0, 60.0, 44.0])
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[3:6, 4:7] = True
    assert torch.equal(mask, expected)


def test_no_boxes_no_imitation():
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    out = imitation_masks(_Head(32), images, [torch.zeros(1, 4, 8, 8)], [{"boxes": torch.zeros(0, 4)}])
    assert not out[0].any()


class _Grads(HookBase):
    def __init__(self, hook: FeatureImitation, teacher: nn.Module) -> None:
        self.hook, self.teacher, self.seen = hook, teacher, {}

    def after_backward(self, trainer) -> None:
        self.seen["student"] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.module.parameters())
        self.seen["adapters"] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in self.hook.adapters.parameters())
        self.seen["teacher"] = any(p.grad is not None for p in self.teacher.parameters())


class _Dummy(torch.utils.data.Dataset):
    """Images with whatever targets the model's losses need (masks, keypoints too)."""

    def __init__(self, model: nn.Module, size: int, n: int = 2) -> None:
        self.item = dummy_inputs(model, size)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.item[0][0], self.item[1][0]


@pytest.mark.parametrize("name", by_family(list_models()))
def test_one_distillation_step_on_every_builder(name: str):
    torch.manual_seed(0)
    size = SIZES.get(name, 160)
    kw = {} if name in SIZES else {"min_size": size, "max_size": size}
    if name == "yolov2_darknet19":  # letterboxing YOLO: not wired into imitation, one clear error
        teacher = build_model(name, num_classes=3, size=size, width=0.25)
        with pytest.raises(TrainingError, match="distill type 'none'"):
            FeatureImitation(teacher, copy.deepcopy(teacher), DistillSection(type="imitation"))
        return
    teacher = build_model(name, num_classes=3, **kw)
    student = copy.deepcopy(teacher)
    prune_model(student, PruneSection(ratio=0.5), trace_size=128)
    hook = FeatureImitation(teacher, student, DistillSection(type="imitation"))
    s_w, t_w = feature_widths(student, size), feature_widths(teacher, size)
    for level, conv in hook.adapters.items():  # pruned widths -> the teacher's widths
        assert (conv.in_channels, conv.out_channels) == (s_w[level], t_w[level]), level
    assert any(c.out_channels > c.in_channels for c in hook.adapters.values())
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    grads = _Grads(hook, teacher)
    cfg = TrainSection(steps=1, batch_size=2, warmup_steps=1, log_every=1)
    result = build_trainer(student, ModelSpec(name), _Dummy(teacher, size), cfg, hooks=[hook, grads]).train()
    assert result.losses["imitation"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    assert grads.seen == {"student": True, "adapters": True, "teacher": False}
    assert all(torch.equal(before[n], p) for n, p in teacher.named_parameters())


def _pruned_pair(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    spec = ModelSpec("fcos_resnet18_slim", {"num_classes": 5, "min_size": 64, "max_size": 64})
    dense = build_model(spec)
    dense_path = save_checkpoint(tmp_path / "dense.pt", dense, spec)
    res = prune_model(dense, PruneSection(ratio=0.5))
    res.plan.source = str(dense_path)
    pruned_path = save_checkpoint(tmp_path / "pruned.pt", dense, spec, kind="structured", plan=res.plan)
    return dense_path, pruned_path


def test_retrain_with_teacher_saves_no_adapters_and_reloads(tmp_path: Path):
    from surgery.workflows import retrain_checkpoint

    dense_path, pruned_path = _pruned_pair(tmp_path)
    rec = recipe_from_dict({
        "data": {"root": str(tmp_path / "synth"), "images": 16, "size": 64},
        "retrain": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1,
                    "distill": {"type": "imitation", "warmup_steps": 1}},
    }, "test")
    outcome = retrain_checkpoint(pruned_path, rec, tmp_path / "rt.pt", evaluate=False)
    assert "imitation" in outcome.result.losses
    ckpt = read_checkpoint(outcome.out)
    assert set(ckpt.state_dict) == set(read_checkpoint(pruned_path).state_dict)  # no adaptation layers
    assert ckpt.plan.source == str(dense_path) and ckpt.recipe["retrain"]["distill"]["type"] == "imitation"
    from surgery.storage.checkpoint import load

    model = load(outcome.out).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_no_teacher_is_one_clear_error(tmp_path: Path):
    from surgery.errors import RecipeError
    from surgery.workflows import retrain_checkpoint

    spec = ModelSpec("fcos_resnet18_slim", {"num_classes": 5, "min_size": 64, "max_size": 64})
    path = save_checkpoint(tmp_path / "d.pt", build_model(spec), spec)
    rec = recipe_from_dict({"data": {"root": str(tmp_path / "synth"), "images": 16, "size": 64},
                            "retrain": {"steps": 1, "batch_size": 4, "distill": {"type": "imitation"}}}, "t")
    with pytest.raises(RecipeError, match="--teacher"):
        retrain_checkpoint(path, rec, tmp_path / "o.pt", evaluate=False)


def test_resume_restores_the_adaptation_layers(tmp_path: Path):
    from surgery.storage.checkpoint import load_checkpoint

    dense_path, pruned_path = _pruned_pair(tmp_path)
    cfg = TrainSection(steps=4, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=2)
    dcfg = DistillSection(type="imitation")

    def trainer(extra):
        student, ck = load_checkpoint(pruned_path)
        hook = FeatureImitation(load_checkpoint(dense_path)[0], student, dcfg)
        return hook, build_trainer(student, ck.spec, Shapes(8), cfg, out=tmp_path / "run.pt", kind="structured",
                                   plan=ck.plan, hooks=[hook, *extra])

    with pytest.raises(KeyboardInterrupt):
        trainer([Kill(3)])[1].train()
    saved = read_checkpoint(tmp_path / "run.pt").train_state["hooks"]["FeatureImitation:0"]["adapters"]
    hook, tr = trainer([])
    seen = {}

    class Peek(HookBase):
        def before_train(self, t) -> None:
            seen.update({k: v.detach().clone() for k, v in hook.adapters.state_dict().items()})

    tr.hooks.append(Peek())
    assert tr.train(resume=True).start_step == 2
    for k, v in saved.items():
        assert torch.equal(seen[k], v), k


def _ddp_worker(rank: int, port: int, tmp: str, dense: str, pruned: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from surgery.storage.checkpoint import load_checkpoint
    from surgery.training.train import destroy_distributed, init_distributed

    info = init_distributed()
    try:
        student, ck = load_checkpoint(pruned)
        torch.manual_seed(0)  # every rank initialises the adaptation layers alike, as a seeded run does
        hook = FeatureImitation(load_checkpoint(dense)[0], student, DistillSection(type="imitation"))
        cfg = TrainSection(steps=2, batch_size=2, warmup_steps=1, log_every=1)
        result = build_trainer(student, ck.spec, Shapes(8), cfg, hooks=[hook], dist_info=info).train()
        torch.save({"adapters": hook.adapters.state_dict(), "loss": result.losses["imitation"]}, Path(tmp) / f"r{rank}.pt")
    finally:
        destroy_distributed()


def test_ddp_with_distillation_two_gloo_processes(tmp_path: Path):
    import torch.multiprocessing as mp

    dense, pruned = _pruned_pair(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path), str(dense), str(pruned)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "r0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "r1.pt", weights_only=True)
    assert r0["loss"] > 0 and r1["loss"] > 0
    for k in r0["adapters"]:  # gradients averaged across ranks: the adapters stay identical
        torch.testing.assert_close(r0["adapters"][k], r1["adapters"][k], atol=1e-6, rtol=1e-5)


def test_cli_retrain_with_teacher(tmp_path: Path):
    from typer.testing import CliRunner

    from cli.main import app

    dense_path, pruned_path = _pruned_pair(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{root: {tmp_path / 'synth'}, images: 16, size: 64}}\n"
                      "retrain: {steps: 2, batch_size: 4, warmup_steps: 1}\n")
    out = tmp_path / "rt.pt"
    res = CliRunner().invoke(app, ["retrain", str(pruned_path), "-r", str(recipe), "--teacher", "auto",
                                   "--distill-weight", "2", "--no-eval", "--out", str(out)])
    assert res.exit_code == 0, res.output
    ckpt = read_checkpoint(out)
    assert "FeatureImitation:0" in ckpt.train_state["hooks"] and "imitation" in ckpt.metrics["train"]["losses"]
    assert ckpt.recipe["retrain"]["distill"] == {**ckpt.recipe["retrain"]["distill"], "type": "imitation",
                                                  "weight": 2.0}
    plain = tmp_path / "plain.pt"
    res = CliRunner().invoke(app, ["retrain", str(pruned_path), "-r", str(recipe), "--teacher", "none",
                                   "--no-eval", "--out", str(plain)])
    assert res.exit_code == 0, res.output
    assert "FeatureImitation:0" not in read_checkpoint(plain).train_state["hooks"]
