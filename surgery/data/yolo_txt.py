"""A COCO-format folder (the synthetic set's layout) converted to the YOLO txt layout Ultralytics
reads: ``images/{train,val}/`` (hard links, or copies across file systems), ``labels/{train,val}/``
with one ``class cx cy w h`` line per object (class from 0, coordinates normalised to the image),
and ``data.yaml`` (``path``, ``train``, ``val``, ``names``). Classes are the COCO categories sorted
by id, the order surgery's own loaders use (label ``k`` here is surgery's label ``k + 1``). Crowd
objects are left out, as they are no training targets in surgery either.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..atomic import atomic_open
from ..errors import DataError
from .coco import _read_coco_json

SPLITS = ("train", "val")


@dataclass(frozen=True)
class YoloTxtSet:
    root: Path
    data_yaml: Path
    names: list[str]
    images: dict[str, int]  # per split
    objects: dict[str, int]


def coco_to_yolo_txt(src: str | Path, out: str | Path) -> YoloTxtSet:
    """Convert ``src`` (``annotations/instances_{train,val}.json`` + ``train/`` and ``val/`` image
    folders) into ``out`` (new or empty). Returns where things are."""
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder: the YOLO txt set needs a new folder")
    names: list[str] | None = None
    images: dict[str, int] = {}
    objects: dict[str, int] = {}
    for split in SPLITS:
        data = _read_coco_json(src / "annotations" / f"instances_{split}.json")
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        split_names = [str(c["name"]) for c in cats]
        if names is not None and split_names != names:
            raise DataError(f"{src}: train and val list different categories ({names} vs {split_names})")
        names = split_names
        cls_of = {int(c["id"]): i for i, c in enumerate(cats)}
        lines: dict[int, list[str]] = {int(im["id"]): [] for im in data["images"]}
        size = {int(im["id"]): (float(im["width"]), float(im["height"])) for im in data["images"]}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            w_img, h_img = size[int(ann["image_id"])]
            x, y, w, h = (float(v) for v in ann["bbox"])
            cx, cy = (x + w / 2) / w_img, (y + h / 2) / h_img
            lines[int(ann["image_id"])].append(
                f"{cls_of[int(ann['category_id'])]} {cx:.6f} {cy:.6f} {w / w_img:.6f} {h / h_img:.6f}"
            )
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for im in data["images"]:
            file = src / split / im["file_name"]
            if not file.is_file():
                raise DataError(f"{src}: image {file} listed in instances_{split}.json does not exist")
            target = out / "images" / split / Path(im["file_name"]).name
            try:
                os.link(file, target)
            except OSError:  # another file system
                shutil.copy2(file, target)
            with atomic_open(out / "labels" / split / f"{target.stem}.txt") as f:
                f.write("".join(f"{line}\n" for line in lines[int(im["id"])]))
        images[split] = len(data["images"])
        objects[split] = sum(len(v) for v in lines.values())
    assert names is not None
    data_yaml = out / "data.yaml"
    spec = {"path": str(out.resolve()), "train": "images/train", "val": "images/val", "names": dict(enumerate(names))}
    with atomic_open(data_yaml) as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return YoloTxtSet(out, data_yaml, names, images, objects)
