"""Datasets: the built-in synthetic shapes set, COCO and Pascal VOC, behind one interface.

Every source becomes a :class:`DetectionDataset` yielding ``(image, target)`` the way torchvision
detectors expect: ``image`` is a float CHW tensor in [0, 1], ``target`` holds ``boxes`` (float32
``[N, 4]`` xyxy absolute pixels), ``labels`` (int64 ``[N]``, contiguous ``1..K``), ``image_id``
(int) and, with ``with_masks=True`` on annotations that have segmentation, ``masks`` (uint8
``[N, H, W]``). Crowd (COCO) and difficult (VOC) objects are not training targets; they stay in
:attr:`DetectionDataset.coco` (the ground truth in the contiguous label space, used by
:mod:`surgery.evaluate`) with ``iscrowd=1`` so the COCO evaluator ignores detections on them.

The synthetic set (:func:`synthesize`) is a deterministic COCO-format folder of 4 shape classes on
textured backgrounds; :func:`ensure_synthetic` generates it once into a cache folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError

SYNTH_CLASSES = ("rectangle", "ellipse", "triangle", "cross")
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
BACKGROUND = "__background__"
GENERATOR_VERSION = 1  # bump when the synthetic images change: it is part of the cache folder name
DONE_MARKER = "DONE"
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (clipped), more is an error

# ============================================================================================
# Synthetic shapes
# ============================================================================================


@dataclass
class SynthInfo:
    """Where :func:`synthesize` wrote the dataset, and what is in it."""

    root: Path
    train_dir: Path
    val_dir: Path
    train_json: Path
    val_json: Path
    samples: Path
    images: int
    val_images: int
    size: int
    seed: int
    train_objects: int = 0
    val_objects: int = 0
    seconds: float = 0.0
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


_SPLIT_CODE = {"train": 0, "val": 1}


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # each image has its own stream, so any image can be regenerated on its own
    return np.random.default_rng(seed * 1_000_003 + index + 500_000_003 * _SPLIT_CODE[split])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field (a bilinear-upsampled coarse grid) plus a linear gradient."""
    cells = int(rng.integers(2, 6))
    coarse = rng.uniform(20, 235, size=(cells, cells, 3)).astype(np.uint8)
    field_ = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    grad = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
    tint = rng.uniform(-40, 40, size=3).astype(np.float32)
    img = field_ + grad[:, :, None] * tint[None, None, :]
    if rng.random() < 0.5:  # faint stripes as texture
        freq = rng.uniform(0.05, 0.3)
        phase = rng.uniform(0, 2 * math.pi)
        stripes = np.sin(freq * (math.cos(angle + 1) * np.arange(size)[None, :] + math.sin(angle + 1) * np.arange(size)[:, None]) + phase)
        img += (stripes * rng.uniform(5, 20)).astype(np.float32)[:, :, None]
    return img


