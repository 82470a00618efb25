"""ONNX export, verified with onnxruntime against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import surgery.deployment.export as sexport
from surgery.deployment.export import ExportError, export_onnx, run_onnx
from surgery.detectors.builders import ModelSpec, build_model
from surgery.storage.checkpoint import save_checkpoint
from tests.extras import require
from tests.test_equivalence import distinct_norms

require("onnxruntime")


def _compare(
    model: torch.nn.Module, onnx_path, size: int, seed: int = 5, width: int | None = None, atol: float = 1e-4
) -> None:
    """Independent check on another image: same detections (as a set: near-equal scores may swap)."""
    image = torch.rand(3, size, width or size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model.eval()([image])[0]
    got = run_onnx(onnx_path, image)
    assert got["boxes"].shape == tuple(ref["boxes"].shape) and len(got["boxes"]) > 0
    np.testing.assert_allclose(np.sort(got["scores"]), np.sort(ref["scores"].numpy()), atol=atol)
    d = np.abs(got["boxes"][:, None, :] - ref["boxes"].numpy()[None, :, :]).max(-1)
    assert d.min(axis=1).max() < 1e-3 and d.min(axis=0).max() < 1e-3


@pytest.mark.parametrize("fpn_channels", [128, 64])  # 64: a "pruned" (thinner) model exports too
def test_fcos_slim_exports_and_matches(tmp_path, fpn_channels):
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", fpn_channels=fpn_channels).eval()
    model.score_thresh = 0.0  # an untrained model: keep detections so there is something to compare
    res = export_onnx(model, tmp_path / "m.onnx", 160)
    assert res.path.is_file() and res.file_bytes == res.path.stat().st_size > 0
    assert res.exporter == "torchscript" and res.output_names == ["boxes", "scores", "labels"]
    assert res.verified is True and res.num_detections == model.detections_per_img
    assert res.max_abs_diff["boxes"] < 1e-3 and res.max_abs_diff["scores"] < 1e-4
    assert not list(tmp_path.glob(".*tmp"))
    _compare(model, res.path, 160)
    assert not res.dynamic_size
    with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
        run_onnx(res.path, torch.rand(3, 120, 200))  # the fixed-size file refuses other sizes


def test_dynamic_size_export_runs_any_size(tmp_path):
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", fpn_channels=64).eval()
    model.score_thresh = 0.0
    res = export_onnx(model, tmp_path / "m.onnx", 160, dynamic_size=True)
    assert res.dynamic_size and res.verified is True and any("also matches" in n for n in res.notes)
    assert _transform_resizes(res.path) == 1  # other sizes are resized to the model's
    _compare(model, res.path, 160)  # exact at the traced size
    # elsewhere ONNX's Resize and torch's interpolate map coordinates slightly differently: the
    # export checked one other size within DYNAMIC_TOL; here: other sizes run, boxes in their pixels
    out = run_onnx(res.path, torch.rand(3, 90, 130))
    assert out["boxes"][:, 2].max() <= 130 + 1e-3 and out["boxes"][:, 3].max() <= 90 + 1e-3  # input pixels


def _transform_resizes(path) -> int:
    import onnx

    return sum(n.op_type == "Resize" and n.name.startswith("/model/transform/") for n in onnx.load(str(path)).graph.node)


def test_static_export_at_the_model_size_leaves_out_the_identity_resize(tmp_path):
    """Traced at the model's own size, the transform's bilinear resize (scale 1, an exact copy that
    costs OpenVINO a reorder and a Resize) is not in the file; traced at another size it is; both
    files match PyTorch, and the caller's model keeps its resize."""
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", fpn_channels=64, min_size=96, max_size=96).eval()
    model.score_thresh = 0.0
    at_size = export_onnx(model, tmp_path / "96.onnx", 96)
    other = export_onnx(model, tmp_path / "128.onnx", 128)
    assert _transform_resizes(at_size.path) == 0 and _transform_resizes(other.path) == 1
    assert at_size.verified is True and other.verified is True
    assert at_size.max_abs_diff["boxes"] < 1e-3 and at_size.max_abs_diff["scores"] < 1e-5
    _compare(model, at_size.path, 96)
    _compare(model, other.path, 128)
    assert "resize" not in vars(model.transform)


def test_where_nothing_was_resized_the_boxes_are_not_scaled_back():
    """Inside ``no_identity_resize`` the transform's post-processing hands the boxes back as they are
    (torchvision would multiply them by 1: nodes the export need not carry); an image whose size did
    change still goes through torchvision's scaling, and the caller's model is restored after."""
    model = build_model("fcos_resnet18_slim", fpn_channels=64, min_size=96, max_size=96).eval()
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    with sexport.no_identity_resize(model, (96, 96)) as bypassed:
        assert bypassed == 1
        kept = model.transform.postprocess([{"boxes": boxes}], [(96, 96)], [(96, 96)])
        scaled = model.transform.postprocess([{"boxes": boxes}], [(96, 96)], [(192, 192)])
    assert kept[0]["boxes"] is boxes
    assert torch.equal(scaled[0]["boxes"], boxes * 2)
    assert "postprocess" not in vars(model.transform) and "resize" not in vars(model.transform)


