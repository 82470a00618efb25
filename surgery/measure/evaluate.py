"""COCO-style evaluation of a detector on a :class:`~surgery.data.DetectionDataset`.

:func:`evaluate` runs the model (eval mode, ``torch.inference_mode``), turns its outputs into COCO
results and scores them with pycocotools' ``COCOeval`` for ``bbox`` (plus ``segm`` for models that
output ``masks`` and ``keypoints`` for models that output ``keypoints``, when the ground truth has
them). Metrics use stable keys (:data:`BBOX_KEYS`; ``segm_`` and ``kp_`` prefixes for the other IoU
types); VOC datasets also get ``voc_mAP50`` (VOC07 11-point AP at IoU 0.5, difficult objects
ignored). :func:`coco_map_from_detections` is the scoring core, usable without a model.

COCOeval reports -1 for a metric with no ground truth (e.g. no large objects); such metrics are
reported as 0.0 and listed in :attr:`EvalResult.undefined`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from ..storage.atomic import atomic_open

BBOX_KEYS = (
    "mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip
# COCOeval's keypoint summary has 10 numbers (no small objects, AR at 20 detections)
KEYPOINT_KEYS = ("mAP", "mAP50", "mAP75", "mAP_medium", "mAP_large", "AR", "AR50", "AR75", "AR_medium", "AR_large")
PREFIXES = {"bbox": "", "segm": "segm_", "keypoints": "kp_"}
IOU_TYPES = tuple(PREFIXES)


def metric_keys(iou_type: str = "bbox") -> list[str]:
    """The metric names :func:`coco_map_from_detections` returns for ``iou_type``."""
    keys = KEYPOINT_KEYS if iou_type == "keypoints" else BBOX_KEYS
    return [PREFIXES[iou_type] + k for k in keys]


@dataclass
class EvalResult:
    """What :func:`evaluate` measured. ``metrics`` maps stable keys to floats in [0, 1]."""

    metrics: dict[str, float]
    num_images: int
    seconds: float
    iou_types: list[str] = field(default_factory=lambda: ["bbox"])
    num_detections: int = 0
    inference_seconds: float = 0.0
    undefined: list[str] = field(default_factory=list)  # metrics with no ground truth, reported as 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": dict(self.metrics),
            "num_images": self.num_images,
            "seconds": self.seconds,
            "iou_types": list(self.iou_types),
            "num_detections": self.num_detections,
            "inference_seconds": self.inference_seconds,
            "undefined": list(self.undefined),
        }


# ============================================================================================
# Scoring


def _zeros(iou_type: str) -> dict[str, float]:
    return dict.fromkeys(metric_keys(iou_type), 0.0)


def _coco_eval(
    gt: Any, detections: list[dict[str, Any]], iou_type: str, img_ids: Iterable[int] | None
) -> tuple[dict[str, float], list[str]]:
    from pycocotools.cocoeval import COCOeval

    if iou_type not in PREFIXES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    keys = metric_keys(iou_type)
    if not detections:  # pycocotools' loadRes([]) crashes; nothing detected scores 0 everywhere
        return _zeros(iou_type), _undefined_without_detections(gt, iou_type, img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(detections))  # loadRes adds fields to the dicts it gets
        ev = COCOeval(gt, dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = sorted(set(img_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics, undefined = {}, []
    for k, v in zip(keys, ev.stats, strict=True):
        v = float(v)
        if v < 0:  # -1: no ground truth for this area range
            undefined.append(k)
            v = 0.0
        metrics[k] = v
    return metrics, undefined


def _undefined_without_detections(gt: Any, iou_type: str, img_ids: Iterable[int] | None) -> list[str]:
    """The metrics COCOeval would report as -1 (no ground truth in their area range)."""
    if iou_type == "keypoints":
        return []
    ids = set(gt.getImgIds()) if img_ids is None else set(img_ids)
    areas = [a["area"] for a in gt.dataset["annotations"] if a["image_id"] in ids and not a.get("iscrowd")]
    ranges = {"": (0, 1e10), "_small": (0, 32**2), "_medium": (32**2, 96**2), "_large": (96**2, 1e10)}
    empty = {suffix for suffix, (lo, hi) in ranges.items() if not any(lo <= a <= hi for a in areas)}
    if "" in empty:
        return metric_keys(iou_type)
    prefix = PREFIXES[iou_type]
    return [prefix + k for k in BBOX_KEYS for suffix in empty if k.endswith(suffix)]


def coco_map_from_detections(
    gt: Any,
    detections: list[dict[str, Any]],
    *,
    iou_type: str = "bbox",
    img_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """Score COCO-format ``detections`` (``image_id``, ``category_id``, ``bbox`` xywh / ``segmentation``
    RLE / ``keypoints``, ``score``) against the pycocotools ``COCO`` ground truth ``gt``.

    Returns the 12 COCO metrics (10 for keypoints) under :func:`metric_keys` names. ``img_ids``
    restricts the evaluation to those images (default: every image in ``gt``). No detections ->
    all 0.0.
    """
    return _coco_eval(gt, detections, iou_type, img_ids)[0]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """Average precision from a precision/recall curve: VOC07 11-point interpolation, or the
    all-point area under the interpolated curve (VOC2010+)."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t - 1e-12]
            ap += (float(p.max()) if p.size else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, 1e-12)


