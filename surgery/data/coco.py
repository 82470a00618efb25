"""COCO-format annotation files: parsing, validation and :class:`CocoDetection`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .datasets import DetectionDataset, _check_box, _GroundTruth, _Record


def _read_coco_json(ann_file: Path) -> dict[str, Any]:
    if not ann_file.is_file():
        what = "is not a file" if ann_file.exists() else "does not exist"
        raise DataError(f"annotation file {ann_file} {what}")
    try:
        data = json.loads(ann_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file {ann_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{ann_file} is not a COCO annotation file: expected a JSON object with images, annotations, categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{ann_file} is not a COCO annotation file: missing {', '.join(repr(k) for k in missing)} list(s)")
    return data


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_coco_lists(data: dict[str, Any], ann_file: Path) -> None:
    """Every image, annotation and category entry is a mapping with integer ids (the file is
    refused with one line otherwise, not a traceback deep in the loader)."""
    for k, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_id(c.get("id")):
            raise DataError(f"{ann_file}: category entry {k} has no integer 'id' (got {c!r:.80})")
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{ann_file}: image entry {k} is not an object")
        if "id" in im and not _is_id(im["id"]):
            raise DataError(f"{ann_file}: image entry {k} has id {im['id']!r}; expected an integer")
        for key in ("width", "height"):
            v = im.get(key)
            if v is not None and (not _is_id(v) or not 0 < v <= 65_535):
                raise DataError(f"{ann_file}: image entry {k} has {key} {v!r}; expected an integer in [1, 65535]")
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{ann_file}: annotation entry {k} is not an object")
        for key in ("image_id", "category_id"):
            if key in a and not _is_id(a[key]):
                raise DataError(f"{ann_file}: annotation entry {k} has {key} {a[key]!r}; expected an integer")


def load_coco_ground_truth(ann_file: Path, images_dir: Path | Sequence[Path]) -> _GroundTruth:
    """Parse and validate a COCO annotation file. ``images_dir`` may list candidate folders: the
    first one holding the first image's ``file_name`` is used."""
    data = _read_coco_json(ann_file)
    check_coco_lists(data, ann_file)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    if not cats:
        raise DataError(f"{ann_file}: 'categories' is empty")
    cat_to_label = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
    if len(cat_to_label) != len(cats):
        raise DataError(f"{ann_file}: duplicate category ids")
    images = data["images"]
    for k, im in enumerate(images):
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                raise DataError(f"{ann_file}: image entry {k} has no {key!r}")
    root = _image_root(ann_file, images, images_dir)
    by_id: dict[int, dict[str, Any]] = {}
    for im in images:
        if int(im["id"]) in by_id:
            raise DataError(f"{ann_file}: duplicate image id {im['id']}")
        by_id[int(im["id"])] = im
    gt_anns, per_image = _annotations(ann_file, data["annotations"], by_id, cat_to_label)
    records = [_record(im, root, per_image[int(im["id"])]) for im in images]
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        raise DataError(f"{ann_file}: {len(missing)} image file(s) do not exist, e.g. {missing[0]}")
    gt_cats = []
    for i, c in enumerate(cats):
        gc = {k: v for k, v in c.items() if k in ("name", "supercategory", "keypoints", "skeleton")}
        gc["id"] = i + 1
        gc.setdefault("name", str(c["id"]))
        gt_cats.append(gc)
    gt = {
        "info": data.get("info", {}),
        "images": [{k: im[k] for k in ("id", "file_name", "width", "height")} for im in images],
        "annotations": gt_anns,
        "categories": gt_cats,
    }
    return _GroundTruth(
        records=records,
        class_names=[str(c.get("name", c["id"])) for c in cats],
        label_to_cat_id={lab: cid for cid, lab in cat_to_label.items()},
        gt=gt,
    )


def _image_root(ann_file: Path, images: list[dict[str, Any]], images_dir: Path | Sequence[Path]) -> Path:
    """The candidate folder holding the first image's file."""
    candidates = [Path(images_dir)] if isinstance(images_dir, (str, Path)) else [Path(p) for p in images_dir]
    root = candidates[0]
    if not images:
        return root
    first = images[0]["file_name"]
    found = [c for c in candidates if (c / first).is_file()]
    if found:
        return found[0]
    if len(candidates) == 1 and not root.is_dir():
        raise DataError(f"image folder {root} (for {ann_file}) does not exist")
    where = ", ".join(str(c) for c in candidates)
    raise DataError(f"{ann_file}: cannot find image {first!r} in {where}")