def _shape_polygon(cls: int, x0: float, y0: float, w: float, h: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices (float ``[P, 2]``) of a shape filling the box ``(x0, y0, w, h)``."""
    if cls == 0:  # rectangle
        pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif cls == 1:  # ellipse
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([0.5 + 0.5 * np.cos(t), 0.5 + 0.5 * np.sin(t)], 1)
    elif cls == 2:  # triangle, apex on one side, base on the opposite one
        a = rng.uniform(0.0, 1.0)
        pts = [(a, 0), (1, 1), (0, 1)]
        k = int(rng.integers(0, 4))
        for _ in range(k):  # rotate by 90 degrees in the unit square
            pts = [(1 - y, x) for x, y in pts]
    else:  # cross (plus sign)
        t = rng.uniform(0.22, 0.4)
        lo, hi = 0.5 - t / 2, 0.5 + t / 2
        pts = [(lo, 0), (hi, 0), (hi, lo), (1, lo), (1, hi), (hi, hi), (hi, 1), (lo, 1), (lo, hi), (0, hi), (0, lo), (lo, lo)]
    p = np.asarray(pts, dtype=np.float64)
    return np.stack([x0 + p[:, 0] * w, y0 + p[:, 1] * h], 1)


def _iou_xyxy(a: np.ndarray, b: np.ndarray) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return max(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter), inter / small)


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def render_synthetic_image(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One synthetic image (uint8 HWC) and its objects (``category_id``, ``bbox`` xywh,
    ``area``, ``segmentation``), a pure function of ``(seed, split, index, size)``."""
    rng = _image_rng(seed, split, index)
    bg = _background(rng, size)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # distractors: lines and arcs that belong to no class
    for _ in range(int(rng.integers(2, 7))):
        xy = [float(v) for v in rng.uniform(-0.1 * size, 1.1 * size, size=4)]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.7:
            draw.line(xy, fill=colour, width=int(rng.integers(1, 4)))
        else:
            x0, x1 = sorted(xy[0::2])
            y0, y1 = sorted(xy[1::2])
            start = float(rng.uniform(0, 360))
            draw.arc([x0, y0, x1 + 1, y1 + 1], start, start + float(rng.uniform(30, 120)), fill=colour, width=2)
    objects: list[dict[str, Any]] = []
    boxes: list[np.ndarray] = []
    n = int(rng.integers(1, 7))
    for _ in range(n):
        cls = int(rng.integers(0, len(SYNTH_CLASSES)))
        placed = None
        for _attempt in range(25):
            s = rng.uniform(0.10, 0.50) * size
            r = math.exp(rng.uniform(-0.5, 0.5))
            w = float(np.clip(round(s * math.sqrt(r)), max(4, 0.08 * size), size - 2))
            h = float(np.clip(round(s / math.sqrt(r)), max(4, 0.08 * size), size - 2))
            x0 = float(rng.integers(0, int(size - w)))
            y0 = float(rng.integers(0, int(size - h)))
            cand = np.array([x0, y0, x0 + w, y0 + h])
            if all(_iou_xyxy(cand, b) < 0.3 for b in boxes):
                placed = (x0, y0, w - 1, h - 1)  # vertices span w-1 pixels: the drawn shape covers w
                break
        if placed is None:
            continue
        poly = np.round(_shape_polygon(cls, *placed, rng))
        # a colour that stands out from the background under the shape
        xa, ya = int(placed[0]), int(placed[1])
        local = bg[ya : ya + int(placed[3]) + 1, xa : xa + int(placed[2]) + 1].reshape(-1, 3).mean(0)
        for _c in range(6):
            colour = rng.integers(0, 256, size=3)
            if np.abs(colour - local).sum() > 120:
                break
        draw.polygon([(float(x), float(y)) for x, y in poly], fill=tuple(int(c) for c in colour))
        x_min, y_min = poly.min(0)
        x_max, y_max = poly.max(0) + 1  # pixel-edge coordinates: the last column is covered
        x_max, y_max = min(x_max, size), min(y_max, size)
        boxes.append(np.array([x_min, y_min, x_max, y_max]))
        seg = (poly + 0.5).reshape(-1)  # polygon through pixel centres
        objects.append(
            {
                "category_id": cls + 1,
                "bbox": [float(x_min), float(y_min), float(x_max - x_min), float(y_max - y_min)],
                "area": round(max(_polygon_area(poly + 0.5), 1.0), 2),
                "segmentation": [[round(float(v), 2) for v in seg]],
            }
        )
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, rng.uniform(3, 10), size=arr.shape).astype(np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8), objects


def _synth_categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SYNTH_CLASSES)]


