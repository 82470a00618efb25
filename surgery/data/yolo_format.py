"""YOLO-format datasets (the layout Ultralytics and Roboflow write): ``--data yolo:data.yaml``.

The dataset yaml follows Ultralytics' dataset spec: ``path`` (the root; relative to the working
folder when that exists, else to the yaml's folder), ``train`` / ``val`` / ``test`` (each a folder
of images searched recursively, a ``.txt`` file listing image paths, one a line, ``./x`` relative to
the list's folder, or a list of such), ``names`` (a list, or a dict ``{index: name}`` with indices
``0..nc-1``) and optionally ``nc`` (must equal the number of names; ``names`` defaults to
``class0..``). An image's labels are the file found by replacing the last ``/images/`` of its path
with ``/labels/`` and its suffix with ``.txt``; no file or an empty file is a background image.
Each label line is ``cls cx cy w h`` normalised to the image (``cls`` from 0); a line with more
than 6 values is a segment polygon ``cls x1 y1 x2 y2 ...`` and becomes its bounding box, as
Ultralytics does (when one line of a file is a polygon, every line of it is read as one). Unlike
Ultralytics, which skips a "corrupt" image with a warning, a bad line (wrong count, not a number,
NaN, coordinates outside [0, 1] by more than Ultralytics' 1% tolerance, class id >= nc, box and polygon
lines mixed in one file) is one :class:`DataError` naming the file and line:
a dataset that trains on part of itself gives numbers that cannot be compared.

Surgery's labels are the class index + 1 (0 is the background); ``label_to_cat_id`` maps back to
the class index. Exact duplicate lines are kept once (Ultralytics drops them too).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import DataError
from .datasets import DetectionDataset, _GroundTruth, _Record
from .images import image_header
from .sources import MAX_YAML_BYTES

IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}
SPLITS = ("train", "val", "test")
COORD_TOLERANCE = 0.01  # Ultralytics' own: a 1% overshoot (rounding) is clipped, more is an error
MIN_BOX_PIXELS = 1.0  # boxes under a pixel wide are dropped, as the COCO reader does


@dataclass(frozen=True)
class YoloDataYaml:
    """A parsed dataset yaml: the root, the image sources of each split present, the class names."""

    file: Path
    root: Path
    splits: dict[str, list[Path]]
    names: list[str]


def _names(spec: dict[str, Any], file: Path) -> list[str]:
    names, nc = spec.get("names"), spec.get("nc")
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
        raise DataError(f"{file}: nc must be a positive integer, got {nc!r}")
    if names is None:
        if nc is None:
            raise DataError(f"{file}: the dataset yaml has neither 'names' nor 'nc'")
        return [f"class{i}" for i in range(nc)]
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(names))):
            raise DataError(f"{file}: 'names' keys must be the class indices 0..{len(names) - 1}, got {keys[:10]}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise DataError(f"{file}: 'names' must be a non-empty list or a dict {{index: name}}")
    if nc is not None and nc != len(names):
        raise DataError(f"{file}: nc is {nc} but 'names' lists {len(names)} classes")
    return [str(n) for n in names]


def read_data_yaml(file: str | Path) -> YoloDataYaml:
    """Parse a dataset yaml (see the module docstring); the splits' paths are resolved, not listed."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise DataError(f"YOLO dataset yaml {file} does not exist")
    if file.stat().st_size > MAX_YAML_BYTES:
        raise DataError(f"YOLO dataset yaml {file} is over {MAX_YAML_BYTES >> 20} MiB: not a dataset yaml")
    try:
        spec = yaml.safe_load(file.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{file} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{file} is not a YOLO dataset yaml (expected keys path, train, val, names)")
    root = Path(str(spec.get("path") or file.parent)).expanduser()
    if not root.is_absolute() and not root.exists():
        root = file.parent / root
    splits: dict[str, list[Path]] = {}
    for split in SPLITS:
        value = spec.get(split)
        if value in (None, ""):
            continue
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and v for v in items):
            raise DataError(f"{file}: {split!r} must be a path or a list of paths, got {value!r:.100}")
        splits[split] = [p if p.is_absolute() else root / p for p in (Path(v).expanduser() for v in items)]
    if not splits:
        raise DataError(f"{file}: the dataset yaml names no split (train, val or test)")
    return YoloDataYaml(file, root, splits, _names(spec, file))