def test_no_detections_verifies_a_relaxed_copy(tmp_path):
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim").eval()  # untrained: nothing above score_thresh=0.2
    res = export_onnx(model, tmp_path / "m.onnx", 160)
    assert res.verified is True and res.num_detections and any("score_thresh=0" in n for n in res.notes)
    assert model.score_thresh == 0.2  # the caller's model is untouched
    out = run_onnx(res.path, torch.rand(3, 160, 160))
    assert out["boxes"].shape == (0, 4)  # the written file keeps the real threshold


def test_verification_catches_a_mismatch(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", fpn_channels=64).eval()
    model.score_thresh = 0.0
    real = sexport.run_onnx

    def shifted(path, image):
        out = real(path, image)
        out["boxes"] = out["boxes"] + 1.0
        return out

    monkeypatch.setattr(sexport, "run_onnx", shifted)
    with pytest.raises(ExportError, match="does not match"):
        export_onnx(model, tmp_path / "bad.onnx", 160)
    assert not (tmp_path / "bad.onnx").exists()  # nothing half-verified is left behind


def test_metadata_is_written_and_read(tmp_path):
    model = build_model("fcos_resnet18_slim", fpn_channels=64).eval()
    res = export_onnx(model, tmp_path / "m.onnx", 96, verify=False, metadata={"model": "fcos_resnet18_slim", "macs": 123})
    assert sexport.read_metadata(res.path) == {"model": "fcos_resnet18_slim", "macs": "123"}
    assert not res.dynamic_size


def test_tied_scores_mismatch_gives_a_hint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", fpn_channels=64).eval()
    model.score_thresh = 0.0
    torch.nn.init.zeros_(model.head.classification_head.cls_logits.weight)  # every score the same
    real = sexport.run_onnx

    def reordered(path, image):  # what another implementation may do with tied detections
        out = real(path, image)
        return {k: v[::-1].copy() + (7.0 if k == "boxes" else 0) for k, v in out.items()}

    monkeypatch.setattr(sexport, "run_onnx", reordered)
    with pytest.raises(ExportError, match="share values.*--no-verify"):
        export_onnx(model, tmp_path / "tied.onnx", 96)
    assert not (tmp_path / "tied.onnx").exists()


def test_export_failure_is_a_clear_error(tmp_path):
    class NotADetector(torch.nn.Module):
        def forward(self, images):
            raise RuntimeError("boom")

    with pytest.raises(ExportError, match="does not run"):
        export_onnx(NotADetector(), tmp_path / "x.onnx", 64)


def test_fasterrcnn_mobilenet_exports_and_matches(tmp_path):
    torch.manual_seed(0)
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn").eval()
    model.roi_heads.score_thresh = 0.0
    res = export_onnx(model, tmp_path / "frcnn.onnx", 320)
    assert res.output_names == ["boxes", "scores", "labels"]  # one order for every family (torchvision: b, l, s)
    # untrained: many scores tie at the cut-off (not comparable), the others must match
    assert res.verified is True and res.num_detections and res.ambiguous < res.num_detections // 2
    assert res.max_abs_diff["boxes"] < 1e-3 and res.max_abs_diff["scores"] < 1e-5


def test_cli_export(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", fpn_channels=64)
    ckpt = save_checkpoint(tmp_path / "thin.pt", model, ModelSpec("fcos_resnet18_slim"), kind="structured")
    out = tmp_path / "thin.onnx"
    result = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(out), "--input-size", "160"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "onnxruntime matches" in result.output


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,size",
    [("retinanet_resnet50_fpn", 256), ("ssdlite320_mobilenet_v3_large", 320), ("maskrcnn_resnet50_fpn", 224)],
)
def test_other_builders_export(tmp_path, name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).eval()
    for holder in (model, getattr(model, "roi_heads", None)):
        if holder is not None and hasattr(holder, "score_thresh"):
            holder.score_thresh = 0.0
        if holder is not None and hasattr(holder, "nms_thresh"):
            holder.nms_thresh = 1.0  # random boxes overlap heavily: NMS flips on IoUs within float error
    # untrained heads score every box alike (all tied: "inconclusive", not verified): distinct norm
    # statistics and wider class weights give distinct scores, so the export can be verified
    distinct_norms(model)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and any(k in n for k in ("cls", "classification")):
                m.weight.normal_(0, 0.2)
    res = export_onnx(model, tmp_path / f"{name}.onnx", size)
    # verified means compared detection by detection with onnxruntime; None (not verified) is a failure
    assert res.verified is True, res.notes
    assert res.num_detections and res.ambiguous < res.num_detections // 2
    assert res.max_abs_diff["boxes"] < 1e-3 and res.max_abs_diff["scores"] < 1e-4
