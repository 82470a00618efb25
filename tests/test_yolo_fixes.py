"""Fixes on the Ultralytics path: MACs labelled at the size the network ran at and equal to
Ultralytics' own GFLOPs / 2 there; the YOLO ONNX without a letterbox-canvas constant."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cli.display import macs_line
from surgery.detectors.builders import ModelSpec, build_model
from surgery.measure import count_params
from surgery.measure.count import count_macs
from surgery.yolo.interface import PAD_VALUE, LetterboxTransform


def test_yolo_macs_match_ultralytics_gflops_and_name_the_letterboxed_size(ultralytics) -> None:
    from ultralytics.utils.torch_utils import get_flops

    at_320 = build_model(ModelSpec("ultralytics:yolov8n.yaml", {"nc": 4, "size": 320}))
    ours = count_macs(at_320, 320)
    theirs = get_flops(at_320.net, 320) / 2 * 1e9  # thop: GFLOPs = 2 x MACs
    assert theirs > 0 and abs(ours.total - theirs) / theirs < 0.01
    at_640 = build_model(ModelSpec("ultralytics:yolov8n.yaml", {"nc": 4}))  # letterboxes any input to 640
    counted = count_macs(at_640, 320)
    assert counted.backbone_input == (640, 640)
    assert abs(counted.total - get_flops(at_640.net, 640) / 2 * 1e9) / counted.total < 0.01  # 4x the 320 count
    assert "network at 640x640" in macs_line(counted.total, None, 320, None, counted.backbone_input)


def _canvas_letterbox(t: LetterboxTransform, images: list[torch.Tensor]) -> torch.Tensor:
    """The letterbox the way it was built before: a grey canvas, each resized image copied in."""
    s = t.canvas()
    batch = images[0].new_full((len(images), 3, s, s), PAD_VALUE)
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        scale = t.max_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        batch[i, :, :nh, :nw] = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    return batch


def test_letterbox_padded_in_the_graph_equals_the_canvas_copy() -> None:
    t = LetterboxTransform(100)
    images = [torch.rand(3, 50, 80), torch.rand(3, 128, 33), torch.rand(3, 100, 100)]
    torch.testing.assert_close(t(images)[0], _canvas_letterbox(t, images), rtol=0, atol=0)


def test_yolo_onnx_holds_no_canvas_constant(ultralytics, tmp_path) -> None:
    """At 640 px the grey canvas would be a 4.9 MB constant: the file stays within 10% of the weights."""
    from surgery.deployment.export import export_onnx

    model = build_model(ModelSpec("ultralytics:yolov8n.yaml", {"nc": 4})).eval()
    res = export_onnx(model, tmp_path / "m.onnx", 640, verify=True)
    assert res.verified
    weights = 4 * count_params(model).total
    assert res.file_bytes <= 1.10 * weights, (res.file_bytes, weights)
