"""Masked (unstructured) magnitude pruning and the AGP schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery.config.recipe import AGPSection
from surgery.detectors.builders import build_model
from surgery.errors import PruningError
from surgery.pruning.masked import (
    AGPSchedule,
    apply_masks,
    magnitude_masks,
    prunable_parameters,
    prune_masked,
    pruned_count,
    sparsity_report,
)


def _toy() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 10),
    )


def test_prunable_parameters_are_conv_and_linear_weights_only():
    names = set(prunable_parameters(_toy()))
    assert names == {"0.weight", "3.weight", "5.weight"}


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8, 0.95])
def test_layer_scope_exact_count_per_layer(sparsity):
    model = _toy()
    masks = magnitude_masks(model, sparsity, "layer")
    for name, p in prunable_parameters(model).items():
        m = masks[name]
        assert m.dtype == torch.bool and m.shape == p.shape
        assert int((~m).sum()) == pruned_count(p.numel(), sparsity)
        # the kept weights are the largest ones
        if (~m).any() and m.any():
            assert p.detach().abs()[m].min() >= p.detach().abs()[~m].max()


def test_layer_scope_exact_with_ties():
    model = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)  # all tied
    masks = magnitude_masks(model, 0.37, "layer")
    assert int((~masks["weight"]).sum()) == 37


def test_global_scope_exact_total_and_one_threshold():
    model = _toy()
    with torch.no_grad():
        model[0].weight.mul_(100.0)  # the first conv is much larger: global prunes none of it
    masks = magnitude_masks(model, 0.6, "global")
    params = prunable_parameters(model)
    total = sum(p.numel() for p in params.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == pruned_count(total, 0.6)
    kept_min = min(p.detach().abs()[masks[n]].min() for n, p in params.items())
    pruned_max = max(p.detach().abs()[~masks[n]].max() for n, p in params.items() if (~masks[n]).any())
    assert kept_min >= pruned_max
    assert not (~masks["0.weight"]).any()


def test_prune_masked_folds_and_reports():
    model = build_model("fcos_resnet18_slim", num_classes=3, min_size=64, max_size=64)
    bn_before = {n: b.clone() for n, b in model.named_buffers()}
    biases = {n: p.clone() for n, p in model.named_parameters() if not n.endswith("weight")}
    result = prune_masked(model, 0.8, "layer")
    rep = sparsity_report(model)
    for layer in rep.layers:
        assert layer.zeros >= pruned_count(layer.params, 0.8)
        assert result.masks[layer.name].logical_not().sum() == pruned_count(layer.params, 0.8)
    # folded: pruned weights are exactly zero, no hooks / reparametrisation remain
    for name, p in prunable_parameters(model).items():
        assert torch.all(p[~result.masks[name]] == 0)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(not n.endswith("_orig") for n, _ in model.named_parameters())
    # biases, norm layers and buffers untouched
    for n, p in model.named_parameters():
        if n in biases:
            assert torch.equal(p, biases[n])
    for n, b in model.named_buffers():
        assert torch.equal(b, bn_before[n])
    assert result.total_params == sum(p.numel() for p in model.parameters())
    assert result.nonzeros_after < result.nonzeros_before
    assert result.nonzeros_before - result.nonzeros_after >= 0.79 * rep.prunable_params
    assert abs(rep.sparsity - 0.8) < 0.01
    d = result.to_dict()
    assert d["scope"] == "layer" and d["sparsity"] == 0.8


def test_apply_masks_zeroes_exactly():
    model = _toy()
    masks = magnitude_masks(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    apply_masks(model, masks)
    for name, p in prunable_parameters(model).items():
        assert torch.all(p[~masks[name]] == 0) and torch.all(p[masks[name]] != 0)


def test_previous_masks_never_unprune():
    model = _toy()
    first = magnitude_masks(model, 0.5)
    apply_masks(model, first)
    with torch.no_grad():  # pruned weights became the largest: still must stay pruned
        for name, p in prunable_parameters(model).items():
            p[~first[name]] = 100.0
    for scope in ("layer", "global"):
        second = magnitude_masks(model, 0.7, scope, previous=first)
        for name in first:
            assert not torch.any(second[name] & ~first[name])
        # a lower target never lowers the sparsity either
        third = magnitude_masks(model, 0.2, scope, previous=second)
        for name in first:
            assert torch.equal(third[name], second[name])


def test_bad_arguments():
    with pytest.raises(PruningError):
        magnitude_masks(_toy(), 1.0)
    with pytest.raises(PruningError):
        magnitude_masks(_toy(), 0.5, "channel")
    with pytest.raises(PruningError):
        magnitude_masks(_toy(), 0.5, names=["1.weight"])  # a BatchNorm weight


def test_agp_schedule_values_and_monotone():
    agp = AGPSchedule.from_section(
        AGPSection(initial_sparsity=0.1, final_sparsity=0.9, start_step=10, end_step=110, frequency=10)
    )
    assert agp.sparsity_at(0) == pytest.approx(0.1)
    assert agp.sparsity_at(10) == pytest.approx(0.1)
    # mid-way: s_f + (s_i - s_f) * (1/2)^3
    assert agp.sparsity_at(60) == pytest.approx(0.9 + (0.1 - 0.9) * 0.125)
    assert agp.sparsity_at(110) == pytest.approx(0.9)
    assert agp.sparsity_at(10_000) == pytest.approx(0.9)
    values = [agp.sparsity_at(t) for t in range(0, 200)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert [t for t in range(0, 200) if agp.should_update(t)] == list(range(10, 111, 10))
    odd = AGPSchedule(0.0, 0.5, 0, 25, 10)
    assert [t for t in range(40) if odd.should_update(t)] == [0, 10, 20, 25]
    with pytest.raises(PruningError):
        AGPSchedule(0.5, 0.2, 0, 10, 1)
