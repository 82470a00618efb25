"""Ranking criteria, global ranking, overrides, skips, rounding, anchor surgery, user-built and
FrozenBatchNorm2d detectors, and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import surgery
from surgery.config.recipe import AnchorSection, DataSection, PruneSection
from surgery.detectors.anchors import prune_anchors
from surgery.detectors.builders import ModelSpec, build_model
from surgery.errors import PruningError
from surgery.pruning.calibrate import calibration_data
from surgery.pruning.graph import dummy_inputs, trace
from surgery.pruning.importance import (
    get_importance,
    list_importances,
    method_help,
    needs_data,
    pruning_methods,
)
from surgery.pruning.prune import keep_count, plan_channels, prune_model
from surgery.registry import Registry
from surgery.storage.checkpoint import save_checkpoint
from tests.helpers import TEST_SIZE, assert_outputs_close, eval_outputs, small_model

SLIM = {"num_classes": 5, "min_size": 128, "max_size": 128}


def _slim() -> nn.Module:
    return build_model("fcos_resnet18_slim", **SLIM)


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_keep_count_rounding_and_floors() -> None:
    assert keep_count(256, 0.5) == 128
    assert keep_count(100, 0.5, round_to=8) == 56
    assert keep_count(64, 0.9, min_channels=16) == 16
    assert keep_count(256, 0.5, multiple_of=32) == 128
    assert keep_count(256, 0.6, multiple_of=32) == 128  # 102.4 -> 128, stays GroupNorm-divisible
    assert keep_count(64, 0.5, multiple_of=32) == 64  # 32 would leave 1 channel per group
    assert keep_count(10, 0.5, min_channels=16) == 10  # never widens


@pytest.mark.parametrize("method", list_importances())
def test_every_ranking_method_prunes(method: str, tmp_path) -> None:
    model = _slim()
    calib = None
    if needs_data(method):  # taylor, fisher: one batch of a tiny synthetic set
        calib = calibration_data(DataSection(root=str(tmp_path), images=4, size=64), batches=1)
    res = prune_model(model, PruneSection(method=method, ratio=0.5, calib_batches=1), calib_data=calib)
    assert res.report.params_ratio < 0.5
    out = eval_outputs(model, [torch.rand(3, 128, 128)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_importance_registry_lists_suggests_and_flags_data() -> None:
    assert list_importances()[:3] == ["l1", "l2", "bn"] and pruning_methods()[-1] == "magnitude"
    assert list_importances(needs_data=False) == ["l1", "l2", "bn"] and not needs_data("bn")
    assert list_importances(needs_data=True) == ["taylor", "fisher"] and needs_data("taylor")
    assert method_help().startswith("l1 | l2 | bn")
    with pytest.raises(PruningError, match=r"choose one of l1, l2, bn, taylor, fisher \(did you mean 'l1'\?\).*magnitude"):
        get_importance("l11")
    reg: Registry[int] = Registry("widget", KeyError)
    reg.register("one", lambda fn: 1)(lambda: None)
    reg.add("two", 2)
    assert reg.names() == ["one", "two"] and "two" in reg and len(reg) == 2 and reg.get("one") == 1
    with pytest.raises(KeyError, match="already registered"):
        reg.add("one", 3)
    with pytest.raises(KeyError, match="did you mean 'two'"):
        reg.get("tow")


@pytest.mark.parametrize("method,stronger", [("l1", 0), ("l2", 1)])
def test_l1_and_l2_rank_by_their_own_norm(method: str, stronger: int) -> None:
    """Two channels of one group with equal consumer slices: channel 0's filter is all ones (L1 n,
    squared L2 n), channel 1's one spike of 2 sqrt(n) (L1 2 sqrt(n) < n, squared L2 4n > n). L1
    must rank channel 0 above channel 1 and L2 the other way round."""
    model = _slim()
    graph = trace(model, trace_size=TEST_SIZE)
    group = next(g for g in graph.groups if g.root == "backbone.body.layer2.0.conv1")
    assert group.producers[0] == group.root and group.consumers == ["backbone.body.layer2.0.conv2"]
    mods = dict(model.named_modules())
    root, consumer = mods[group.root], mods[group.consumers[0]]
    with torch.no_grad():
        n = root.weight[0].numel()
        root.weight[0] = 1.0
        root.weight[1] = 0.0
        root.weight[1].view(-1)[0] = 2.0 * n**0.5
        consumer.weight[:, 1] = consumer.weight[:, 0]
    scores = get_importance(method)(group)
    assert (scores[0] > scores[1]) == (stronger == 0), scores[:2]


def test_bn_ranking_cuts_smallest_gammas() -> None:
    model = _slim()
    bn = model.backbone.body.bn1
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.weight[[3, 5, 7, 11]] = 1e-4
    graph = trace(model)
    from surgery.pruning.prune import plan_channels

    plan = plan_channels(graph, PruneSection(method="bn", ratio=4 / 64, min_channels=1))
    group = graph.group_of("backbone.body.conv1")
    assert plan[group.index] == [3, 5, 7, 11]


def test_round_to_and_min_channels() -> None:
    model = _slim()
    res = prune_model(model, PruneSection(ratio=0.55, round_to=16, min_channels=32))
    for g in res.report.groups:
        if g.prunable and g.channels_after < g.channels_before:
            assert g.channels_after % 16 == 0, g
            assert g.channels_after >= 32, g


def test_skip_and_override_patterns() -> None:
    model = _slim()
    before = _widths(model)
    prune_model(model, PruneSection(ratio=0.5, skip=["backbone.fpn.layer_blocks.*"], overrides={"head.classification_head.conv.*": 0.25}))
    after = _widths(model)
    for n in before:
        if n.startswith("backbone.fpn.layer_blocks"):
            assert after[n] == before[n], n
    assert after["head.classification_head.conv.0"] == 96  # 128 * 0.75, GroupNorm(32)-divisible
    assert after["backbone.body.layer1.0.conv1"] == 32  # the default ratio elsewhere


def test_keep_head_keeps_the_head_widths_and_meets_the_macs_target() -> None:
    """``keep_head`` on a torchvision one-stage detector: the ``head`` module's convs keep their widths
    (the output layers aside, already never cut), the rest is cut more so that the MACs target holds;
    turning it off again drops its ``skip`` entry, and a model naming no head is refused in one line."""
    model = _slim()
    before = _widths(model)
    cfg = PruneSection(target_macs=0.5, keep_head=True)
    assert cfg.skip == ["@head"]
    res = prune_model(model, cfg, macs_input_size=TEST_SIZE)
    after = _widths(model)
    assert all(after[n] == before[n] for n in before if n.startswith("head.")), "a head conv was cut"
    assert any(after[n] < before[n] for n in before if n.startswith("backbone."))
    assert abs(res.report.macs_ratio - 0.5) <= 0.02, res.report.macs_ratio
    assert dataclasses.replace(cfg, keep_head=False).skip == []
    headless = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(PruningError, match="names no detection head"):
        prune_model(headless, PruneSection(ratio=0.5, keep_head=True))


def test_global_ranking_varies_widths_and_hits_the_ratio() -> None:
    model = _slim()
    res = prune_model(model, PruneSection(ratio=0.4, global_ranking=True, min_channels=1))
    prunable = [g for g in res.report.groups if g.prunable]
    ratios = {round(g.channels_after / g.channels_before, 2) for g in prunable}
    assert len(ratios) > 2  # not uniform
    removed = 1 - res.report.channels_after / res.report.channels_before
    assert 0.3 < removed < 0.5


def test_allocation_global_cuts_as_global_ranking_does() -> None:
    """``allocation: global`` reaches the global allocator: the same widths as ``global_ranking``,
    not the uniform cut (the section is not validated first, so nothing else sets the flag)."""
    def widths(cfg: PruneSection) -> list[int]:
        torch.manual_seed(0)  # the same weights for each cut
        return [g.channels_after for g in prune_model(_slim(), cfg).report.groups]

    by_name = widths(PruneSection(ratio=0.4, allocation="global", min_channels=1))
    assert by_name == widths(PruneSection(ratio=0.4, global_ranking=True, min_channels=1))
    assert by_name != widths(PruneSection(ratio=0.4, min_channels=1))


def test_bad_patterns_and_methods_are_clear_errors() -> None:
    with pytest.raises(PruningError, match="matches no layer"):
        prune_model(_slim(), PruneSection(skip=["backbone.nothing_here"]))
    with pytest.raises(PruningError, match="matches no layer"):
        prune_model(_slim(), PruneSection(overrides={"head.nope*": 0.2}))
    with pytest.raises(PruningError, match="masked"):
        prune_model(_slim(), PruneSection(method="magnitude"))


# ---------------------------------------------------------------------------------------------
# anchors


def _head_outputs(model: nn.Module, images: list[torch.Tensor]):
    model.eval()
    with torch.no_grad():
        imgs, _ = model.transform(images)
        feats = model.backbone(imgs.tensors)
        feats = list(feats.values()) if isinstance(feats, dict) else feats
        if hasattr(model, "rpn"):
            obj, deltas = model.rpn.head(feats)
            anchors = model.rpn.anchor_generator(imgs, feats)
            return {"cls": obj, "box": deltas}, anchors
        return model.head(feats), model.anchor_generator(imgs, feats)


def test_anchor_surgery_retinanet_keeps_surviving_predictions() -> None:
    model = small_model("retinanet_resnet50_fpn", num_classes=7)
    images = [torch.rand(3, TEST_SIZE, TEST_SIZE)]
    heads_before, anchors_before = _head_outputs(model, images)
    plan = prune_anchors(model, AnchorSection(keep_aspect_ratios=[1.0], keep_sizes=[0, 2]))
    keep = plan["generators"][0]["keep"][0]
    assert keep == [3, 5]  # ratio 1.0 is the middle ratio: anchors 3..5, sizes 0 and 2
    assert model.head.classification_head.cls_logits.out_channels == 2 * 7
    assert model.head.regression_head.bbox_reg.out_channels == 2 * 4
    heads_after, anchors_after = _head_outputs(model, images)
    # per-level anchors: [H*W*A, 4] -> keep the same anchors
    a0 = anchors_before[0].view(-1, 9, 4)[:, keep].reshape(-1, 4)
    torch.testing.assert_close(anchors_after[0], a0)
    cls_b = heads_before["cls_logits"].view(1, -1, 9, 7)[:, :, keep].reshape(1, -1, 7)
    torch.testing.assert_close(heads_after["cls_logits"], cls_b)
    box_b = heads_before["bbox_regression"].view(1, -1, 9, 4)[:, :, keep].reshape(1, -1, 4)
    torch.testing.assert_close(heads_after["bbox_regression"], box_b)
    out = eval_outputs(model, images)
    assert torch.isfinite(out[0]["boxes"]).all()


def test_anchor_surgery_rpn_and_reload(tmp_path) -> None:
    spec = ModelSpec("fasterrcnn_mobilenet_v3_large_320_fpn", {"min_size": TEST_SIZE, "max_size": TEST_SIZE})
    model = build_model(spec)
    images = [torch.rand(3, TEST_SIZE, TEST_SIZE)]
    res = prune_model(model, PruneSection(ratio=0.3, anchors=AnchorSection(keep_aspect_ratios=[0.5, 2.0])))
    gen = res.plan.anchors["generators"][0]
    assert gen["before"] == [15] * 3 and [len(k) for k in gen["keep"]] == [10] * 3
    assert model.rpn.head.cls_logits.out_channels == 10
    assert model.rpn.head.bbox_pred.out_channels == 40
    assert model.rpn.anchor_generator.num_anchors_per_location() == [10] * 3
    path = save_checkpoint(tmp_path / "a.pt", model, spec, kind="structured", plan=res.plan)
    reloaded = surgery.load(path)
    assert reloaded.rpn.anchor_generator.num_anchors_per_location() == [10] * 3
    assert_outputs_close(eval_outputs(model, images), eval_outputs(reloaded, images), atol=1e-5)


def test_anchor_surgery_ssd_per_level_heads() -> None:
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=5)
    before = model.anchor_generator.num_anchors_per_location()
    images = [torch.rand(3, 320, 320)]
    heads_before, _ = _head_outputs(model, images)
    plan = prune_anchors(model, AnchorSection(keep_aspect_ratios=[1.0, 2.0]))
    after = [len(k) for k in plan["generators"][0]["keep"]]
    assert before == [6] * 6 and after == [4] * 6
    heads_after, _ = _head_outputs(model, images)
    # SSD concatenates levels; compare level 0 (first H*W*A rows)
    keep = plan["generators"][0]["keep"][0]
    n_after0 = heads_after["bbox_regression"].shape[1]
    assert n_after0 == heads_before["bbox_regression"].shape[1] * 4 // 6
    b = heads_before["bbox_regression"]
    # level 0 is 20x20 at 320 px for SSDlite: rows [0, 400*6)
    lvl0_b = b[:, : 400 * 6].view(1, 400, 6, 4)[:, :, keep].reshape(1, -1, 4)
    torch.testing.assert_close(heads_after["bbox_regression"][:, : 400 * 4], lvl0_b)


def test_fcos_has_no_anchors_to_cut() -> None:
    with pytest.raises(PruningError, match="anchor-free"):
        prune_model(_slim(), PruneSection(anchors=AnchorSection(keep_sizes=[0])))


# ---------------------------------------------------------------------------------------------
# user-built detectors, FrozenBatchNorm2d, frozen stages


@pytest.mark.parametrize("target", ["tests.custom_detectors:fasterrcnn_resnet18_fpn", "tests/custom_detectors.py:fasterrcnn_resnet18_fpn"])
def test_user_built_detector_with_frozen_bn_prunes_and_reloads(target: str, tmp_path) -> None:
    spec = ModelSpec(target, {"num_classes": 4})
    model = build_model(spec, trust_code=True)
    frozen_bn = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen_bn
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.body.conv1.weight" in frozen_names  # frozen stem
    stem_before = model.backbone.body.conv1.out_channels
    res = prune_model(model, PruneSection(ratio=0.5))
    # frozen stages are pruned too, and stay frozen; FrozenBN buffers are cut consistently
    assert model.backbone.body.conv1.out_channels == stem_before // 2
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen_names
    for m in frozen_bn:
        assert m.weight.shape == m.bias.shape == m.running_mean.shape == m.running_var.shape
    assert model.backbone.body.bn1.weight.shape[0] == stem_before // 2
    assert res.report.params_ratio < 0.5
    images = [torch.rand(3, 256, 256)]
    model.train()
    imgs, targets = dummy_inputs(model, 256)
    sum(model(imgs, targets).values()).backward()
    path = save_checkpoint(tmp_path / "u.pt", model, spec, kind="structured", plan=res.plan)
    assert_outputs_close(eval_outputs(model, images), eval_outputs(surgery.load(path, trust_code=True), images), atol=1e-5)


def test_groupnorm_groups_lose_the_same_number_of_channels() -> None:
    """A cut GroupNorm group stays a subset of one original group (see prune._norm_blocks)."""
    model = build_model("fcos_resnet18_slim", **SLIM)
    graph = trace(model, trace_size=128)
    plan = plan_channels(graph, PruneSection(ratio=0.3, round_to=8))
    gn_groups = [g for g in graph.groups if g.norm_groups > 1 and g.index in plan]
    assert gn_groups
    for g in gn_groups:
        size = g.channels // g.norm_groups
        per_block = [sum(1 for i in plan[g.index] if i // size == b) for b in range(g.norm_groups)]
        assert len(set(per_block)) == 1 and per_block[0] > 0, (g.root, per_block)
