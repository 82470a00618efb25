"""Images without labels: the image files of a folder or a dataset, and batches of them.

What label-free recovery (:func:`surgery.pruning.reconstruct.reconstruct`, ``surgery recover --images``)
reads: never an annotation file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .images import IMAGE_SUFFIXES, read_rgb
from .sources import folder_kind, normalize_source
from .synth import ensure_synthetic


def image_files(source: str | Path) -> list[Path]:
    """The image files a recovery reads from ``source``: a folder of images (listed recursively), or
    a dataset spec the data-source resolver knows (``coco:ROOT``, ``voc:ROOT``, a COCO/VOC folder,
    ``synthetic``): the images of its train split, never its annotation files."""
    path = Path(str(source)).expanduser()
    if path.is_dir() and not _is_dataset(path):
        return _listed(path, str(source))
    norm = normalize_source(str(source))
    kind, _, rest = norm.partition(":")
    if norm == "synthetic":
        # the default synthetic set, generated on first use (what `--data synthetic` means elsewhere)
        return _listed(ensure_synthetic() / "train", "the synthetic set")
    root = Path(rest).expanduser()
    if kind == "coco":
        for folder in (root / "train2017", root / "train", root / "images" / "train", root / "images"):
            if folder.is_dir():
                return _listed(folder, norm)
    if kind == "voc":
        folders = sorted(root.glob("**/JPEGImages"))
        if folders:
            return [f for d in folders for f in _listed(d, norm)]
    if root.is_dir():  # another layout (e.g. YOLO's images/ + labels/): every image below the root
        return _listed(root, norm)
    raise DataError(f"no image folder found for {source} (expected a folder of images or a COCO/VOC dataset)")


def _is_dataset(path: Path) -> bool:
    return folder_kind(path) is not None


def _listed(folder: Path, what: str) -> list[Path]:
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"no images found in {what} (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return files


def image_batches(files: Sequence[Path], *, batch_size: int, max_batches: int | None = None,
                  seed: int = 0) -> Iterator[list[torch.Tensor]]:
    """Batches of ``[3, H, W]`` float images in [0, 1] from ``files``, in a seeded shuffled order
    (a folder sorted by name is often sorted by scene), at most ``max_batches``."""
    order = np.random.default_rng(seed).permutation(len(files))
    n = len(files) if max_batches is None else min(len(files), max_batches * batch_size)
    for start in range(0, n, batch_size):
        chunk = [files[i] for i in order[start : min(n, start + batch_size)]]
        yield [torch.from_numpy(read_rgb(f)).permute(2, 0, 1).float().div_(255) for f in chunk]