def voc_map50(
    gt: Any,
    detections: list[dict[str, Any]],
    *,
    img_ids: Iterable[int] | None = None,
    use_07_metric: bool = True,
    iou_threshold: float = 0.5,
) -> float:
    """Pascal VOC mAP at IoU 0.5: per class, detections sorted by score are matched greedily to
    unmatched ground truth with IoU > 0.5; a match to a ``difficult`` object is neither a true nor a
    false positive and difficult objects do not count as positives. Mean over the classes that have
    (non-difficult) ground truth in the evaluated images. Boxes are pixel-edge xywh (as
    :class:`~surgery.data.VOCDetection` writes them), so no VOC "+1" is needed."""
    images = set(gt.getImgIds()) if img_ids is None else set(img_ids)
    gt_by_cat: dict[int, dict[int, list[tuple[list[float], bool]]]] = defaultdict(lambda: defaultdict(list))
    for a in gt.dataset["annotations"]:
        if a["image_id"] in images:
            x, y, w, h = a["bbox"]
            difficult = bool(a.get("difficult", a.get("iscrowd", 0)))
            gt_by_cat[a["category_id"]][a["image_id"]].append(([x, y, x + w, y + h], difficult))
    dets_by_cat: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for d in detections:
        if d["image_id"] in images:
            dets_by_cat[d["category_id"]].append(d)
    aps = []
    for cat in sorted(gt.getCatIds()):
        per_image = {
            img: (np.array([b for b, _ in objs], dtype=np.float64), np.array([df for _, df in objs], dtype=bool))
            for img, objs in gt_by_cat.get(cat, {}).items()
        }
        npos = int(sum((~diff).sum() for _, diff in per_image.values()))
        if npos == 0:
            continue
        dets = sorted(dets_by_cat.get(cat, []), key=lambda d: -d["score"])
        tp = np.zeros(len(dets))
        fp = np.zeros(len(dets))
        matched = {img: np.zeros(len(b), dtype=bool) for img, (b, _) in per_image.items()}
        for k, d in enumerate(dets):
            entry = per_image.get(d["image_id"])
            if entry is None:
                fp[k] = 1
                continue
            boxes, difficult = entry
            x, y, w, h = d["bbox"]
            ious = _iou_one_to_many(np.array([x, y, x + w, y + h]), boxes)
            j = int(np.argmax(ious))
            if ious[j] > iou_threshold:
                if difficult[j]:
                    continue
                if not matched[d["image_id"]][j]:
                    tp[k] = 1
                    matched[d["image_id"]][j] = True
                else:
                    fp[k] = 1
            else:
                fp[k] = 1
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        recall = ctp / npos
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        aps.append(voc_ap(recall, precision, use_07_metric) if len(dets) else 0.0)
    return float(np.mean(aps)) if aps else 0.0


# ============================================================================================
# Running a model


