"""Pascal VOC (``VOCdevkit/VOC2007``-style folders): XML parsing and :class:`VOCDetection`."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .datasets import DetectionDataset, _check_box, _GroundTruth, _Record
from .images import image_header

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def _voc_year_dir(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"VOC folder {root} does not exist")
    if (root / "Annotations").is_dir():
        return root
    for cand in (root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (cand / "Annotations").is_dir():
            return cand
    found = sorted(p for base in (root, root / "VOCdevkit") if base.is_dir() for p in base.glob("VOC*") if (p / "Annotations").is_dir())
    if len(found) == 1:
        return found[0]
    raise DataError(
        f"{root} is not a VOC folder: expected Annotations/, JPEGImages/ and ImageSets/Main/ in it or in its VOC2007/ "
        + (f"(several candidates: {', '.join(p.name for p in found)})" if found else "")
    )


def _xml_text(node: ET.Element | None, tag: str, xml: Path) -> str:
    child = node.find(tag) if node is not None else None
    if child is None or child.text is None:
        raise DataError(f"{xml}: missing <{tag}>")
    return child.text.strip()


def _voc_object(
    obj: Any, k: int, xml: Path, label_of: dict[str, int], width: int, height: int
) -> tuple[float, float, float, float, int, int] | None:
    """One ``<object>``: its box clipped to the image (continuous pixel edges), label and
    ``difficult`` flag; ``None`` for a box under a pixel wide."""
    cname = _xml_text(obj, "name", xml)
    label = label_of.get(cname.lower())
    if label is None:
        raise DataError(f"{xml}: object {k} has unknown class {cname!r} (VOC classes: {', '.join(VOC_CLASSES)})")
    diff_node = obj.find("difficult")
    try:
        difficult = int(diff_node.text.strip() or 0) if diff_node is not None and diff_node.text else 0
    except ValueError:
        raise DataError(f"{xml}: object {k} has <difficult>{diff_node.text.strip()!r}; expected 0 or 1") from None
    bb = obj.find("bndbox")
    try:
        xmin, ymin, xmax, ymax = (float(_xml_text(bb, t, xml)) for t in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError:
        raise DataError(f"{xml}: object {k} ({cname}) has a non-numeric bndbox") from None
    for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (xmin, ymin, xmax, ymax)):
        if not math.isfinite(v):  # NaN would pass every comparison below and min/max drop it: a full-width box
            raise DataError(f"{xml}: object {k} ({cname}) has <{tag}>{v}</{tag}>; expected a finite pixel index")
    # VOC boxes are 1-based inclusive pixel indices; convert to continuous pixel edges
    x, y, w, h = xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1
    if xmax < xmin or ymax < ymin:  # malformed, not tiny: refused
        raise DataError(f"{xml}: object {k} ({cname}) box [{xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}] has "
                        "xmax < xmin or ymax < ymin")
    if w < 1 or h < 1:
        return None
    clipped = _check_box(x, y, w, h, width, height)
    if clipped is None:
        raise DataError(f"{xml}: object {k} ({cname}) box [{xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}] is outside the {width}x{height} image")
    x1, y1, x2, y2 = clipped
    return x1, y1, x2, y2, label, difficult


def load_voc_ground_truth(year_dir: Path, split: str) -> _GroundTruth:
    list_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"VOC split file {list_file} does not exist")
    names = [ln.split()[0] for ln in list_file.read_text().splitlines() if ln.strip()]
    label_of = {n: i + 1 for i, n in enumerate(VOC_CLASSES)}
    records: list[_Record] = []
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for idx, stem in enumerate(names):
        xml = year_dir / "Annotations" / f"{stem}.xml"
        img_path = year_dir / "JPEGImages" / f"{stem}.jpg"
        if not xml.is_file():
            raise DataError(f"VOC annotation {xml} (listed in {list_file}) does not exist")
        if not img_path.is_file():
            raise DataError(f"VOC image {img_path} (listed in {list_file}) does not exist")
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise DataError(f"VOC annotation {xml} is not valid XML: {e}") from e
        size = tree.find("size")
        try:
            width = int(float(_xml_text(size, "width", xml)))
            height = int(float(_xml_text(size, "height", xml)))
        except (DataError, ValueError):
            width = height = 0
        if width <= 0 or height <= 0:
            with image_header(img_path) as im:
                width, height = im.size
        image_id = idx + 1
        boxes, labels = [], []
        for k, obj in enumerate(tree.findall("object")):
            parsed = _voc_object(obj, k, xml, label_of, width, height)
            if parsed is None:
                continue
            x1, y1, x2, y2, label, difficult = parsed
            anns.append({
                "id": len(anns) + 1, "image_id": image_id, "category_id": label,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(bool(difficult)), "difficult": int(bool(difficult)),
            })  # fmt: skip
            if not difficult:
                boxes.append([x1, y1, x2, y2])
                labels.append(label)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height})
        records.append(
            _Record(
                image_id=image_id,
                path=img_path,
                width=width,
                height=height,
                boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.array(labels, dtype=np.int64),
            )
        )
    gt = {
        "info": {"description": f"VOC {year_dir.name} {split}"},
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(VOC_CLASSES)],
    }
    return _GroundTruth(records, list(VOC_CLASSES), {i + 1: i + 1 for i in range(len(VOC_CLASSES))}, gt)


class VOCDetection(DetectionDataset):
    """Pascal VOC (``VOCdevkit/VOC2007``-style folder). ``difficult`` objects are not training
    targets; in :attr:`coco` they are ``iscrowd=1`` (ignored by COCOeval) and ``difficult=1``."""

    is_voc = True

    def __init__(
        self,
        root: str | Path,
        split: str = "trainval",
        *,
        train: bool = False,
        hflip: float = 0.5,
        with_masks: bool = False,
        name: str | None = None,
    ) -> None:
        if split not in ("train", "val", "trainval", "test"):
            raise DataError(f"VOC split must be train, val, trainval or test, got {split!r}")
        year_dir = _voc_year_dir(Path(root).expanduser())
        data = load_voc_ground_truth(year_dir, split)
        self.root = year_dir
        super().__init__(data, name=name or f"voc:{root}", split=split, train=train, with_masks=False, hflip=hflip)