def image_files(sources: list[Path], where: str) -> list[Path]:
    """The images of a split, sorted: every image under each folder, or each path a ``.txt`` lists."""
    found: list[Path] = []
    for src in sources:
        if src.is_dir():
            found += [p for p in src.rglob("*.*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif src.is_file() and src.suffix.lower() == ".txt":
            for line in src.read_text().splitlines():
                line = line.strip()
                if line:
                    found.append(src.parent / line[2:] if line.startswith("./") else Path(line))
        else:
            raise DataError(f"{where}: {src} is neither an image folder nor a .txt list of images")
    images = sorted({p for p in found if p.suffix.lower() in IMAGE_SUFFIXES})
    if not images:
        raise DataError(f"{where}: no images in {', '.join(map(str, sources))}")
    return images


def label_file(image: Path) -> Path:
    """The label file of an image: the last ``/images/`` of its path replaced by ``/labels/``, the
    suffix by ``.txt`` (Ultralytics' rule)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def read_labels(file: Path, nc: int) -> np.ndarray:
    """``[N, 5]`` float rows ``cls cx cy w h`` of a label file (polygons as their boxes, duplicates
    dropped); an empty ``[0, 5]`` for a missing or empty file. Bad lines raise one DataError."""
    if not file.is_file():
        return np.zeros((0, 5), dtype=np.float64)
    rows: list[tuple[int, list[float]]] = []
    try:
        text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is allowed, as in Ultralytics
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read label file {file}: {e}") from None
    for k, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise DataError(f"{file}:{k}: not a label line of numbers: {line.strip()[:80]!r}") from None
        if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
            raise DataError(f"{file}:{k}: expected 'cls cx cy w h' (5 values) or a polygon 'cls x1 y1 x2 y2 x3 y3 ...' "
                            f"(an odd count over 6), got {len(values)} values")  # fmt: skip
        rows.append((k, values))
    polygons = any(len(v) > 6 for _, v in rows)
    boxes = [k for k, v in rows if len(v) == 5]
    if polygons and boxes:
        raise DataError(f"{file}:{boxes[0]}: a box line in a file of polygon lines (Ultralytics refuses the mix too)")
    out = []
    for k, values in rows:
        cls, coords = values[0], values[1:]
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{file}:{k}: NaN or infinite value")
        if cls != int(cls) or not 0 <= cls < nc:
            raise DataError(f"{file}:{k}: class id {cls:g} is not one of 0..{nc - 1} (the dataset yaml's {nc} names)")
        if any(v < -COORD_TOLERANCE or v > 1 + COORD_TOLERANCE for v in coords):
            raise DataError(f"{file}:{k}: coordinates must be normalised to [0, 1] (got {' '.join(f'{v:g}' for v in coords)})")
        if not polygons and (coords[2] < 0 or coords[3] < 0):
            raise DataError(f"{file}:{k}: negative box width or height")
        coords = [min(1.0, max(0.0, v)) for v in coords]
        if polygons:  # a polygon (or a box read as the 2 points cx,cy and w,h, as Ultralytics does)
            xs, ys = coords[0::2], coords[1::2]
            x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
            coords = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        out.append([cls, *coords])
    if not out:
        return np.zeros((0, 5), dtype=np.float64)
    return np.unique(np.array(out, dtype=np.float64), axis=0)


def _record(image_id: int, path: Path, nc: int) -> tuple[_Record, list[dict[str, Any]]]:
    try:
        with image_header(path) as im:
            width, height = im.size  # header only
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    rows = read_labels(label_file(path), nc)
    boxes, labels, anns = [], [], []
    for cls, cx, cy, w, h in rows:
        x1, y1 = max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height)
        x2, y2 = min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height)
        if x2 - x1 < MIN_BOX_PIXELS or y2 - y1 < MIN_BOX_PIXELS:
            continue
        boxes.append([x1, y1, x2, y2])
        labels.append(int(cls) + 1)
        anns.append({"image_id": image_id, "category_id": int(cls) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})  # fmt: skip
    rec = _Record(image_id=image_id, path=path, width=width, height=height,
                  boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4), labels=np.array(labels, dtype=np.int64))  # fmt: skip
    return rec, anns


def load_yolo_ground_truth(data: YoloDataYaml, split: str) -> _GroundTruth:
    """The records and COCO-format ground truth of one split of a YOLO-format dataset."""
    if split not in data.splits:
        raise DataError(f"{data.file} has no {split!r} split (it lists {', '.join(data.splits)})")
    nc = len(data.names)
    records, images, anns = [], [], []
    for k, path in enumerate(image_files(data.splits[split], f"{data.file} {split}"), start=1):
        rec, rec_anns = _record(k, path, nc)
        records.append(rec)
        name = str(path.relative_to(data.root)) if path.is_relative_to(data.root) else str(path)
        images.append({"id": k, "file_name": name, "width": rec.width, "height": rec.height})
        anns += rec_anns
    for i, a in enumerate(anns, start=1):
        a["id"] = i
    gt = {"info": {"description": f"YOLO dataset {data.file} {split}"}, "images": images, "annotations": anns,
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(data.names)]}  # fmt: skip
    return _GroundTruth(records, list(data.names), {i + 1: i for i in range(nc)}, gt)


class YoloDetection(DetectionDataset):
    """A split of a YOLO-format dataset (``data.yaml``, see the module docstring)."""

    def __init__(
        self,
        data_yaml: str | Path,
        split: str = "train",
        *,
        train: bool = False,
        hflip: float = 0.5,
        with_masks: bool = False,
        name: str | None = None,
    ) -> None:
        data = read_data_yaml(data_yaml)
        self.data_yaml = data.file
        self.root = data.root
        super().__init__(load_yolo_ground_truth(data, split), name=name or f"yolo:{data_yaml}", split=split,
                         train=train, with_masks=False, hflip=hflip)  # fmt: skip
