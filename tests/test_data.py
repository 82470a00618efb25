"""Datasets: synthetic generator, COCO / VOC loaders, flips, loaders, bad data, `surgery data synth`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from surgery.config.recipe import DataSection
from surgery.data import (
    DONE_MARKER,
    CocoDetection,
    VOCDetection,
    build_dataset,
    collate_fn,
    dataset_for,
    ensure_synthetic,
    make_loader,
    synthesize,
    synthetic_dir_name,
    synthetic_options,
)
from surgery.errors import DataError

# --------------------------------------------------------------------------------------------
# helpers writing tiny datasets


def _write_image(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _coco_folder(root: Path, annotations: list[dict] | None = None, images: list[dict] | None = None) -> Path:
    """root/images/{a,b}.png (64x48) + root/annotations/instances_val.json, categories 3 and 7."""
    images = images if images is not None else [
        {"id": 10, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 20, "file_name": "b.png", "width": 64, "height": 48},
    ]  # fmt: skip
    for k, im in enumerate(images):
        _write_image(root / "images" / im["file_name"], im["width"], im["height"], seed=k)
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [4, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [30, 10, 34.5, 38], "area": 1300, "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1},
            {"id": 4, "image_id": 20, "category_id": 3, "bbox": [5, 5, 0.5, 10], "area": 5, "iscrowd": 0},
            {"id": 5, "image_id": 20, "category_id": 7, "bbox": [10, 12, 16, 20], "area": 320, "iscrowd": 0},
        ]
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    ann = root / "annotations" / "instances_val.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(coco))
    return ann


_VOC_XML = """<annotation><filename>{stem}.jpg</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
_VOC_OBJ = "<object><name>{name}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"


