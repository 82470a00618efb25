"""Datasets: the built-in synthetic shapes set, COCO and Pascal VOC, behind one interface.

Every source becomes a :class:`DetectionDataset` yielding ``(image, target)`` the way torchvision
detectors expect: ``image`` is a float CHW tensor in [0, 1], ``target`` holds ``boxes`` (float32
``[N, 4]`` xyxy absolute pixels), ``labels`` (int64 ``[N]``, contiguous ``1..K``), ``image_id``
(int) and, with ``with_masks=True`` on annotations that have segmentation, ``masks`` (uint8
``[N, H, W]``). Crowd (COCO) and difficult (VOC) objects are not training targets; they stay in
:attr:`DetectionDataset.coco` (the ground truth in the contiguous label space, used by
:mod:`surgery.measure.evaluate`) with ``iscrowd=1`` so the COCO evaluator ignores detections on them.

The synthetic set (:func:`synthesize`) is a deterministic COCO-format folder of 4 shape classes on
textured backgrounds; :func:`ensure_synthetic` generates it once into a cache folder.

Modules: :mod:`.synth` (synthetic generation and cache), :mod:`.datasets` (the common dataset
class, flips), :mod:`.coco` and :mod:`.voc` (readers), :mod:`.loader` (source strings,
:func:`dataset_for` / :func:`synthetic_options` for a recipe's data section, collate, loaders),
:mod:`.draw` (boxes on sample images).
"""

from __future__ import annotations

from .coco import CocoDetection, load_coco_ground_truth
from .datasets import BACKGROUND, BOX_TOLERANCE, DetectionDataset, hflip_sample
from .draw import draw_samples
from .loader import (
    SYNTH_DEFAULTS,
    build_dataset,
    collate_fn,
    dataset_for,
    make_loader,
    synthetic_options,
)
from .synth import (
    DONE_MARKER,
    GENERATOR_VERSION,
    SYNTH_CLASSES,
    SynthInfo,
    default_synthetic_root,
    ensure_synthetic,
    render_synthetic_image,
    synthesize,
    synthetic_dir_name,
)
from .voc import VOC_CLASSES, VOCDetection, load_voc_ground_truth

__all__ = [
    "BACKGROUND",
    "BOX_TOLERANCE",
    "DONE_MARKER",
    "GENERATOR_VERSION",
    "SYNTH_CLASSES",
    "SYNTH_DEFAULTS",
    "VOC_CLASSES",
    "CocoDetection",
    "DetectionDataset",
    "SynthInfo",
    "VOCDetection",
    "build_dataset",
    "collate_fn",
    "dataset_for",
    "default_synthetic_root",
    "draw_samples",
    "ensure_synthetic",
    "hflip_sample",
    "load_coco_ground_truth",
    "load_voc_ground_truth",
    "make_loader",
    "render_synthetic_image",
    "synthesize",
    "synthetic_dir_name",
    "synthetic_options",
]