def _unwrap(dataset: Any) -> tuple[Any, list[int]]:
    """``(base dataset, indices into it)``, looking through ``torch.utils.data.Subset``."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    from pycocotools import mask as mask_utils

    if masks.dim() == 4:  # torchvision: [N, 1, H, W] probabilities
        masks = masks[:, 0]
    binary = (masks > 0.5).to(torch.uint8).numpy()
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _write_json_atomic(obj: Any, path: Path) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f)


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    iou_types: tuple[str, ...] | None = None,
    results_file: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    ground_truth: Any | None = None,
) -> EvalResult:
    """Evaluate a torchvision-style detector on a :class:`~surgery.data.DetectionDataset` (or a
    ``Subset`` of one) with COCO metrics.

    Images are read without augmentation, in dataset order; ``max_images`` evaluates only the first
    ones. ``iou_types=None`` picks ``bbox`` plus ``segm`` / ``keypoints`` when the model outputs
    masks / keypoints and the ground truth has them. The model's train/eval mode (and device, if it
    had to be moved to ``device``) is restored afterwards. ``results_file`` receives the COCO
    results list with the dataset's original category ids. ``progress(done, total)`` is called after
    every batch. ``ground_truth``: a pycocotools ``COCO`` to score against instead of the dataset's
    annotations (:func:`reference_ground_truth`: a dense model's own detections, label-free).
    """
    t0 = time.perf_counter()
    base, indices, gt = _selection(dataset, batch_size, max_images, iou_types)
    if ground_truth is not None:
        gt = ground_truth
    label_map: dict[int, int] = dict(getattr(base, "label_to_cat_id", None) or {c: c for c in gt.getCatIds()})
    device = torch.device(device)
    was_training = model.training
    old_device = _model_device(model)
    if old_device is not None and old_device != device:
        model.to(device)
    model.eval()
    try:
        with torch.inference_mode():
            pred = _predict(model, base, indices, batch_size, device, set(gt.getCatIds()), label_map, progress)
    finally:
        model.train(was_training)
        if old_device is not None and old_device != device:
            model.to(old_device)

    types = _iou_types(iou_types, base, pred)
    metrics: dict[str, float] = {}
    undefined: list[str] = []
    for t in types:
        m, u = _coco_eval(gt, pred.results[t], t, pred.img_ids)
        metrics.update(m)
        undefined += u
    if getattr(base, "is_voc", False):
        metrics["voc_mAP50"] = voc_map50(gt, pred.results["bbox"], img_ids=pred.img_ids)
    if results_file is not None:
        _write_json_atomic(pred.file_entries, Path(results_file))
    results, img_ids, inference = pred.results, pred.img_ids, pred.inference
    return EvalResult(
        metrics=metrics,
        num_images=len(img_ids),
        seconds=time.perf_counter() - t0,
        iou_types=types,
        num_detections=len(results["bbox"]),
        inference_seconds=inference,
        undefined=undefined,
    )


def reference_ground_truth(
    reference: nn.Module,
    dataset: Any,
    *,
    min_score: float = 0.25,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> Any:
    """A pycocotools ``COCO`` ground truth made of ``reference``'s own detections with a score of at
    least ``min_score`` on ``dataset``'s images (read with ``load_image``; no annotation is read:
    the image sizes come from the images, the category ids from the class list). Passed to
    :func:`evaluate` as ``ground_truth``, it scores how well another model (a cut copy of
    ``reference``) agrees with it: mAP against the dense model, for label-free sensitivity."""
    from pycocotools.coco import COCO

    base, indices = _unwrap(dataset)
    if not (hasattr(base, "load_image") and hasattr(base, "image_ids")):
        raise TypeError(f"reference_ground_truth() needs a surgery DetectionDataset, got {type(base).__name__}")
    if not indices:
        raise DataError(f"nothing to evaluate: dataset {getattr(base, 'name', type(base).__name__)} has no images selected")
    cats = sorted(int(c) for c in (getattr(base, "label_to_cat_id", None) or {}) or base.coco.getCatIds())
    was_training, images, annotations = reference.training, [], []
    reference.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(indices), batch_size):
                batch = [(base.load_image(i), int(base.image_ids[i])) for i in indices[start : start + batch_size]]
                outputs = reference([img.to(device) for img, _ in batch])
                if isinstance(outputs, tuple):  # (losses, detections) from some wrappers
                    outputs = outputs[-1]
                for (img, iid), out in zip(batch, outputs, strict=True):
                    images.append({"id": iid, "width": int(img.shape[-1]), "height": int(img.shape[-2])})
                    keep = out["scores"].detach().float().cpu() >= min_score
                    boxes = out["boxes"].detach().float().cpu()[keep]
                    for box, label in zip(boxes.tolist(), out["labels"].detach().cpu()[keep].tolist(), strict=True):
                        w, h = box[2] - box[0], box[3] - box[1]
                        annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": int(label),
                                            "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
    finally:
        reference.train(was_training)
    gt = COCO()
    gt.dataset = {"info": {}, "images": images, "annotations": annotations, "categories": [{"id": c, "name": str(c)} for c in cats]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _selection(dataset: Any, batch_size: int, max_images: int | None, iou_types: tuple[str, ...] | None) -> tuple[Any, list[int], Any]:
    """The dataset behind ``dataset``, the indices to evaluate and its COCO ground truth."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if iou_types is not None:
        bad = [t for t in iou_types if t not in PREFIXES]
        if bad:
            raise ValueError(f"unknown iou type(s) {bad}; expected some of {IOU_TYPES}")
    base, indices = _unwrap(dataset)
    gt = getattr(base, "coco", None)
    if gt is None:
        raise TypeError(f"evaluate() needs a surgery DetectionDataset (with a .coco ground truth), got {type(base).__name__}")
    if max_images is not None:
        indices = indices[: max(0, int(max_images))]
    name = getattr(base, "name", type(base).__name__)
    if not indices:
        raise DataError(f"nothing to evaluate: dataset {name} has no images selected")
    return base, indices, gt


