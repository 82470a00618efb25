"""The hand-back to Ultralytics (``surgery export --format ultralytics``,
:mod:`surgery.yolo.ultralytics_handback`): Ultralytics reads the checkpoint's class names under its
own indices (surgery's label 0 is the background, Ultralytics' class 0 is the first object class)."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from cli.main import app
from surgery.checkpoint import save_checkpoint
from surgery.models import ModelSpec, build_model

SIZE = 96
NAMES = ["__background__", "cat", "dog", "bird"]


def test_handed_back_model_names_each_class_as_surgery_does(tmp_path: Path, ultralytics) -> None:
    from ultralytics import YOLO

    spec = ModelSpec("ultralytics:yolov8n.yaml", {"nc": 3, "size": SIZE})
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(spec), spec, class_names=NAMES)
    out = tmp_path / "back.pt"
    res = CliRunner().invoke(app, ["export", str(ckpt), "--format", "ultralytics", "--out", str(out)])
    assert res.exit_code == 0, res.output
    # surgery label i (1..nc) is Ultralytics class i - 1: the same name on both sides
    assert YOLO(str(out)).names == {i - 1: NAMES[i] for i in range(1, len(NAMES))}
