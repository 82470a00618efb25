"""The built-in synthetic shapes set: a deterministic COCO-format folder of 4 shape classes on
textured backgrounds (:func:`synthesize`), generated once into a cache folder
(:func:`ensure_synthetic`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from .draw import draw_samples
from .sources import MAX_SYNTH_IMAGES, MAX_SYNTH_SIZE

SYNTH_CLASSES = ("rectangle", "ellipse", "triangle", "cross")
GENERATOR_VERSION = 1  # bump when the synthetic images change: it is part of the cache folder name
DONE_MARKER = "DONE"


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


def _write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))


def _is_complete(root: Path) -> bool:
    return (root / DONE_MARKER).is_file()


def _int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_synth(images: Any, size: Any, seed: Any, val_images: Any = None) -> None:
    """Synthetic-set options in range, and a per-image memory estimate that fits (a 100000 px side
    would need ~240 GB per image)."""
    if not _int_at_least(images, 1) or images > MAX_SYNTH_IMAGES:
        raise DataError(f"synthetic dataset: images {images!r}: expected an integer in [1, {MAX_SYNTH_IMAGES}]")
    if val_images is not None and (not _int_at_least(val_images, 1) or val_images > MAX_SYNTH_IMAGES):
        raise DataError(f"synthetic dataset: val images {val_images!r}: expected an integer in [1, {MAX_SYNTH_IMAGES}]")
    if not _int_at_least(size, 32) or size > MAX_SYNTH_SIZE:
        raise DataError(f"synthetic dataset: size {size!r}: expected an integer in [32, {MAX_SYNTH_SIZE}] (pixels)")
    if not _int_at_least(seed, 0) or seed >= 2**32:
        raise DataError(f"synthetic dataset: seed {seed!r}: expected an integer in [0, 2**32)")
    need = size * size * 3 * 8  # uint8 image, float working copies, JPEG encoder buffers
    avail = _available_memory()
    if avail is not None and need > avail // 4:
        raise DataError(
            f"synthetic dataset: {size}x{size} px images need about {need / 2**30:.1f} GiB each; "
            f"only {avail / 2**30:.1f} GiB of memory is available"
        )


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
    check_synth(images, size, seed, val_images)
    t0 = time.perf_counter()
    out = Path(out).expanduser()
    n_val = max(20, images // 10) if val_images is None else int(val_images)  # check_synth checked the ranges
    if out.exists() and not (out.is_dir() and (_is_complete(out) or not any(out.iterdir()))):
        raise DataError(f"output folder {out} already exists and is not a surgery synthetic dataset; choose a new or empty folder")
    if not replace and _is_complete(out):
        return _synth_info(out, images, n_val, size, seed, reused=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise DataError(f"cannot write the synthetic dataset {out}: {e.strerror or e}") from None
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
    except OSError as e:  # e.g. ENOSPC: the half-written folder is removed below, nothing is published
        raise DataError(f"cannot write the synthetic dataset {out}: {e.strerror or e}; nothing was written") from None
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