def _annotations(
    ann_file: Path, anns: list[dict[str, Any]], by_id: dict[int, dict[str, Any]], cat_to_label: dict[int, int]
) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    """The ground-truth annotations (contiguous labels, boxes clipped to the image; degenerate ones
    dropped) and the same grouped per image id."""
    per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in by_id}
    gt_anns: list[dict[str, Any]] = []
    need_ids = any(not a.get("id") for a in anns)
    for k, a in enumerate(anns):
        aid = a.get("id", k + 1)
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise DataError(f"{ann_file}: annotation {aid} has no {key!r}")
        img = by_id.get(int(a["image_id"]))
        if img is None:
            raise DataError(f"{ann_file}: annotation {aid} refers to unknown image id {a['image_id']}")
        label = cat_to_label.get(int(a["category_id"]))
        if label is None:
            raise DataError(f"{ann_file}: annotation {aid} has unknown category id {a['category_id']}")
        box = _clipped_box(ann_file, aid, a["bbox"], img)
        if box is None:
            continue
        x1, y1, x2, y2 = box
        g = dict(a)
        g.update(
            id=len(gt_anns) + 1 if need_ids else aid,
            category_id=label,
            bbox=[x1, y1, x2 - x1, y2 - y1],
            area=float(a.get("area") or (x2 - x1) * (y2 - y1)),
            iscrowd=int(bool(a.get("iscrowd", 0))),
        )
        gt_anns.append(g)
        per_image[int(img["id"])].append(g)
    return gt_anns, per_image


def _clipped_box(ann_file: Path, aid: Any, bbox: Any, img: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """``bbox`` (xywh) as xyxy clipped to the image; ``None`` for a degenerate box."""
    try:
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise ValueError("not finite")
    except (TypeError, ValueError):
        raise DataError(f"{ann_file}: annotation {aid} has a malformed bbox {bbox!r} (expected [x, y, w, h] of finite numbers)") from None
    if w < 0 or h < 0:  # not a tiny box but a malformed one ([10, 10, -5, -5]): refused, not dropped
        raise DataError(
            f"{ann_file}: annotation {aid} has bbox [{x:g}, {y:g}, {w:g}, {h:g}] with a negative width or "
            "height (COCO boxes are [x, y, width, height])"
        )
    if w < 1 or h < 1:
        return None  # under a pixel wide: no object to learn (COCO holds a few), dropped
    clipped = _check_box(x, y, w, h, int(img["width"]), int(img["height"]))
    if clipped is None:
        raise DataError(
            f"{ann_file}: annotation {aid} of image {img['id']} ({img['file_name']}) has box "
            f"[{x:g}, {y:g}, {w:g}, {h:g}] (xywh) outside the {img['width']}x{img['height']} image"
        )
    x1, y1, x2, y2 = clipped
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return x1, y1, x2, y2


def _record(im: dict[str, Any], root: Path, anns: list[dict[str, Any]]) -> _Record:
    """One image's training targets (crowd annotations stay in the ground truth only)."""
    objs = [g for g in anns if not g["iscrowd"]]
    boxes = np.array([[g["bbox"][0], g["bbox"][1], g["bbox"][0] + g["bbox"][2], g["bbox"][1] + g["bbox"][3]] for g in objs], dtype=np.float32)
    segs = [g.get("segmentation") for g in objs]
    return _Record(
        image_id=int(im["id"]),
        path=root / im["file_name"],
        width=int(im["width"]),
        height=int(im["height"]),
        boxes=boxes.reshape(-1, 4),
        labels=np.array([g["category_id"] for g in objs], dtype=np.int64),
        segs=segs if all(s for s in segs) else None,
    )


class CocoDetection(DetectionDataset):
    """A COCO-format dataset: images in ``images_dir``, annotations in ``ann_file``.

    Category ids may be sparse (COCO's 1..90): they map to contiguous labels 1..K in id order and
    back through ``label_to_cat_id``.
    """

    def __init__(
        self,
        images_dir: str | Path | Sequence[str | Path],
        ann_file: str | Path,
        *,
        train: bool = False,
        with_masks: bool = False,
        hflip: float = 0.5,
        name: str | None = None,
        split: str = "",
    ) -> None:
        ann_file = Path(ann_file).expanduser()
        dirs = [Path(images_dir)] if isinstance(images_dir, (str, Path)) else [Path(p) for p in images_dir]
        data = load_coco_ground_truth(ann_file, dirs)
        self.ann_file = ann_file
        super().__init__(
            data, name=name or str(ann_file), split=split or ann_file.stem, train=train, with_masks=with_masks, hflip=hflip
        )