_CLASS_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def draw_samples(
    images: Sequence[np.ndarray],
    annotations: Sequence[Sequence[dict[str, Any]]],
    class_names: Sequence[str],
    path: str | Path,
    columns: int = 4,
) -> Path:
    """A grid of images with their boxes and class names (``class_names[category_id - 1]``)."""
    path = Path(path)
    if not images:
        raise ValueError("draw_samples needs at least one image")
    scale = max(1, math.ceil(192 / max(images[0].shape[:2])))
    h, w = images[0].shape[0] * scale, images[0].shape[1] * scale
    rows = math.ceil(len(images) / columns)
    pad = 4
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    font = ImageFont.load_default()
    for k, (arr, anns) in enumerate(zip(images, annotations, strict=True)):
        tile = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
        d = ImageDraw.Draw(tile)
        for a in anns:
            x, y, bw, bh = (v * scale for v in a["bbox"])
            c = _CLASS_COLOURS[(a["category_id"] - 1) % len(_CLASS_COLOURS)]
            d.rectangle([x, y, x + bw - 1, y + bh - 1], outline=c, width=2)
            name = class_names[a["category_id"] - 1]
            tx, ty = x + 2, max(0, y - 11)
            d.rectangle([tx - 1, ty, tx + 6 * len(name) + 1, ty + 10], fill=c)
            d.text((tx, ty - 1), name, fill=(255, 255, 255), font=font)
        grid.paste(tile, (pad + (k % columns) * (w + pad), pad + (k // columns) * (h + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))


def _is_complete(root: Path) -> bool:
    return (root / DONE_MARKER).is_file()


def synthesize(
    out: str | Path,
    images: int = 2000,
    size: int = 160,
    seed: int = 0,
    val_images: int | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    replace: bool = True,
) -> SynthInfo:
    """Generate the synthetic shapes dataset in COCO format under ``out``.

    Writes ``train/*.jpg``, ``val/*.jpg``, ``annotations/instances_{train,val}.json``,
    ``samples.png`` (8 training images with their boxes) and a ``DONE`` marker. Everything is
    written into a temporary sibling folder that is renamed to ``out`` at the end, so a killed
    run never leaves something that looks finished. ``out`` may not exist, be empty, or be a
    previous synthetic dataset (replaced when ``replace``, kept as is otherwise).
    Same arguments -> byte-identical json and identical pixels. ``progress(done, total)`` is
    called after every image.
    """
    from .validate import check_synth

    check_synth(images, size, seed, val_images)
    t0 = time.perf_counter()
    out = Path(out).expanduser()
    if images < 1:
        raise DataError(f"synthetic dataset: images must be >= 1, got {images}")
    if size < 32:
        raise DataError(f"synthetic dataset: size must be >= 32 pixels, got {size}")
    n_val = max(20, images // 10) if val_images is None else int(val_images)
    if n_val < 1:
        raise DataError(f"synthetic dataset: val_images must be >= 1, got {n_val}")
    if out.exists() and not (out.is_dir() and (_is_complete(out) or not any(out.iterdir()))):
        raise DataError(f"output folder {out} already exists and is not a surgery synthetic dataset; choose a new or empty folder")
    if not replace and _is_complete(out):
        return _synth_info(out, images, n_val, size, seed, reused=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)  # mkdtemp creates 0700: a shared cache gets the permissions mkdir would
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        total = images + n_val
        done = 0
        samples: list[np.ndarray] = []
        sample_anns: list[list[dict[str, Any]]] = []
        counts = {}
        (tmp / "annotations").mkdir()
        for split, n in (("train", images), ("val", n_val)):
            (tmp / split).mkdir()
            imgs, anns = [], []
            for i in range(n):
                arr, objs = render_synthetic_image(seed, split, i, size)
                name = f"{i:06d}.jpg"
                Image.fromarray(arr).save(tmp / split / name, quality=92)
                imgs.append({"id": i + 1, "file_name": name, "width": size, "height": size})
                for o in objs:
                    anns.append({"id": len(anns) + 1, "image_id": i + 1, **o, "iscrowd": 0})
                if split == "train" and len(samples) < 8:
                    samples.append(arr)
                    sample_anns.append(objs)
                done += 1
                if progress is not None:
                    progress(done, total)
            counts[split] = len(anns)
            coco = {
                "info": {"description": "surgery synthetic shapes", "generator_version": GENERATOR_VERSION,
                         "seed": seed, "size": size, "split": split},
                "licenses": [],
                "images": imgs,
                "annotations": anns,
                "categories": _synth_categories(),
            }  # fmt: skip
            _write_json(coco, tmp / "annotations" / f"instances_{split}.json")
        draw_samples(samples, sample_anns, SYNTH_CLASSES, tmp / "samples.png")
        params = {"images": images, "val_images": n_val, "size": size, "seed": seed,
                  "generator_version": GENERATOR_VERSION, "train_objects": counts["train"], "val_objects": counts["val"]}  # fmt: skip
        (tmp / DONE_MARKER).write_text(json.dumps(params, indent=1))
        _publish(tmp, out, replace=replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    info = _synth_info(out, images, n_val, size, seed)
    info.seconds = time.perf_counter() - t0
    return info


def _synth_info(root: Path, images: int, n_val: int, size: int, seed: int, reused: bool = False) -> SynthInfo:
    try:
        params = json.loads((root / DONE_MARKER).read_text())
    except (OSError, ValueError):
        params = {}
    return SynthInfo(
        root=root,
        train_dir=root / "train",
        val_dir=root / "val",
        train_json=root / "annotations" / "instances_train.json",
        val_json=root / "annotations" / "instances_val.json",
        samples=root / "samples.png",
        images=int(params.get("images", images)),
        val_images=int(params.get("val_images", n_val)),
        size=int(params.get("size", size)),
        seed=int(params.get("seed", seed)),
        train_objects=int(params.get("train_objects", 0)),
        val_objects=int(params.get("val_objects", 0)),
        reused=reused,
    )


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the finished ``tmp`` folder to ``out``."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif _is_complete(out):
            if not replace:  # another process finished the same dataset first
                return
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return
    try:
        os.replace(tmp, out)
    except OSError:
        if not (_is_complete(out) and not replace):  # lost a race against an identical run: fine
            raise


def default_synthetic_root() -> Path:
    """Where synthetic datasets are cached: ``$SURGERY_CACHE`` or ``~/.cache/surgery``."""
    env = os.environ.get("SURGERY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "surgery"


def synthetic_dir_name(images: int, size: int, seed: int) -> str:
    return f"synthetic-v{GENERATOR_VERSION}-n{images}-s{size}-seed{seed}"


def ensure_synthetic(
    root: str | Path | None = None,
    images: int = 2000,
    size: int = 160,
    seed: int = 0,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The synthetic dataset for ``(images, size, seed)`` under ``root`` (default
    :func:`default_synthetic_root`), generated on first use and reused once complete."""
    base = Path(root).expanduser() if root is not None else default_synthetic_root()
    out = base / synthetic_dir_name(images, size, seed)
    if not _is_complete(out):
        if out.exists() and any(out.iterdir()):
            shutil.rmtree(out)  # a folder we own without its DONE marker: an old interrupted layout
        synthesize(out, images=images, size=size, seed=seed, progress=progress, replace=False)
    return out


# ============================================================================================
# Datasets
# ============================================================================================


@dataclass
class _Record:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy, training objects only (no crowd / difficult)
    labels: np.ndarray  # int64 [N]
    segs: list[Any] | None = None  # segmentation per training object (COCO polygons or RLE)


@dataclass
class _GroundTruth:
    """Everything a subclass hands to :class:`DetectionDataset`."""

    records: list[_Record]
    class_names: list[str]  # without background
    label_to_cat_id: dict[int, int]
    gt: dict[str, Any]  # COCO-format ground truth in the contiguous label space
    extra: dict[str, Any] = field(default_factory=dict)


class DetectionDataset(Dataset):
    """A detection dataset with one interface for every source.

    Attributes: ``num_classes`` (object classes + 1 for background, torchvision's convention),
    ``class_names`` (index 0 is ``"__background__"``), ``coco`` (pycocotools ``COCO`` ground truth
    in the contiguous label space), ``image_ids``, ``label_to_cat_id`` (contiguous label ->
    the source's category id, for writing results), ``has_masks``, ``is_voc``, ``name``, ``split``.
    """

    is_voc: bool = False

    def __init__(
        self,
        data: _GroundTruth,
        *,
        name: str,
        split: str,
        train: bool,
        with_masks: bool = False,
        hflip: float = 0.5,
    ) -> None:
        if not data.records:
            raise DataError(f"dataset {name} split {split} has no images")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        self.name = name
        self.split = split
        self.train = train
        self.hflip = float(hflip) if train else 0.0
        self.records = data.records
        self.class_names = [BACKGROUND, *data.class_names]
        self.num_classes = len(self.class_names)
        self.label_to_cat_id = dict(data.label_to_cat_id)
        self.image_ids = [r.image_id for r in self.records]
        self._gt = data.gt
        self._coco: Any = None
        self.has_masks = all(r.segs is not None and all(s for s in r.segs) for r in self.records) and any(
            len(r.labels) for r in self.records
        )
        self.has_keypoints = any("keypoints" in a for a in data.gt["annotations"])
        self.with_masks = bool(with_masks and self.has_masks)

    # ---------------------------------------------------------------------------------------
    @property
    def coco(self) -> Any:
        """pycocotools ``COCO`` of the ground truth, contiguous labels as category ids (built lazily)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                c = COCO()
                c.dataset = self._gt
                c.createIndex()
            self._coco = c
        return self._coco

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> torch.Tensor:
        """The image at ``index`` as a float CHW tensor in [0, 1], no augmentation."""
        rec = self.records[index]
        try:
            with Image.open(rec.path) as im:
                im = im.convert("RGB")
                arr = np.asarray(im, dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(f"dataset {self.name}: image file {rec.path} does not exist") from None
        except Image.DecompressionBombError as e:
            raise DataError(f"dataset {self.name}: image {rec.path} is too large to decode safely ({e})") from None
        except OSError as e:
            raise DataError(f"dataset {self.name}: cannot read image {rec.path}: {e}") from e
        if arr.shape[0] != rec.height or arr.shape[1] != rec.width:
            raise DataError(
                f"dataset {self.name}: image {rec.path} is {arr.shape[1]}x{arr.shape[0]} but its "
                f"annotation says {rec.width}x{rec.height}"
            )
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        rec = self.records[index]
        image = self.load_image(index)
        boxes = torch.from_numpy(rec.boxes.copy()).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.from_numpy(rec.labels.copy()),
            "image_id": rec.image_id,
        }
        if self.with_masks:
            target["masks"] = self._masks(rec)
        if self.hflip > 0 and float(torch.rand(())) < self.hflip:
            image, target = hflip_sample(image, target)
        return image, target

    def _masks(self, rec: _Record) -> torch.Tensor:
        from pycocotools import mask as mask_utils

        if not rec.segs:
            return torch.zeros((0, rec.height, rec.width), dtype=torch.uint8)
        out = np.zeros((len(rec.segs), rec.height, rec.width), dtype=np.uint8)
        for k, seg in enumerate(rec.segs):
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, rec.height, rec.width))
            elif isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, rec.height, rec.width)
            else:
                rle = seg
            out[k] = mask_utils.decode(rle)
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, images={len(self)}, classes={self.num_classes - 1})"


def hflip_sample(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mirror an image and its target (boxes, masks) left-right."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


# --------------------------------------------------------------------------------------------
# COCO


def _check_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Clip a box within tolerance; ``None`` if it is outside the image."""
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return None
    x1, y1 = max(0.0, x), max(0.0, y)
    x2, y2 = min(float(width), x + w), min(float(height), y + h)
    return x1, y1, x2, y2


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


def load_coco_ground_truth(ann_file: Path, images_dir: Path | Sequence[Path]) -> _GroundTruth:
    """Parse and validate a COCO annotation file. ``images_dir`` may list candidate folders: the
    first one holding the first image's ``file_name`` is used."""
    from .validate import check_coco_lists

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
    # where the image files are
    candidates = [Path(images_dir)] if isinstance(images_dir, (str, Path)) else [Path(p) for p in images_dir]
    root = candidates[0]
    if images:
        first = images[0]["file_name"]
        found = [c for c in candidates if (c / first).is_file()]
        if found:
            root = found[0]
        elif len(candidates) == 1 and not root.is_dir():
            raise DataError(f"image folder {root} (for {ann_file}) does not exist")
        else:
            where = ", ".join(str(c) for c in candidates)
            raise DataError(f"{ann_file}: cannot find image {first!r} in {where}")
    by_id: dict[int, dict[str, Any]] = {}
    for im in images:
        if int(im["id"]) in by_id:
            raise DataError(f"{ann_file}: duplicate image id {im['id']}")
        by_id[int(im["id"])] = im
    per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in by_id}
    gt_anns: list[dict[str, Any]] = []
    need_ids = any(not a.get("id") for a in data["annotations"])
    for k, a in enumerate(data["annotations"]):
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
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise ValueError("not finite")
        except (TypeError, ValueError):
            raise DataError(f"{ann_file}: annotation {aid} has a malformed bbox {a['bbox']!r} (expected [x, y, w, h] of finite numbers)") from None
        if w < 1 or h < 1:
            continue  # degenerate: dropped silently
        clipped = _check_box(x, y, w, h, int(img["width"]), int(img["height"]))
        if clipped is None:
            raise DataError(
                f"{ann_file}: annotation {aid} of image {img['id']} ({img['file_name']}) has box "
                f"[{x:g}, {y:g}, {w:g}, {h:g}] (xywh) outside the {img['width']}x{img['height']} image"
            )
        x1, y1, x2, y2 = clipped
        if x2 - x1 < 1 or y2 - y1 < 1:
            continue
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
    records = []
    for im in images:
        iid = int(im["id"])
        objs = [g for g in per_image[iid] if not g["iscrowd"]]
        boxes = np.array([[g["bbox"][0], g["bbox"][1], g["bbox"][0] + g["bbox"][2], g["bbox"][1] + g["bbox"][3]] for g in objs], dtype=np.float32)
        segs = [g.get("segmentation") for g in objs]
        records.append(
            _Record(
                image_id=iid,
                path=root / im["file_name"],
                width=int(im["width"]),
                height=int(im["height"]),
                boxes=boxes.reshape(-1, 4),
                labels=np.array([g["category_id"] for g in objs], dtype=np.int64),
                segs=segs if all(s for s in segs) else None,
            )
        )
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


# --------------------------------------------------------------------------------------------
# Pascal VOC


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
            with Image.open(img_path) as im:
                width, height = im.size
        image_id = idx + 1
        boxes, labels = [], []
        for k, obj in enumerate(tree.findall("object")):
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
            # VOC boxes are 1-based inclusive pixel indices; convert to continuous pixel edges
            x, y, w, h = xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1
            if w < 1 or h < 1:
                continue
            clipped = _check_box(x, y, w, h, width, height)
            if clipped is None:
                raise DataError(f"{xml}: object {k} ({cname}) box [{xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}] is outside the {width}x{height} image")
            x1, y1, x2, y2 = clipped
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


# --------------------------------------------------------------------------------------------
# One entry point


def _coco_layout(root: Path, split: str) -> tuple[Path, Path]:
    if not root.is_dir():
        raise DataError(f"COCO folder {root} does not exist")
    for ann, img in (
        (root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"),
        (root / "annotations" / f"instances_{split}.json", root / split),
    ):
        if ann.is_file():
            if not img.is_dir():
                raise DataError(f"COCO image folder {img} does not exist")
            return img, ann
    raise DataError(
        f"COCO folder {root} has no annotations/instances_{split}2017.json or annotations/instances_{split}.json"
    )


def _json_image_dirs(ann_file: Path) -> list[Path]:
    parent, grand = ann_file.parent, ann_file.parent.parent
    split_dir = ann_file.stem.removeprefix("instances_")
    cands = [grand / "images", parent / "images", grand / split_dir, parent, grand]
    return list(dict.fromkeys(cands))


def build_dataset(
    source: str,
    split: str,
    *,
    train: bool,
    synth_root: str | Path | None = None,
    images: int = 2000,
    size: int = 160,
    seed: int = 0,
    with_masks: bool = False,
    hflip: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> DetectionDataset:
    """A dataset from a source string.

    ``source``: ``"synthetic"`` (generated and cached, see :func:`ensure_synthetic`),
    ``"coco:ROOT"`` (``ROOT/{train,val}2017`` + ``ROOT/annotations/instances_{split}2017.json``, or
    the ``train/``, ``val/``, ``instances_{split}.json`` layout :func:`synthesize` writes),
    ``"voc:ROOT"`` (VOCdevkit or VOC2007 folder) or a COCO annotation ``.json`` (used for any
    ``split``; images next to it, see :func:`_json_image_dirs`). ``train`` enables the horizontal
    flip (probability ``hflip``). ``progress`` reports synthetic generation.
    """
    source = str(source)
    if source == "synthetic":
        if split not in ("train", "val"):
            raise DataError(f"synthetic dataset split must be 'train' or 'val', got {split!r}")
        root = ensure_synthetic(synth_root, images=images, size=size, seed=seed, progress=progress)
        return CocoDetection(
            root / split, root / "annotations" / f"instances_{split}.json",
            train=train, with_masks=with_masks, hflip=hflip, name="synthetic", split=split,
        )  # fmt: skip
    if source.startswith("coco:"):
        if split not in ("train", "val"):
            raise DataError(f"COCO split must be 'train' or 'val', got {split!r}")
        img_dir, ann = _coco_layout(Path(source[5:]).expanduser(), split)
        from .validate import check_coco_splits

        check_coco_splits(Path(source[5:]).expanduser(), split, ann, _coco_layout)
        return CocoDetection(img_dir, ann, train=train, with_masks=with_masks, hflip=hflip, name=source, split=split)
    if source.startswith("voc:"):
        return VOCDetection(source[4:], split, train=train, hflip=hflip, name=source)
    if source.endswith(".json"):
        ann = Path(source).expanduser()
        return CocoDetection(_json_image_dirs(ann), ann, train=train, with_masks=with_masks, hflip=hflip, name=source, split=split)
    raise DataError(f"unknown data source {source!r}: expected 'synthetic', 'coco:ROOT', 'voc:ROOT' or a COCO annotation .json")


# --------------------------------------------------------------------------------------------
# Loading


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep images and targets as lists (detectors take images of different sizes)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


def _worker_init(worker_id: int) -> None:
    import random

    s = torch.initial_seed() % 2**32  # distinct per worker, derived from the loader's generator
    np.random.seed(s)
    random.seed(s)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` with :func:`collate_fn` and a seeded generator (reproducible order and
    worker seeds). With a ``sampler`` (e.g. ``DistributedSampler``), ``shuffle`` is the sampler's job."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=g,
        drop_last=drop_last,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
