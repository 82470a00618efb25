"""Structured pruning of every registered detector: thinner layers, fewer params, intact outputs,
a training step, and a checkpoint that reloads to the same outputs. The zeroed-channel oracle for
every builder is in ``test_equivalence.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from surgery.config.recipe import PruneSection
from surgery.detectors.builders import ModelSpec, is_torchvision_model, list_models
from surgery.pruning.graph import dummy_inputs
from surgery.pruning.prune import prune_model
from surgery.storage.checkpoint import save_checkpoint
from tests.helpers import TEST_SIZE, assert_outputs_close, by_family, eval_outputs, small_model


def _convs(model: nn.Module, prefix: str) -> dict[str, int]:
    return {
        n: m.out_channels
        for n, m in model.named_modules()
        if n.startswith(prefix) and isinstance(m, nn.modules.conv._ConvNd)
    }


def _in_widths(model: nn.Module, prefix: str) -> dict[str, int]:
    return {
        n: m.in_channels
        for n, m in model.named_modules()
        if n.startswith(prefix) and isinstance(m, nn.modules.conv._ConvNd)
    }


@pytest.mark.parametrize("name", by_family(list_models()))
def test_prune_every_builder(name: str, tmp_path) -> None:
    kwargs = {"min_size": TEST_SIZE, "max_size": TEST_SIZE} if is_torchvision_model(name) and not name.startswith("ssd") else {}
    spec = ModelSpec(name, kwargs)
    model = small_model(name)
    images = [torch.rand(3, TEST_SIZE, TEST_SIZE)]
    before_out = eval_outputs(model, images)
    heads_before = {**_convs(model, "head"), **_convs(model, "rpn"), **_convs(model, "roi_heads")}
    heads_in_before = {**_in_widths(model, "head"), **_in_widths(model, "rpn"), **_in_widths(model, "roi_heads")}
    fpn_before = _convs(model, "backbone.fpn")

    result = prune_model(model, PruneSection(ratio=0.5))
    report = result.report

    # really smaller: at ratio 0.5 most weights scale with (1 - r)^2
    assert 0.15 < report.params_ratio < 0.6, report.params_ratio
    assert sum(p.numel() for p in model.parameters()) == report.params_after
    # the output layers are found from the graph and never cut
    assert report.output_layers
    widths = dict(_convs(model, ""))
    for layer in report.output_layers:
        mod = model.get_submodule(layer)
        width = mod.out_channels if hasattr(mod, "out_channels") else mod.out_features
        assert width == result.plan.widths_before[layer], layer
    # FPN and head convs are thinner (SSD300's head is only output convs: their inputs shrink)
    if fpn_before:
        assert any(widths[n] < c for n, c in fpn_before.items()), "FPN not pruned"
    thinner_heads = [n for n, c in heads_before.items() if n not in report.output_layers and widths[n] < c]
    heads_in_after = {**_in_widths(model, "head"), **_in_widths(model, "rpn"), **_in_widths(model, "roi_heads")}
    narrower_inputs = [n for n, c in heads_in_before.items() if heads_in_after[n] < c]
    assert thinner_heads or (name.startswith("ssd300") and narrower_inputs), "no head conv was pruned"
    assert narrower_inputs

    # eval output structure intact and finite
    out = eval_outputs(model, images)
    assert list(out[0]) == list(before_out[0])
    for k, v in out[0].items():
        assert torch.isfinite(v.float()).all(), k
    assert out[0]["boxes"].ndim == 2 and out[0]["boxes"].shape[1] == 4

    # one training step with targets; backward reaches the cut layers
    model.train()
    imgs, targets = dummy_inputs(model, TEST_SIZE)
    if name.startswith("ssdlite"):  # BN on 1x1 maps needs a batch of 2 in train mode
        imgs, targets = imgs * 2, targets * 2
    losses = model(imgs, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:5])

    # the checkpoint rebuilds from the builder + plan, without pickled code
    path = save_checkpoint(tmp_path / "p.pt", model, spec, kind="structured", plan=result.plan)
    reloaded = surgery.load(path)
    assert_outputs_close(eval_outputs(model, images), eval_outputs(reloaded, images), atol=1e-5)
