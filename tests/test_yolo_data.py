"""YOLO-format datasets (``--data yolo:data.yaml``) and ``surgery data convert``, checked against
Ultralytics' own converter and label reader (another tool's answer on the same files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from surgery.data import build_dataset, synthesize
from surgery.data.yolo_format import label_file, read_labels
from surgery.data.yolo_txt import coco_to_yolo_txt, convert_dataset
from surgery.errors import DataError
from tests.extras import require


def _sorted(rec) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort(rec.boxes.T[::-1]) if len(rec.boxes) else np.arange(0)
    return rec.boxes[order], rec.labels[order]


def _same_records(a, b, atol: float = 0.01) -> None:
    assert len(a.records) == len(b.records) and a.class_names == b.class_names
    for ra, rb in zip(a.records, b.records):
        assert (ra.width, ra.height) == (rb.width, rb.height)
        ba, la = _sorted(ra)
        bb, lb = _sorted(rb)
        np.testing.assert_allclose(ba, bb, atol=atol)
        assert la.tolist() == lb.tolist()


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco") / "coco"
    synthesize(root, images=6, size=96, seed=1, val_images=5)
    return root


def test_labels_written_by_ultralytics_converter_read_as_the_coco_source(coco_set, tmp_path) -> None:
    """Ultralytics' convert_coco writes the label files; surgery reads that YOLO set and gets the
    boxes and classes the COCO reader gives for the original annotations."""
    converter = require("ultralytics.data.converter")
    cats = [c["id"] for c in json.loads((coco_set / "annotations/instances_val.json").read_text())["categories"]]
    assert sorted(cats) == list(range(1, len(cats) + 1))  # convert_coco's class is category_id - 1
    (tmp_path / "ann").mkdir()
    shutil.copy(coco_set / "annotations/instances_val.json", tmp_path / "ann")
    converter.convert_coco(str(tmp_path / "ann"), str(tmp_path / "u"), cls91to80=False)
    shutil.copytree(coco_set / "val", tmp_path / "u/images/val")
    names = {i: c["name"] for i, c in enumerate(build_dataset(f"coco:{coco_set}", "val", train=False).coco.dataset["categories"])}
    (tmp_path / "u/data.yaml").write_text(yaml.safe_dump({"path": str(tmp_path / "u"), "val": "images/val", "names": names}))
    ours = build_dataset(str(tmp_path / "u"), "val", train=False)  # a folder recognised by its data.yaml
    assert ours.name.startswith("yolo:")
    _same_records(ours, build_dataset(f"coco:{coco_set}", "val", train=False))


def test_label_path_rule_is_ultralytics_img2label_paths(tmp_path) -> None:
    utils = require("ultralytics.data.utils")
    for p in ["/d/images/train/a.jpg", "/d/images/x/images/b.v1.png", "/d/imgs/c.jpg"]:
        assert str(label_file(Path(p))) == utils.img2label_paths([p])[0]


def test_polygon_lines_become_the_boxes_ultralytics_reads(tmp_path) -> None:
    utils = require("ultralytics.data.utils")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    img = tmp_path / "images/a.png"
    Image.new("RGB", (64, 48)).save(img)
    lines = "0 0.1 0.2 0.5 0.25 0.4 0.9 0.15 0.6\n1 0.6 0.6 0.9 0.6 0.9 0.95\n1 0.6 0.6 0.9 0.6 0.9 0.95\n"
    (tmp_path / "labels/a.txt").write_text(lines)
    theirs = utils.verify_image_label((str(img), str(label_file(img)), "", False, 2, 0, 0, False))[1]
    ours = read_labels(label_file(img), nc=2)
    np.testing.assert_allclose(ours[np.lexsort(ours.T[::-1])], theirs[np.lexsort(theirs.T[::-1])], atol=1e-6)
    assert len(ours) == 2  # the duplicate polygon kept once


def _yolo_set(tmp_path: Path, lines: dict[str, str | None], names=("a", "b")) -> Path:
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for stem, text in lines.items():
            Image.new("RGB", (80, 40), (50, 60, 70)).save(tmp_path / "images" / split / f"{stem}.jpg")
            if text is not None:
                (tmp_path / "labels" / split / f"{stem}.txt").write_text(text)
    spec = {"path": str(tmp_path), "train": "images/train", "val": "images/val", "names": list(names)}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "data.yaml"


def test_boxes_names_and_background_images(tmp_path) -> None:
    data = _yolo_set(tmp_path, {"boxes": "1 0.5 0.5 0.5 0.5\n0 0.25 0.25 0.1 0.2\n", "empty": "", "none": None})
    ds = build_dataset(f"yolo:{data}", "val", train=False)
    assert ds.class_names == ["__background__", "a", "b"] and len(ds) == 3
    by_name = {r.path.stem: r for r in ds.records}
    boxes, labels = _sorted(by_name["boxes"])
    np.testing.assert_allclose(boxes, [[16, 6, 24, 14], [20, 10, 60, 30]], atol=1e-4)
    assert labels.tolist() == [1, 2]  # class index + 1
    assert len(by_name["empty"].boxes) == 0 and len(by_name["none"].boxes) == 0  # background images
    assert ds.coco.getCatIds() == [1, 2] and len(ds.coco.getAnnIds()) == 2


@pytest.mark.parametrize(
    ("line", "why"),
    [("0 nan 0.5 0.1 0.1", "NaN"), ("0 0.5 1.5 0.1 0.1", "normalised"), ("2 0.5 0.5 0.1 0.1", "class id 2"),
     ("0 0.5 0.5 0.1", "4 values"), ("zero 0.5 0.5 0.1 0.1", "not a label line"), ("0.5 0.5 0.5 0.1 0.1", "class id"),
     ("0 0.5 0.5 -0.005 0.1", "negative")],
)  # fmt: skip
def test_bad_label_line_is_one_error_naming_file_and_line(tmp_path, line: str, why: str) -> None:
    data = _yolo_set(tmp_path, {"ok": "0 0.5 0.5 0.2 0.2\n", "bad": f"1 0.5 0.5 0.2 0.2\n{line}\n"})
    with pytest.raises(DataError, match=rf"labels/val/bad\.txt:2: .*{why}"):
        build_dataset(f"yolo:{data}", "val", train=False)
    res = CliRunner().invoke(app, ["data", "convert", f"yolo:{data}", "--to", "coco", "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, DataError) and "bad.txt:2" in str(res.exception)  # main() prints it as error:


def test_yaml_spec_names_dict_nc_and_txt_image_lists(tmp_path) -> None:
    data = _yolo_set(tmp_path, {"p": "1 0.5 0.5 0.5 0.5\n", "q": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "val.txt").write_text("./images/val/q.jpg\n")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"train": ["images/train"], "val": "val.txt", "nc": 2,
                                                        "names": {0: "a", 1: "b"}}))  # no path: the yaml's folder
    ds = build_dataset(f"yolo:{tmp_path}", "val", train=False)
    assert [r.path.name for r in ds.records] == ["q.jpg"] and ds.records[0].labels.tolist() == [1]
    assert len(build_dataset(str(data), "train", train=False)) == 2
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"val": "val.txt", "nc": 3, "names": ["a", "b"]}))
    with pytest.raises(DataError, match="nc is 3 but 'names' lists 2"):
        build_dataset(f"yolo:{data}", "val", train=False)


def test_ultralytics_reads_the_converted_dataset(coco_set, tmp_path) -> None:
    """check_det_dataset (Ultralytics' own yaml reader) resolves the converted set's splits and names."""
    utils = require("ultralytics.data.utils")
    out = coco_to_yolo_txt(coco_set, tmp_path / "y")
    spec = utils.check_det_dataset(str(out.data_yaml), autodownload=False)
    assert spec["nc"] == 4 and list(spec["names"].values()) == out.names
    assert Path(spec["val"]) == tmp_path / "y/images/val"
    for img in sorted((tmp_path / "y/images/val").iterdir()):
        assert Path(utils.img2label_paths([str(img)])[0]).is_file()


def test_convert_round_trip_coco_yolo_coco_keeps_every_box(coco_set, tmp_path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["data", "convert", f"coco:{coco_set}", "--to", "yolo", "--out", str(tmp_path / "y")])
    assert res.exit_code == 0, res.output
    assert f"--data yolo:{tmp_path / 'y' / 'data.yaml'}" in " ".join(res.output.split())
    res = runner.invoke(app, ["data", "convert", str(tmp_path / "y"), "--to", "coco", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    for split in ("train", "val"):
        orig = build_dataset(f"coco:{coco_set}", split, train=False)
        _same_records(build_dataset(f"yolo:{tmp_path / 'y'}", split, train=False), orig)
        _same_records(build_dataset(f"coco:{tmp_path / 'c'}", split, train=False), orig)
    res = runner.invoke(app, ["data", "convert", f"coco:{coco_set}", "--to", "yolo", "--out", str(tmp_path / "y")])
    assert res.exception is not None and "--overwrite" in str(res.exception)


@pytest.mark.parametrize("file_name", ["../../secret.jpg", "ABS"])
def test_convert_refuses_images_outside_the_dataset_root(coco_set, tmp_path, file_name: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(coco_set, src)
    secret = tmp_path / "secret.jpg"
    shutil.copy(next((coco_set / "val").iterdir()), secret)
    ann = json.loads((src / "annotations/instances_val.json").read_text())
    ann["images"][0]["file_name"] = str(secret) if file_name == "ABS" else file_name
    (src / "annotations/instances_val.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match="outside the dataset root"):
        coco_to_yolo_txt(src, tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.samefile(secret)]


@pytest.mark.parametrize(("key", "value", "why"), [("bbox", [1, 2, float("nan"), 4], "malformed bbox"),
                                                  ("category_id", 99, "unknown category id 99"),
                                                  ("image_id", 12345, "unknown image id 12345")])  # fmt: skip
def test_convert_refuses_nan_boxes_and_unknown_ids(coco_set, tmp_path, key: str, value, why: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(coco_set, src)
    ann = json.loads((src / "annotations/instances_train.json").read_text())
    ann["annotations"][0][key] = value
    (src / "annotations/instances_train.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=why):
        convert_dataset(f"coco:{src}", tmp_path / "out", "yolo")


def test_yolo_folder_without_yaml_says_what_is_missing(tmp_path) -> None:
    (tmp_path / "images/val").mkdir(parents=True)
    (tmp_path / "labels/val").mkdir(parents=True)
    with pytest.raises(DataError, match="add the data.yaml"):
        build_dataset(f"yolo:{tmp_path}", "val", train=False)
