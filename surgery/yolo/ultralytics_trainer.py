"""Ultralytics' own trainers, keeping a pruned model's widths: ``YOLO("pruned.pt").train(...,
trainer=PrunedDetectionTrainer)`` and ``surgery retrain CKPT --engine ultralytics``.

Why this exists: Ultralytics' ``Model.train`` and ``BaseTrainer.setup_model`` hand the loaded
network to ``get_model(cfg=model.yaml, weights=model)``, and every task trainer's ``get_model``
builds a *new* model from the yaml and copies the weights whose shapes match. A yaml cannot say
"this conv has 23 channels", so a pruned network comes back at its original widths (Ultralytics
only logs "Transferred 65/355 items"). These trainers return the given network itself instead,
so the pruned layers are what trains, what EMA averages and what ``last.pt`` / ``best.pt`` hold.

Multi-GPU: Ultralytics' DDP launcher pickles the trainer class and ``trainer.model`` for its
workers and each worker runs ``setup_model``, which loads the checkpoint and calls ``get_model``
with it: the same override keeps the pruned network there, as long as the class is importable in
the workers (it is: ``surgery.yolo.ultralytics_trainer``). Not tested here (no GPUs).

The head's class count cannot change here (a pruned head has its own widths): the dataset must
list as many classes as the network predicts, or ``get_model`` raises one clear error.

Importing this module imports Ultralytics (offline, see :mod:`.ultralytics_adapter`).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .ultralytics_adapter import _ultralytics

_ultralytics()  # offline and inert before the trainers are imported
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402 - after the offline set-up
from ultralytics.models.yolo.obb import OBBTrainer  # noqa: E402
from ultralytics.models.yolo.pose import PoseTrainer  # noqa: E402
from ultralytics.models.yolo.segment import SegmentationTrainer  # noqa: E402


class WidthsKept:
    """The ``get_model`` override shared by the task trainers below (see the module docstring)."""

    data: dict[str, Any]

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        if not isinstance(weights, nn.Module):  # no network given: Ultralytics' own build from cfg
            return super().get_model(cfg=cfg, weights=weights, verbose=verbose)  # type: ignore[misc]
        net = copy.deepcopy(weights).float()
        nc = int(getattr(net.model[-1], "nc", -1))
        if self.data.get("nc") is not None and int(self.data["nc"]) != nc:
            raise ValueError(
                f"the pruned network predicts {nc} classes but the dataset lists {self.data['nc']}: a pruned "
                "head keeps its classes (retrain on a dataset with the same classes, or prune a model built for them)"
            )
        for p in net.parameters():
            p.requires_grad_(True)
        if self.data.get("names"):
            net.names = dict(self.data["names"])
        net.nc = nc
        return net


class PrunedDetectionTrainer(WidthsKept, DetectionTrainer):
    """``DetectionTrainer`` that trains the network it is given (pruned widths kept)."""


class PrunedSegmentationTrainer(WidthsKept, SegmentationTrainer):
    """``SegmentationTrainer`` that trains the network it is given (pruned widths kept)."""


class PrunedPoseTrainer(WidthsKept, PoseTrainer):
    """``PoseTrainer`` that trains the network it is given (pruned widths kept)."""


class PrunedOBBTrainer(WidthsKept, OBBTrainer):
    """``OBBTrainer`` that trains the network it is given (pruned widths kept)."""


TRAINERS: dict[str, type] = {
    "detect": PrunedDetectionTrainer,
    "segment": PrunedSegmentationTrainer,
    "pose": PrunedPoseTrainer,
    "obb": PrunedOBBTrainer,
}


def trainer_for(task: str) -> type:
    """The width-keeping trainer of an Ultralytics task (``detect``, ``segment``, ``pose``, ``obb``)."""
    try:
        return TRAINERS[task]
    except KeyError:
        raise ValueError(f"no width-keeping trainer for Ultralytics task {task!r} (expected one of {', '.join(TRAINERS)})") from None


def train_line(path: str, task: str = "detect") -> str:
    """The one line that fine-tunes a handed-back file with Ultralytics' trainer, widths kept."""
    name = trainer_for(task).__name__
    return (f"from surgery.yolo.ultralytics_trainer import {name}; "
            f"YOLO({path!r}).train(data='data.yaml', trainer={name}, ...)")  # fmt: skip
