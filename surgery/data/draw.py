"""Drawing a grid of images with their boxes and class names (the synthetic set's ``samples.png``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..storage.atomic import atomic_path

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
    with atomic_path(path) as tmp:
        grid.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    return path
