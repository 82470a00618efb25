"""Data sources (``synthetic``, ``coco:ROOT``, ``voc:ROOT``, ``yolo:DATA_YAML``, an annotation ``.json``) and loaders."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .coco import CocoDetection
from .datasets import DetectionDataset
from .sources import normalize_source
from .synth import ensure_synthetic
from .voc import VOCDetection
from .yolo_format import YoloDetection


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
    ``"yolo:DATA_YAML"`` (Ultralytics' dataset yaml, splits train/val/test, see :mod:`.yolo_format`),
    ``"voc:ROOT"`` (VOCdevkit or VOC2007 folder) or a COCO annotation ``.json`` (used for any
    ``split``; images next to it, see :func:`_json_image_dirs`). ``train`` enables the horizontal
    flip (probability ``hflip``). ``progress`` reports synthetic generation.
    """
    source = normalize_source(str(source))
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
        check_coco_splits(Path(source[5:]).expanduser(), split, ann, _coco_layout)
        return CocoDetection(img_dir, ann, train=train, with_masks=with_masks, hflip=hflip, name=source, split=split)
    if source.startswith("voc:"):
        return VOCDetection(source[4:], split, train=train, hflip=hflip, name=source)
    if source.startswith("yolo:"):
        return YoloDetection(source[5:], split, train=train, hflip=hflip, name=source)
    if source.endswith(".json"):
        ann = Path(source).expanduser()
        return CocoDetection(_json_image_dirs(ann), ann, train=train, with_masks=with_masks, hflip=hflip, name=source, split=split)
    raise DataError(f"unknown data source {source!r}")  # normalize_source has already refused it


# the synthetic set a recipe gets when its data section leaves these out (DataSection's defaults)
SYNTH_DEFAULTS: dict[str, Any] = {"root": None, "images": 2000, "size": 160, "seed": 0}


def synthetic_options(data: Any = None) -> dict[str, Any]:
    """The :func:`build_dataset` keyword arguments (``synth_root``, ``images``, ``size``, ``seed``)
    that select the synthetic set a recipe's data section describes.

    ``data``: a :class:`~surgery.config.recipe.DataSection`, its dict form (a checkpoint's
    ``recipe["data"]``) or ``None``; what it leaves out takes :data:`SYNTH_DEFAULTS`.
    """
    values = dict(SYNTH_DEFAULTS)
    if isinstance(data, Mapping):
        values.update({k: data[k] for k in SYNTH_DEFAULTS if k in data})
    elif data is not None:
        values.update({k: getattr(data, k) for k in SYNTH_DEFAULTS if hasattr(data, k)})
    return {"synth_root": values["root"], "images": int(values["images"]), "size": int(values["size"]),
            "seed": int(values["seed"])}  # fmt: skip


def dataset_for(
    data: Any,
    split: str,
    *,
    train: bool,
    source: str | None = None,
    hflip: float = 0.5,
    with_masks: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DetectionDataset:
    """The ``split`` of the dataset a recipe's data section names: ``source`` if given, else the
    section's ``source``, else ``"synthetic"``; the synthetic set is the one the section describes
    (:func:`synthetic_options`), so a checkpoint is evaluated on the set it was trained on.
    ``data`` is a :class:`~surgery.config.recipe.DataSection`, its dict form or ``None``."""
    section_source = data.get("source") if isinstance(data, Mapping) else getattr(data, "source", None)
    source = source or section_source or "synthetic"
    if source.lower() == "synthetic":
        source = "synthetic"
    kwargs = synthetic_options(data) if source == "synthetic" else {}
    return build_dataset(source, split, train=train, with_masks=with_masks, hflip=hflip, progress=progress, **kwargs)


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


def _category_ids(ann: Path) -> list[int] | None:
    try:
        data = json.loads(ann.read_text())
        return sorted(int(c["id"]) for c in data["categories"])
    except Exception:  # noqa: BLE001 - the split's own loader reports a bad file
        return None


def check_coco_splits(root: Path, split: str, ann: Path, layout: Any) -> None:
    """Labels are numbered from the category list: the train and val files of one COCO folder
    must list the same categories, or the labels (and the mAP) would silently differ per split."""
    other = "val" if split == "train" else "train"
    try:
        _, other_ann = layout(root, other)
    except DataError:
        return
    mine, theirs = _category_ids(ann), _category_ids(other_ann)
    if mine is not None and theirs is not None and mine != theirs:
        only = sorted(set(mine) ^ set(theirs))
        raise DataError(
            f"{ann} and {other_ann} list different categories (ids only in one of them: {only[:10]}); labels are "
            "numbered from the category list, so both splits must list the full, same category list"
        )