def _voc_folder(root: Path, objects: dict[str, list[tuple]] | None = None, split_names: list[str] | None = None) -> Path:
    """root/VOCdevkit/VOC2007 with 3 images (80x60); returns the VOCdevkit folder."""
    year = root / "VOCdevkit" / "VOC2007"
    objects = objects or {
        "000001": [("dog", 0, 10, 10, 40, 30), ("person", 1, 50, 5, 70, 50)],
        "000002": [("car", 0, 1, 1, 80, 60)],
        "000003": [("cat", 0, 20, 20, 30, 35), ("cat", 0, 40, 20, 60, 45)],
    }
    for k, (stem, objs) in enumerate(objects.items()):
        _write_image(year / "JPEGImages" / f"{stem}.jpg", 80, 60, seed=k)
        body = "".join(_VOC_OBJ.format(name=n, d=d, x1=a, y1=b, x2=c, y2=e) for n, d, a, b, c, e in objs)
        (year / "Annotations").mkdir(parents=True, exist_ok=True)
        (year / "Annotations" / f"{stem}.xml").write_text(_VOC_XML.format(stem=stem, w=80, h=60, objects=body))
    (year / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    names = split_names if split_names is not None else list(objects)
    (year / "ImageSets" / "Main" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    return root / "VOCdevkit"


@pytest.fixture
def synth(synthetic_shapes):
    """The session's synthetic set (conftest): 8 train / 4 val images, 64 px, seed 3."""
    return synthetic_shapes


# --------------------------------------------------------------------------------------------
# synthetic generator


def test_synthesize_is_deterministic_and_valid(synth, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    again = synthesize(tmp_path / "again", images=8, size=64, seed=3, val_images=4)
    for split in ("train", "val"):
        a = (synth.root / "annotations" / f"instances_{split}.json").read_bytes()
        b = (again.root / "annotations" / f"instances_{split}.json").read_bytes()
        assert a == b
    for name in ("000000.jpg", "000007.jpg"):
        pa = np.asarray(Image.open(synth.train_dir / name))
        pb = np.asarray(Image.open(again.train_dir / name))
        assert pa.shape == (64, 64, 3) and np.array_equal(pa, pb)
    other = synthesize(tmp_path / "other", images=8, size=64, seed=4, val_images=4)
    assert other.train_json.read_bytes() != synth.train_json.read_bytes()

    assert len(list(synth.train_dir.glob("*.jpg"))) == 8 and len(list(synth.val_dir.glob("*.jpg"))) == 4
    coco = COCO(str(synth.train_json))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["cross", "ellipse", "rectangle", "triangle"]
    assert len(coco.getImgIds()) == 8
    for img_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 6
        for a in anns:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w >= 4 and h >= 4
            assert a["iscrowd"] == 0 and a["area"] > 0 and len(a["segmentation"][0]) >= 6
            assert coco.annToMask(a).sum() > 0  # the polygon rasterises
    assert synth.train_objects == len(coco.getAnnIds())
    assert synth.samples.is_file() and Image.open(synth.samples).size[0] > 64
    assert (synth.root / DONE_MARKER).is_file()
    assert not [p for p in synth.root.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_synthesize_default_val_size_and_rejects_foreign_folder(tmp_path: Path) -> None:
    info = synthesize(tmp_path / "d", images=3, size=32, seed=0)
    assert info.val_images == 20 and len(list(info.val_dir.glob("*.jpg"))) == 20
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("do not delete")
    with pytest.raises(DataError, match="not a surgery synthetic dataset"):
        synthesize(foreign, images=2, size=32)
    assert (foreign / "thesis.txt").exists()
    with pytest.raises(DataError, match="size"):
        synthesize(tmp_path / "e", images=2, size=8)


def test_ensure_synthetic_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    root = ensure_synthetic(images=3, size=32, seed=1)
    assert root == tmp_path / "cache" / synthetic_dir_name(3, 32, 1)
    stamp = (root / DONE_MARKER).stat().st_mtime_ns
    assert ensure_synthetic(images=3, size=32, seed=1) == root
    assert (root / DONE_MARKER).stat().st_mtime_ns == stamp  # reused, not regenerated
    ds = build_dataset("synthetic", "val", train=False, images=3, size=32, seed=1)
    assert len(ds) == 20 and ds.num_classes == 5


def test_dataset_for_a_recipe_data_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    section = DataSection(images=3, size=32, seed=1)
    expected = {"synth_root": None, "images": 3, "size": 32, "seed": 1}
    assert synthetic_options(section) == synthetic_options(dataclasses.asdict(section)) == expected
    assert synthetic_options(None) == {"synth_root": None, "images": 2000, "size": 160, "seed": 0}
    ds = dataset_for({"images": 3, "size": 32, "seed": 1}, "val", train=False)  # a checkpoint's recipe["data"]
    assert ds.name == "synthetic" and len(ds) == 20
    assert (tmp_path / "cache" / synthetic_dir_name(3, 32, 1) / DONE_MARKER).is_file()
    with pytest.raises(DataError, match="does not exist"):  # an explicit source wins over the section's
        dataset_for(section, "val", train=False, source=f"coco:{tmp_path / 'nope'}")


# --------------------------------------------------------------------------------------------
# loaders


def _check_interface(ds, index: int = 0) -> tuple[torch.Tensor, dict]:
    img, t = ds[index]
    assert img.dtype == torch.float32 and img.dim() == 3 and img.shape[0] == 3
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1] == 4
    assert t["labels"].dtype == torch.int64 and len(t["labels"]) == len(t["boxes"])
    assert isinstance(t["image_id"], int)
    assert ds.class_names[0] == "__background__" and ds.num_classes == len(ds.class_names)
    assert sorted(ds.coco.getImgIds()) == sorted(ds.image_ids)
    return img, t


def test_coco_loader_sparse_category_ids(tmp_path: Path) -> None:
    ann = _coco_folder(tmp_path / "c")
    ds = CocoDetection(tmp_path / "c" / "images", ann, train=False)
    assert ds.class_names == ["__background__", "cat", "dog"] and ds.num_classes == 3
    assert ds.label_to_cat_id == {1: 3, 2: 7}
    img, t = _check_interface(ds, 0)
    assert img.shape == (3, 48, 64) and t["image_id"] == 10
    # crowd box skipped, the 34.5-wide box clipped to the image (within tolerance)
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].tolist() == [[4, 5, 24, 15], [30, 10, 64, 48]]
    _, t2 = ds[1]
    assert t2["labels"].tolist() == [2] and t2["boxes"].tolist() == [[10, 12, 26, 32]]  # degenerate dropped
    gt = ds.coco
    assert sorted(gt.getCatIds()) == [1, 2]
    crowd = [a for a in gt.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["category_id"] == 1  # kept for eval, as crowd
    assert len(gt.dataset["annotations"]) == 4


def test_json_source_finds_sibling_images(tmp_path: Path) -> None:
    ann = _coco_folder(tmp_path / "j")
    ds = build_dataset(str(ann), "val", train=False)
    assert len(ds) == 2 and ds.records[0].path == tmp_path / "j" / "images" / "a.png"


def test_synthetic_layout_via_coco_root(synth) -> None:
    ds = build_dataset(f"coco:{synth.root}", "train", train=False, with_masks=True)
    assert len(ds) == 8 and ds.has_masks and ds.label_to_cat_id == {1: 1, 2: 2, 3: 3, 4: 4}
    _, t = _check_interface(ds, 1)
    masks = t["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (len(t["boxes"]), 64, 64)
    for m, b in zip(masks, t["boxes"], strict=True):  # each mask lies inside its box
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert xs.min() >= b[0] - 1 and xs.max() < b[2] + 1 and ys.min() >= b[1] - 1 and ys.max() < b[3] + 1


@pytest.mark.parametrize("level", ["VOCdevkit", "VOC2007"])
def test_voc_loader(tmp_path: Path, level: str) -> None:
    devkit = _voc_folder(tmp_path)
    root = devkit if level == "VOCdevkit" else devkit / "VOC2007"
    ds = build_dataset(f"voc:{root}", "val", train=False)
    assert isinstance(ds, VOCDetection) and ds.is_voc
    assert ds.num_classes == 21 and ds.class_names[12] == "dog" and ds.class_names[15] == "person"
    img, t = _check_interface(ds, 0)
    assert img.shape == (3, 60, 80)
    assert t["labels"].tolist() == [12]  # the difficult person is not a training target
    assert t["boxes"].tolist() == [[9, 9, 40, 30]]  # 1-based inclusive -> pixel edges
    diff = [a for a in ds.coco.dataset["annotations"] if a["difficult"]]
    assert len(diff) == 1 and diff[0]["category_id"] == 15 and diff[0]["iscrowd"] == 1
    assert ds[1][1]["boxes"].tolist() == [[0, 0, 80, 60]]
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]


def test_hflip_flips_boxes_and_masks(synth) -> None:
    plain = build_dataset(f"coco:{synth.root}", "train", train=False, with_masks=True)
    flipped = build_dataset(f"coco:{synth.root}", "train", train=True, with_masks=True, hflip=1.0)
    never = build_dataset(f"coco:{synth.root}", "train", train=True, with_masks=True, hflip=0.0)
    for i in range(3):
        img, t = plain[i]
        fimg, ft = flipped[i]
        assert torch.equal(fimg, img.flip(-1))
        b = t["boxes"]
        expected = torch.stack([64 - b[:, 2], b[:, 1], 64 - b[:, 0], b[:, 3]], 1)
        assert torch.equal(ft["boxes"], expected)
        assert torch.equal(ft["masks"], t["masks"].flip(-1))
        assert torch.equal(ft["labels"], t["labels"])
        assert torch.equal(never[i][1]["boxes"], b)
    # flipped boxes stay valid and still cover their masks
    assert (ft["boxes"][:, 2] > ft["boxes"][:, 0]).all()
    assert not build_dataset(f"coco:{synth.root}", "val", train=False, hflip=1.0).hflip  # no flips for eval


def test_loader_is_seeded_and_collates(synth) -> None:
    ds = build_dataset(f"coco:{synth.root}", "train", train=False)

    def order(seed: int) -> list[int]:
        return [t["image_id"] for _, ts in make_loader(ds, 3, shuffle=True, seed=seed) for t in ts]

    assert order(5) == order(5) and sorted(order(5)) == sorted(ds.image_ids)
    assert order(5) != order(6)
    images, targets = next(iter(make_loader(ds, 3, shuffle=False)))
    assert isinstance(images, list) and len(images) == 3 and isinstance(targets, list)
    assert collate_fn([ds[0], ds[1]])[1][1]["image_id"] == ds.image_ids[1]
    assert len(make_loader(ds, 3, shuffle=False, drop_last=True)) == 2


# --------------------------------------------------------------------------------------------
# bad data


def test_missing_folders_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"COCO folder .*nope does not exist"):
        build_dataset(f"coco:{tmp_path / 'nope'}", "val", train=False)
    with pytest.raises(DataError, match=r"VOC folder .*nope does not exist"):
        build_dataset(f"voc:{tmp_path / 'nope'}", "val", train=False)
    with pytest.raises(DataError, match=r"annotation file .*missing.json does not exist"):
        build_dataset(str(tmp_path / "missing.json"), "val", train=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="instances_val2017.json"):
        build_dataset(f"coco:{tmp_path / 'empty'}", "val", train=False)
    ann = _coco_folder(tmp_path / "c")
    with pytest.raises(DataError, match=r"image folder .*elsewhere .*does not exist"):
        CocoDetection(tmp_path / "elsewhere", ann)
    (tmp_path / "c" / "images" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b\.png"):
        CocoDetection(tmp_path / "c" / "images", ann)
    with pytest.raises(DataError, match="unknown data source"):
        build_dataset("imagenet", "val", train=False)


def test_not_coco_json(tmp_path: Path) -> None:
    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps({"images": [], "labels": []}))
    with pytest.raises(DataError, match=r"labels\.json is not a COCO annotation file: missing 'annotations', 'categories'"):
        build_dataset(str(bad), "val", train=False)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        build_dataset(str(bad), "val", train=False)


def test_box_outside_image(tmp_path: Path) -> None:
    anns = [{"id": 42, "image_id": 20, "category_id": 3, "bbox": [50, 10, 20, 10], "area": 200, "iscrowd": 0}]
    ann = _coco_folder(tmp_path / "c", annotations=anns)
    with pytest.raises(DataError) as e:
        CocoDetection(tmp_path / "c" / "images", ann)
    msg = str(e.value)
    assert "instances_val.json" in msg and "annotation 42" in msg and "b.png" in msg and "outside the 64x48 image" in msg
    devkit = _voc_folder(tmp_path / "v", objects={"000009": [("dog", 0, 10, 10, 95, 30)]})
    with pytest.raises(DataError, match=r"000009\.xml: object 0 \(dog\) .* outside the 80x60 image"):
        build_dataset(f"voc:{devkit}", "val", train=False)


def test_unknown_image_and_empty_split(tmp_path: Path) -> None:
    anns = [{"id": 5, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]
    ann = _coco_folder(tmp_path / "c", annotations=anns)
    with pytest.raises(DataError, match="annotation 5 refers to unknown image id 99"):
        CocoDetection(tmp_path / "c" / "images", ann)
    ann = _coco_folder(tmp_path / "e", annotations=[], images=[])
    with pytest.raises(DataError, match=r"dataset .* split val has no images"):
        build_dataset(str(ann), "val", train=False)
    devkit = _voc_folder(tmp_path / "v", split_names=[])
    with pytest.raises(DataError, match=r"dataset voc:.* split val has no images"):
        build_dataset(f"voc:{devkit}", "val", train=False)
    with pytest.raises(DataError, match=r"VOC split file .*test\.txt does not exist"):
        build_dataset(f"voc:{devkit}", "test", train=False)


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_data_synth(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "cli-synth"
    res = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "--images", "4", "--size", "48", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert (out / "annotations" / "instances_train.json").is_file() and (out / "samples.png").is_file()
    assert len(list((out / "train").glob("*.jpg"))) == 4 and len(list((out / "val").glob("*.jpg"))) == 20
    assert "samples.png" in res.output
    bad = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--size", "8"])
    assert bad.exit_code != 0
