"""Dataset conversion (``surgery data convert SRC --to yolo|coco --out DIR``): any source surgery
reads (COCO, VOC, YOLO, the synthetic set) written as

- **yolo**, the layout Ultralytics reads: ``images/{split}/`` (hard links, or copies across file
  systems), ``labels/{split}/`` with one ``class cx cy w h`` line per object (class from 0,
  coordinates normalised to the image) and ``data.yaml`` (``path``, ``train``, ``val``[, ``test``],
  ``names``);
- **coco**, the layout ``coco:ROOT`` reads: ``{split}/`` images and ``annotations/instances_{split}.json``
  (category ids 1..K in class order).

Classes keep the source's order (COCO categories sorted by id, the order surgery's own loaders use:
YOLO class ``k`` is surgery's label ``k + 1``). What is written is what surgery trains on: crowd
(COCO) and difficult (VOC) objects are left out, boxes are clipped to the image and boxes under a
pixel dropped, polygons become boxes. The source is read by surgery's own validating readers, so a
NaN or malformed box, an unknown image or category id, is one :class:`DataError`; every image file
must lie inside the source's root folder (an annotation naming ``/abs/file`` or ``../../x.jpg`` is
refused, never linked or copied into the output).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import DataError
from ..storage.atomic import atomic_open
from .datasets import DetectionDataset
from .loader import build_dataset
from .sources import normalize_source
from .yolo_format import read_data_yaml

FORMATS = ("yolo", "coco")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class YoloTxtSet:
    """A converted dataset: where it is and what it holds (``data_yaml`` is the COCO folder for ``coco``)."""

    root: Path
    data_yaml: Path
    names: list[str]
    images: dict[str, int]  # per split
    objects: dict[str, int]


def _source_root(source: str) -> Path:
    """The folder every image of ``source`` must lie in."""
    kind, _, rest = source.partition(":")
    if kind == "yolo":
        return read_data_yaml(rest).root
    if kind in ("coco", "voc"):
        return Path(rest).expanduser()
    return Path(source).expanduser().parent.parent  # an annotation .json in ROOT/annotations/


def _splits(source: str) -> tuple[str, ...]:
    if source.startswith("yolo:"):
        return tuple(s for s in ("train", "val", "test") if s in read_data_yaml(source[5:]).splits)
    return SPLITS


def _place(file: Path, root: Path, target: Path) -> None:
    """Link (or copy) ``file`` to ``target``, refusing a file outside ``root``."""
    real, real_root = file.resolve(), root.resolve()
    if not real.is_relative_to(real_root):
        raise DataError(f"image {file} lies outside the dataset root {root}: refused (not linked or copied)")
    if not real.is_file():
        raise DataError(f"image {file} does not exist")
    try:
        os.link(real, target)
    except OSError:  # another file system
        shutil.copy2(real, target)


def _target_names(ds: DetectionDataset) -> list[str]:
    """One file name per image, unique in the split (a folder name prefixed where names collide)."""
    names = [r.path.name for r in ds.records]
    seen: set[str] = set()
    out = []
    for k, n in enumerate(names):
        out.append(n if n not in seen else f"{k}_{n}")
        seen.add(out[-1])
    return out


def _write_yolo_split(ds: DetectionDataset, split: str, root: Path, out: Path) -> int:
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    objects = 0
    for rec, name in zip(ds.records, _target_names(ds)):
        target = out / "images" / split / name
        _place(rec.path, root, target)
        lines = []
        for (x1, y1, x2, y2), label in zip(rec.boxes.tolist(), rec.labels.tolist()):
            cx, cy = (x1 + x2) / 2 / rec.width, (y1 + y2) / 2 / rec.height
            w, h = (x2 - x1) / rec.width, (y2 - y1) / rec.height
            lines.append(f"{label - 1} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
        with atomic_open(out / "labels" / split / f"{Path(name).stem}.txt") as f:
            f.write("".join(lines))
        objects += len(lines)
    return objects


def _write_coco_split(ds: DetectionDataset, split: str, root: Path, out: Path) -> int:
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k, (rec, name) in enumerate(zip(ds.records, _target_names(ds)), start=1):
        _place(rec.path, root, out / split / name)
        images.append({"id": k, "file_name": name, "width": rec.width, "height": rec.height})
        for (x1, y1, x2, y2), label in zip(rec.boxes.tolist(), rec.labels.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": int(label), "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})  # fmt: skip
    cats = [{"id": i, "name": n} for i, n in enumerate(ds.class_names[1:], start=1)]
    with atomic_open(out / "annotations" / f"instances_{split}.json") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return len(anns)


def convert_dataset(src: str | Path, out: str | Path, to: str) -> YoloTxtSet:
    """Write the dataset ``src`` (any source string surgery reads) into ``out`` (new or empty) in
    the ``to`` layout (``"yolo"`` or ``"coco"``, see the module docstring)."""
    if to not in FORMATS:
        raise DataError(f"unknown dataset format {to!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder: the converted set needs a new folder")
    source = normalize_source(str(src))
    if source == "synthetic":
        raise DataError("convert a synthetic set by its folder (surgery data synth --out DIR, then --data coco:DIR)")
    root = _source_root(source)
    names: list[str] | None = None
    images: dict[str, int] = {}
    objects: dict[str, int] = {}
    for split in _splits(source):
        ds = build_dataset(source, split, train=False)
        if names is not None and ds.class_names != names:
            raise DataError(f"{src}: the splits list different classes ({names[1:]} vs {ds.class_names[1:]})")
        names = ds.class_names
        write = _write_yolo_split if to == "yolo" else _write_coco_split
        objects[split] = write(ds, split, root, out)
        images[split] = len(ds)
    assert names is not None
    if to == "coco":
        return YoloTxtSet(out, out, names[1:], images, objects)
    data_yaml = out / "data.yaml"
    spec = {"path": str(out.resolve()), **{s: f"images/{s}" for s in images}, "names": dict(enumerate(names[1:]))}
    with atomic_open(data_yaml) as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return YoloTxtSet(out, data_yaml, names[1:], images, objects)


def coco_to_yolo_txt(src: str | Path, out: str | Path) -> YoloTxtSet:
    """Convert the COCO folder ``src`` (``annotations/instances_{train,val}.json`` + ``train/`` and
    ``val/`` image folders) into ``out`` (new or empty) in the YOLO layout."""
    return convert_dataset(f"coco:{src}", out, "yolo")
