"""Shared test utilities."""

from __future__ import annotations

import torch
from torch import nn

from surgery.models import build_model, is_torchvision_model

TEST_SIZE = 224


def small_model(name: str, **kwargs) -> nn.Module:
    """A builder at a small input size (SSD models have fixed sizes)."""
    if is_torchvision_model(name) and not name.startswith("ssd"):
        kwargs = {"min_size": TEST_SIZE, "max_size": TEST_SIZE, **kwargs}
    return build_model(name, **kwargs)


def eval_outputs(model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    model.eval()
    with torch.no_grad():
        return model(images)


def assert_outputs_close(a: list[dict], b: list[dict], atol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert list(da) == list(db)
        for k in da:
            assert da[k].shape == db[k].shape, (k, da[k].shape, db[k].shape)
            if da[k].is_floating_point():
                torch.testing.assert_close(da[k], db[k], atol=atol, rtol=1e-4)
            else:
                assert torch.equal(da[k], db[k]), k
