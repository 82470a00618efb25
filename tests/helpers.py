"""Shared test utilities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery.detectors.builders import build_model, is_torchvision_model

TEST_SIZE = 224

# One representative per family of builders runs in the default suite; members sharing its code are
# `slow` (`make bench` / `-m slow` runs them). test_equivalence checks every builder is placed here.
FAMILY_REPRESENTATIVES = {
    "fcos_resnet18_slim": "FCOS (resnet18 backbone, GroupNorm head)",
    "maskrcnn_resnet50_fpn": "R-CNN v1 on resnet50-FPN: RPN, box head (flatten -> fc6), mask head (ConvTranspose)",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "R-CNN on MobileNetV3: depthwise convs, squeeze-excitation",
    "retinanet_resnet50_fpn": "RetinaNet (plain conv head, P6/P7 from P5)",
    "ssdlite320_mobilenet_v3_large": "SSD heads on extra blocks",
    "yolov2_darknet19": "the project's YOLOv2: passthrough (space-to-depth) concat",
}
SLOW_MEMBERS = {
    "fasterrcnn_resnet50_fpn": "maskrcnn_resnet50_fpn without the mask head",
    "keypointrcnn_resnet50_fpn": "maskrcnn_resnet50_fpn's code with a keypoint head",
    "fasterrcnn_resnet50_fpn_v2": "R-CNN v2 heads (BatchNorm conv box head); heavy",
    "maskrcnn_resnet50_fpn_v2": "R-CNN v2 heads (BatchNorm conv box head); heavy",
    "fasterrcnn_mobilenet_v3_large_fpn": "fasterrcnn_mobilenet_v3_large_320_fpn at a larger size",
    "fcos_resnet50_fpn": "fcos_resnet18_slim's head on resnet50",
    "retinanet_resnet50_fpn_v2": "retinanet_resnet50_fpn with a GroupNorm head",
    "retinanet_resnet18_slim": "retinanet_resnet50_fpn_v2's GroupNorm head on the quickstart's ResNet-18 (CPU-sized)",
    "ssd300_vgg16": "SSD heads on VGG16 at a fixed 300 px (L2Norm scale)",
}


def by_family(names: list[str]) -> list:
    """``names`` as pytest params, members that are not their family's representative marked slow."""
    return [pytest.param(n, marks=[] if n in FAMILY_REPRESENTATIVES else [pytest.mark.slow]) for n in names]


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
