"""Ultralytics' task heads (Segment, Pose, OBB and their YOLO26 forms), built offline from the yamls
the package ships: pruned through the graph with the mask prototypes, mask coefficients, keypoints
and angles as outputs (never cut), zeroed-channel equivalence, a train step, reload, hand-back."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from surgery.detectors.builders import ModelSpec, build_model
from surgery.storage.checkpoint import load
from tests.extras import require
from tests.test_equivalence import _images, check_zeroed_cut_is_identity
from tests.yolo_helpers import SIZE, prune_with_cli, train_step

FAST = ["yolov8n-seg.yaml", "yolo11n-pose.yaml", "yolo26n-obb.yaml"]
SLOW = ["yolov8n-pose.yaml", "yolov8n-obb.yaml", "yolo11n-seg.yaml", "yolo11n-obb.yaml", "yolo26n-seg.yaml",
        "yolo26n-pose.yaml"]  # fmt: skip
ALL = FAST + [pytest.param(y, marks=pytest.mark.slow) for y in SLOW]


def _task_outputs(net: nn.Module) -> dict[str, int]:
    """Output widths the task head must keep: mask prototypes and coefficients, keypoints, angles."""
    head = net.model[-1]
    out: dict[str, int] = {}
    if hasattr(head, "proto"):
        out["proto"] = head.proto.cv3.conv.out_channels
    # Pose26 computes keypoints in cv4_kpts / cv4_sigma from a hidden cv4 (prunable); the others in cv4
    names = [n for n in ("cv4_kpts", "cv4_sigma", "one2one_cv4_kpts", "one2one_cv4_sigma") if hasattr(head, n)] \
        or [n for n in ("cv4", "one2one_cv4") if getattr(head, n, None) is not None]  # fmt: skip
    for name in names:
        for i, seq in enumerate(getattr(head, name)):
            out[f"{name}.{i}"] = [c for c in seq.modules() if isinstance(c, nn.Conv2d)][-1].out_channels
    return out


@pytest.mark.parametrize("yaml", ALL)
def test_task_head_zeroed_channels_cut_leaves_outputs_unchanged(yaml: str) -> None:
    require("ultralytics")
    torch.manual_seed(0)
    model = build_model(ModelSpec(f"ultralytics:{yaml}", {"nc": 3, "size": SIZE}))
    check_zeroed_cut_is_identity(model, _images(SIZE), trace_size=SIZE)


@pytest.mark.parametrize("yaml", ALL)
def test_task_head_prunes_trains_reloads_and_goes_back(yaml: str, tmp_path, ultralytics) -> None:
    from ultralytics import YOLO

    dense, model, out = prune_with_cli(yaml, tmp_path)
    kept = _task_outputs(dense.net)
    assert kept and _task_outputs(model.net) == kept  # prototypes / keypoints / angles are never cut
    again = load(out)
    model.eval()
    batch = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.predict(batch), again.predict(batch)))
    losses = train_step(again)
    assert sum(losses.values()) > 0 and len(losses) >= 4  # the task's own terms (seg / pose+kobj / angle)
    handed = tmp_path / "back.pt"
    res = CliRunner().invoke(app, ["export", str(out), "--format", "ultralytics", "--out", str(handed)])
    assert res.exit_code == 0, res.output
    theirs = YOLO(str(handed))
    assert theirs.task == model.task
    assert sum(p.numel() for p in theirs.model.parameters()) == sum(p.numel() for p in model.net.parameters())
    model._sync_widths()
    with torch.no_grad():
        model.net.model[-1].__dict__.pop("_end2end", None)
        a, b = theirs.model.eval()(batch), model.net.eval()(batch)
        torch.testing.assert_close(a[0] if isinstance(a, tuple) else a, b[0] if isinstance(b, tuple) else b)
