"""One dataset interface for every source: :class:`DetectionDataset` and the records the COCO and
VOC readers hand it, plus the horizontal flip used for training."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .images import opened_image, to_rgb_array

BACKGROUND = "__background__"
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (clipped), more is an error


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
            with opened_image(rec.path, f"dataset {self.name}: image {rec.path}") as im:  # the header, before decoding
                arr = to_rgb_array(im)  # 16-bit and float images scaled, not clipped to white
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


def _check_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Clip a box within tolerance; ``None`` if it is outside the image."""
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return None
    x1, y1 = max(0.0, x), max(0.0, y)
    x2, y2 = min(float(width), x + w), min(float(height), y + h)
    return x1, y1, x2, y2