@dataclass
class _Predictions:
    results: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"bbox": [], "segm": [], "keypoints": []})
    file_entries: list[dict[str, Any]] = field(default_factory=list)
    img_ids: list[int] = field(default_factory=list)
    saw_masks: bool = False
    saw_keypoints: bool = False
    inference: float = 0.0  # seconds in the model's forward


def _predict(
    model: nn.Module, base: Any, indices: list[int], batch_size: int, device: torch.device, gt_cats: set[int],
    label_map: dict[int, int], progress: Callable[[int, int], None] | None,
) -> _Predictions:
    """Run ``model`` on the selected images in order and collect its detections."""
    pred = _Predictions()
    has_load = hasattr(base, "load_image") and hasattr(base, "image_ids")
    for start in range(0, len(indices), batch_size):
        images, ids = [], []
        for i in indices[start : start + batch_size]:
            if has_load:
                img, iid = base.load_image(i), int(base.image_ids[i])
            else:
                img, target = base[i]
                iid = int(target["image_id"])
            images.append(img.to(device, non_blocking=True))
            ids.append(iid)
        t1 = time.perf_counter()
        outputs = model(images)
        if isinstance(outputs, tuple):  # (losses, detections) from some wrappers
            outputs = outputs[-1]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        pred.inference += time.perf_counter() - t1
        for iid, out in zip(ids, outputs, strict=True):
            pred.saw_masks |= "masks" in out
            pred.saw_keypoints |= "keypoints" in out
            _collect(iid, out, gt_cats, label_map, pred.results, pred.file_entries)
        pred.img_ids.extend(ids)
        if progress is not None:
            progress(len(pred.img_ids), len(indices))
    return pred


def _iou_types(asked: tuple[str, ...] | None, base: Any, pred: _Predictions) -> list[str]:
    """``asked``, or ``bbox`` plus ``segm`` / ``keypoints`` when the model and the ground truth have them."""
    if asked is not None:
        return list(dict.fromkeys(asked))
    types = ["bbox"]
    if pred.saw_masks and getattr(base, "has_masks", False):
        types.append("segm")
    if pred.saw_keypoints and getattr(base, "has_keypoints", False):
        types.append("keypoints")
    return types



def _collect(
    image_id: int,
    out: dict[str, torch.Tensor],
    gt_cats: set[int],
    label_map: dict[int, int],
    results: dict[str, list[dict[str, Any]]],
    file_entries: list[dict[str, Any]],
) -> None:
    """Append one image's detections to the per-IoU-type result lists (contiguous labels) and to
    the results-file list (original category ids)."""
    boxes = out["boxes"].detach().float().cpu()
    if boxes.numel() == 0:
        return
    scores = out["scores"].detach().float().cpu().tolist()
    labels = out["labels"].detach().cpu().tolist()
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    xywh = xywh.tolist()
    rles: Sequence[dict[str, Any]] | None = _encode_masks(out["masks"].detach().float().cpu()) if "masks" in out else None
    kps = out["keypoints"].detach().float().cpu() if "keypoints" in out else None
    for k, (label, score) in enumerate(zip(labels, scores, strict=True)):
        label = int(label)
        if label not in gt_cats:  # a class the dataset does not have (e.g. a COCO-pretrained head)
            continue
        box = [round(v, 3) for v in xywh[k]]
        score = round(float(score), 6)
        results["bbox"].append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
        entry: dict[str, Any] = {"image_id": image_id, "category_id": label_map.get(label, label), "bbox": box, "score": score}
        if rles is not None:
            results["segm"].append({"image_id": image_id, "category_id": label, "segmentation": rles[k], "score": score})
            entry["segmentation"] = rles[k]
        if kps is not None:
            flat = [round(v, 2) for v in kps[k].reshape(-1).tolist()]
            results["keypoints"].append({"image_id": image_id, "category_id": label, "keypoints": flat, "score": score})
            entry["keypoints"] = flat
        file_entries.append(entry)
