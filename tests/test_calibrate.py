"""Data-driven importance (taylor, fisher): calibration batches, formulas, frozen layers, weights
left unchanged, and the CLI path from a recipe's data section."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import surgery
from cli.main import app
from surgery.config.recipe import DataSection, PruneSection, recipe_from_dict
from surgery.detectors.builders import build_model
from surgery.errors import PruningError, RecipeError
from surgery.pruning.calibrate import calibrate, calibration_data, group_grad_product, group_scores
from surgery.pruning.graph import _trace_mode, dummy_inputs, trace
from surgery.pruning.importance import list_importances, needs_data
from surgery.pruning.prune import plan_channels, prune_model

SIZE = 96
SLIM = {"num_classes": 5, "min_size": SIZE, "max_size": SIZE}  # synthetic labels are 1..4


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("synth")
    return list(calibration_data(DataSection(root=str(root), images=8, size=64), batches=2, batch_size=2))


def _slim() -> nn.Module:
    return build_model("fcos_resnet18_slim", **SLIM)


def _scale_channel(group, channel: int, factor: float) -> None:
    """Multiply every trainable entry cut with root ``channel`` (plain and depthwise convs, linears, norms)."""
    dg = group.tp_group._DG
    with torch.no_grad():
        for item in group.tp_group:
            layer = item.dep.target.module
            idx = [i for i, r in zip(item.idxs, item.root_idxs) if r == channel]
            if not idx:
                continue
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
                    if isinstance(p, nn.Parameter):
                        p[idx] *= factor
            elif dg.is_in_channel_pruning_fn(item.dep.handler):
                assert isinstance(layer, nn.Linear) or layer.groups == 1
                layer.weight[:, idx] *= factor


def test_data_methods_are_registered() -> None:
    assert {"taylor", "fisher"} <= set(list_importances())
    assert needs_data("taylor") and needs_data("fisher") and not needs_data("l1")


@pytest.mark.parametrize("method", ["taylor", "fisher"])
def test_zeroed_channel_is_cut_first_and_weights_unchanged(method: str, batches) -> None:
    model = _slim()
    graph = trace(model, trace_size=SIZE)
    group = graph.group_of("backbone.body.conv1")  # the residual stream of layer1: many coupled layers
    _scale_channel(group, 5, 0.0)
    for p in model.backbone.body.layer2.parameters():  # a frozen stage is ranked too, and stays frozen
        p.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = calibrate(graph, batches, method=method, batches=2)
    assert set(scores) == {g.index for g in graph.groups if g.prunable}
    for g in graph.groups:
        if g.prunable:
            assert scores[g.index].shape == (g.channels,) and torch.isfinite(scores[g.index]).all(), g.root
            assert (scores[g.index] >= 0).all()
    assert scores[group.index][5] == 0 and scores[group.index].max() > 0
    assert scores[graph.group_of("backbone.body.layer2.0.conv1").index].max() > 0
    # weights, BatchNorm statistics, grads, modes and requires_grad all as before
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not any(p.requires_grad for p in model.backbone.body.layer2.parameters())
    assert model.backbone.body.bn1.training
    plan = plan_channels(graph, PruneSection(method=method, ratio=1 / 64, min_channels=1), scores=scores)
    assert plan[group.index] == [5]


@pytest.mark.parametrize(
    ("name", "kwargs", "roots"),
    [
        # residual stream, plain block conv, FPN (1x1 laterals coupled by the top-down adds), GroupNorm head
        ("fcos_resnet18_slim", SLIM, ["backbone.body.conv1", "backbone.body.layer1.0.conv1",
                                      "backbone.fpn.inner_blocks.0.0", "head.classification_head.conv.0"]),
        # inverted residual: expand conv + BN + depthwise conv + BN + project conv input
        ("ssdlite320_mobilenet_v3_large", {"num_classes": 3}, ["backbone.features.0.4.block.0.0"]),
    ],
)
def test_group_grad_product_is_the_channel_directional_derivative(name: str, kwargs: dict, roots: list[str]) -> None:
    """s(c) = sum w*dL/dw over the coupled entries = d/da L(channel c's entries scaled by a) at
    a=1, checked by central differences in float64."""
    model = build_model(name, **kwargs)
    graph = trace(model, trace_size=SIZE)
    model.double()  # in place: the graph's modules are the model's
    imgs, targets = dummy_inputs(model, SIZE)
    imgs = [i.double() for i in imgs]

    def loss() -> torch.Tensor:
        return sum(v for v in model(imgs, targets).values())

    groups = [graph.group_of(n) for n in roots]
    with _trace_mode(model, SIZE):
        model.zero_grad()
        loss().backward()
        products = {g.index: group_grad_product(g) for g in groups}
        eps = 1e-6  # small: ReLU/max-pool kinks spoil larger steps
        for g in groups:
            for c in (0, 3):
                with torch.no_grad():
                    _scale_channel(g, c, 1 + eps)
                    up = float(loss())
                    _scale_channel(g, c, (1 - eps) / (1 + eps))
                    down = float(loss())
                    _scale_channel(g, c, 1 / (1 - eps))
                fd = (up - down) / (2 * eps)
                assert products[g.index][c].item() == pytest.approx(fd, rel=1e-4, abs=1e-9), (g.root, c)


def test_frozen_batchnorm_and_frozen_stages_are_ranked(batches) -> None:
    """A user detector with FrozenBatchNorm2d and frozen first stages (Torch-Pruning's Taylor
    raises on the gradient-less layers)."""
    model = surgery.detectors.builders.build_model("tests.custom_detectors:fasterrcnn_resnet18_fpn", trust_code=True, min_size=SIZE, max_size=SIZE)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen
    # fewer proposals and sampled RoIs keep the train-mode loss quick on CPU
    model.rpn._pre_nms_top_n["training"], model.rpn._post_nms_top_n["training"] = 64, 32
    model.rpn.fg_bg_sampler.batch_size_per_image = model.roi_heads.fg_bg_sampler.batch_size_per_image = 32
    graph = trace(model, trace_size=SIZE)
    scores = group_scores(graph, "taylor", calib_data=batches, calib_batches=1)
    assert scores[graph.group_of("backbone.body.conv1").index].max() > 0
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == frozen
    res = prune_model(model, PruneSection(method="fisher", ratio=0.3, calib_batches=1), trace_size=SIZE, calib_data=batches)
    assert res.report.params_ratio < 0.8 and res.plan.calib_batches == 1


def test_data_method_without_data_is_one_clear_error() -> None:
    with pytest.raises(PruningError, match="ranks channels on data"):
        prune_model(_slim(), PruneSection(method="taylor"))
    with pytest.raises(PruningError, match="no batch"):
        prune_model(_slim(), PruneSection(method="fisher"), trace_size=SIZE, calib_data=[])


def test_recipe_validates_new_fields() -> None:
    r = recipe_from_dict({"prune": {"method": "fisher", "calib_batches": 2, "target_macs": 0.4}})
    assert r.prune.method == "fisher" and r.prune.calib_batches == 2 and r.prune.target_macs == 0.4
    for bad, match in [
        ({"calib_batches": 0}, "calib_batches"),
        ({"target_macs": 1.0}, "target_macs"),
        ({"target_params": 0.0}, "target_params"),
        ({"target_macs": 0.5, "target_params": 0.5}, "target_params"),
        ({"method": "magnitude", "target_macs": 0.5}, "target_macs"),
        ({"method": "hessian"}, "taylor, fisher"),
    ]:
        with pytest.raises(RecipeError, match=match):
            recipe_from_dict({"prune": bad})


def test_cli_prune_taylor_on_synthetic(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  root: {tmp_path / 'synth'}\n  images: 8\n  size: 64\nbench:\n  input_size: {SIZE}\n")
    out = tmp_path / "t.pt"
    runner = CliRunner()
    res = runner.invoke(app, ["prune", "-r", str(recipe), "-m", "fcos_resnet18_slim", "-k", f"min_size={SIZE}",
                              "-k", f"max_size={SIZE}", "--method", "taylor", "--calib-batches", "2",
                              "--data", "synthetic", "--target-macs", "0.5", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "target 50.0% of the MACs" in res.output
    ckpt = surgery.storage.checkpoint.read_checkpoint(out)
    plan = ckpt.plan
    assert plan.method == "taylor" and plan.calib_batches == 2 and plan.target_macs == 0.5
    assert abs(plan.achieved_macs_ratio / 0.5 - 1) <= 0.02 and 0 < plan.ratio < 1
    assert sum(p.numel() for p in surgery.load(out).parameters()) == plan.params_after
    helptext = runner.invoke(app, ["prune", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--target-macs", "--target-params", "--calib-batches", "--data", "taylor", "fisher"):
        assert flag in helptext, flag
