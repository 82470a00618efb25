"""Hostile recipes and datasets: duplicate YAML keys and empty recipes are refused (YAML would keep
the last key silently, an empty file would run the defaults), malformed boxes are refused, and the
data a checkpoint was trained on travels through prune to eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from surgery.config.recipe import load_recipe
from surgery.errors import DataError, RecipeError


def _cli(*args: str) -> tuple[int, str]:
    from surgery.errors import SurgeryError

    res = CliRunner().invoke(app, list(args))
    if isinstance(res.exception, SurgeryError):
        return 2, f"error: {res.exception}"
    return res.exit_code, res.output


@pytest.mark.parametrize(
    "text,key,lines",
    [("train:\n  steps: 2\n  steps: 100000\n", "steps", (3, 2)),
     ("train:\n  steps: 2\nprune:\n  ratio: 0.3\ntrain:\n  lr: 0.1\n", "train", (5, 1))],
)  # fmt: skip
def test_duplicate_keys_are_refused(tmp_path, text, key, lines) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert f"duplicate key {key!r} at line {lines[0]} (first at line {lines[1]})" in msg and str(path) in msg
    code, out = _cli("prune", "--model", "fcos_resnet18_slim", "--recipe", str(path), "--out", str(tmp_path / "p.pt"))
    assert code == 2 and "duplicate key" in out and not (tmp_path / "p.pt").exists()


def test_merge_keys_still_override(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("base: &b {steps: 2, lr: 0.01}\ntrain:\n  <<: *b\n  steps: 5\n")
    with pytest.raises(RecipeError, match="base"):  # an unknown section, but no duplicate-key error
        load_recipe(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "---\n"])
def test_empty_recipe_is_refused(tmp_path, text) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(path)


def _coco(tmp_path: Path, bbox: list[float]) -> Path:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "a.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox, "area": 1, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }))  # fmt: skip
    return ann


def test_negative_box_is_refused(tmp_path) -> None:
    from surgery.data.coco import load_coco_ground_truth

    ann = _coco(tmp_path, [10, 10, -5, -5])
    with pytest.raises(DataError, match="negative width or height"):
        load_coco_ground_truth(ann, tmp_path / "images")


def test_tiny_box_is_still_dropped(tmp_path) -> None:
    from surgery.data.coco import load_coco_ground_truth

    gt = load_coco_ground_truth(_coco(tmp_path, [10, 10, 0.5, 3]), tmp_path / "images")
    assert sum(len(r.boxes) for r in gt.records) == 0


def test_prune_keeps_the_data_the_checkpoint_was_trained_on(tmp_path) -> None:
    from surgery.config.recipe import recipe_from_dict
    from surgery.data import synthesize
    from surgery.detectors.builders import ModelSpec, build_model
    from surgery.storage.checkpoint import read_checkpoint, save_checkpoint
    from surgery.workflows import prune_and_save

    root = synthesize(tmp_path / "coco", images=4, size=64, seed=1, val_images=2).root
    spec = ModelSpec("fcos_resnet18_slim", {"num_classes": 5, "min_size": 64, "max_size": 64, "fpn_channels": 64})
    trained = recipe_from_dict({"data": {"source": f"coco:{root}"}}, "test")
    base = save_checkpoint(tmp_path / "base.pt", build_model(spec), spec, recipe=trained.to_dict())
    rec = recipe_from_dict({"prune": {"ratio": 0.25, "method": "l1"}}, "test")
    assert rec.data.source == "synthetic"  # nothing said about the data
    out = prune_and_save(str(base), rec, tmp_path / "pruned.pt")
    assert read_checkpoint(out.path).recipe["data"]["source"] == f"coco:{root}"
    explicit = recipe_from_dict({"prune": {"ratio": 0.25, "method": "l1"}, "data": {"source": "synthetic", "images": 40}}, "t")
    out2 = prune_and_save(str(base), explicit, tmp_path / "pruned2.pt")
    assert read_checkpoint(out2.path).recipe["data"]["source"] == "synthetic"  # what the user said wins
