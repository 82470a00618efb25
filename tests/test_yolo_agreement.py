"""surgery's numbers on YOLO-format data read by surgery agree with Ultralytics' own val on the
handed-back file: the same ground truth (fast), the same mAP within 0.01 on a trained model (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from surgery.data import build_dataset, synthesize

SIZE = 64


def _val(handed: Path, data: Path, imgsz: int, tmp_path: Path):
    from ultralytics import YOLO

    # rect=False: Ultralytics' rect val batches pad each side by half a stride (128 px -> 160), which a
    # weakly trained model is sensitive to; surgery letterboxes to the model's size as training did
    return YOLO(str(handed)).val(data=str(data), imgsz=imgsz, batch=8, device="cpu", plots=False, workers=0,
                                 verbose=False, rect=False, project=str(tmp_path / "runs"), name="v")  # fmt: skip


def test_ultralytics_val_counts_the_ground_truth_surgery_reads(ultralytics, tmp_path) -> None:
    """Boxes, polygons, background and empty-label images: Ultralytics' validator counts per class
    the objects and images surgery's YOLO reader holds."""
    synthesize(tmp_path / "coco", images=4, size=SIZE, seed=2, val_images=6)
    res = CliRunner().invoke(app, ["data", "convert", f"coco:{tmp_path / 'coco'}", "--to", "yolo", "--out", str(tmp_path / "y")])
    assert res.exit_code == 0, res.output
    labels = sorted((tmp_path / "y/labels/val").iterdir())
    labels[0].write_text("2 0.1 0.1 0.4 0.15 0.3 0.5\n0 0.6 0.6 0.9 0.6 0.8 0.9 0.6 0.9\n")  # polygons
    labels[1].write_text("")  # empty: background
    labels[2].unlink()  # missing: background
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "y/images/val/extra.png")  # background, no label file
    data = tmp_path / "y/data.yaml"
    ours = build_dataset(f"yolo:{data}", "val", train=False)
    per_class = np.bincount([a["category_id"] - 1 for a in ours.coco.dataset["annotations"]], minlength=4)
    per_image = np.array([len({a["image_id"] for a in ours.coco.dataset["annotations"] if a["category_id"] == c + 1})
                          for c in range(4)])  # fmt: skip
    res = CliRunner().invoke(app, ["prune", "--model", "ultralytics:yolov8n.yaml", "-k", "nc=4", "-k", f"size={SIZE}",
                                   "--ratio", "0.5", "--macs-size", str(SIZE), "--out", str(tmp_path / "p.pt")])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["export", str(tmp_path / "p.pt"), "--format", "ultralytics", "--out", str(tmp_path / "b.pt")])
    assert res.exit_code == 0, res.output
    metrics = _val(tmp_path / "b.pt", data, SIZE, tmp_path)
    assert len(ours) == 7 and metrics.nt_per_class.tolist() == per_class.tolist()
    assert metrics.nt_per_image.tolist() == per_image.tolist() and per_class.sum() > 0


@pytest.mark.slow
def test_surgery_eval_agrees_with_ultralytics_val_on_yolo_data(ultralytics, tmp_path) -> None:
    """A YOLOv8n trained 150 steps (128 px) on a YOLO-format set: surgery eval (surgery's reader,
    COCO evaluator) and Ultralytics' val of the handed-back file agree within 0.01 mAP and mAP50."""
    synthesize(tmp_path / "coco", images=200, size=128, seed=0, val_images=40)
    runner = CliRunner()
    res = runner.invoke(app, ["data", "convert", f"coco:{tmp_path / 'coco'}", "--to", "yolo", "--out", str(tmp_path / "y")])
    assert res.exit_code == 0, res.output
    data = tmp_path / "y/data.yaml"
    res = runner.invoke(app, ["train", "--model", "ultralytics:yolov8n.yaml", "-k", "nc=4", "-k", "size=128", "--data",
                              f"yolo:{data}", "--steps", "150", "--batch-size", "16", "--no-eval", "--out",
                              str(tmp_path / "t.pt")])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(tmp_path / "t.pt"), "--format", "ultralytics", "--out", str(tmp_path / "b.pt")])
    assert res.exit_code == 0, res.output
    from surgery.measure.evaluate import evaluate
    from surgery.storage.checkpoint import load

    ours = evaluate(load(tmp_path / "t.pt"), build_dataset(f"yolo:{data}", "val", train=False), device="cpu").metrics
    theirs = _val(tmp_path / "b.pt", data, 128, tmp_path)
    assert ours["mAP"] > 0.03  # a model that finds things: agreement at 0 would prove nothing
    assert abs(ours["mAP"] - theirs.box.map) < 0.01 and abs(ours["mAP50"] - theirs.box.map50) < 0.01
    assert list(theirs.names.values()) == list(yaml.safe_load(data.read_text())["names"].values())
