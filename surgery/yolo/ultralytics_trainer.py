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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data.yolo_format import read_data_yaml
from ..errors import DataError
from ..storage.checkpoint import save_checkpoint
from .ultralytics_adapter import _ultralytics
from .ultralytics_handback import save_for_ultralytics

_ultralytics()  # offline and inert before the trainers are imported
from ultralytics import YOLO  # noqa: E402 - after the offline set-up
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
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


@dataclass(frozen=True)
class UltralyticsRetrain:
    """What ``surgery retrain --engine ultralytics`` wrote and measured."""

    checkpoint: Path  # the surgery checkpoint (weights_only, rebuilds from its spec and plan)
    handed_back: Path  # the same network as an Ultralytics .pt (save_for_ultralytics)
    run_dir: Path  # Ultralytics' run folder (weights/last.pt, best.pt, results.csv)
    params: int
    metrics: dict[str, float]  # Ultralytics' last validation metrics (empty with val=False)


def ultralytics_device(device: str) -> str:
    """surgery's ``--device`` (cpu, cuda, cuda:1) as Ultralytics spells it (cpu, 0, 1)."""
    device = str(device).strip().lower()
    if device.startswith("cuda"):
        return device.partition(":")[2] or "0"
    return device


def retrain_with_ultralytics(
    model: nn.Module,
    spec: Any,
    *,
    data_yaml: str | Path,
    out: str | Path,
    kind: str = "structured",
    plan: Any = None,
    recipe: dict[str, Any] | None = None,
    train_args: dict[str, Any] | None = None,
) -> UltralyticsRetrain:
    """Train ``model`` (an :class:`~.ultralytics_adapter.UltralyticsDetector`, pruned or not) with
    Ultralytics' own training loop (its augmentation, loss gains, EMA, AMP, schedule), widths kept
    (:class:`PrunedDetectionTrainer` or the head's task trainer), then write the surgery checkpoint ``out`` (same spec and
    plan, the trained weights) and ``out`` with suffix ``.ultralytics.pt`` (the hand-back file).
    ``train_args``: Ultralytics' training arguments (``epochs``, ``batch``, ``device``, ``lr0``...);
    ``imgsz`` defaults to the model's letterbox size, the run folder to ``<out>_ultralytics`` (an absolute
    path: a relative project would land under Ultralytics' own ``runs_dir`` setting)."""
    out = Path(out)
    run_dir = out.with_name(out.stem + "_ultralytics")
    start = out.with_name(out.stem + ".start.ultralytics.pt")
    names = read_data_yaml(data_yaml).names
    if len(names) != model.num_classes:
        raise DataError(f"{data_yaml} lists {len(names)} classes but the model predicts {model.num_classes}: "
                        "a pruned head keeps its classes")  # fmt: skip
    save_for_ultralytics(model, start, class_names=["__background__", *names], source=str(out))
    args = {"epochs": 1, "imgsz": int(model.transform.canvas()), "workers": 0, "plots": False, "verbose": False,
            **(train_args or {}), "data": str(data_yaml), "project": str(run_dir.parent.resolve()), "name": run_dir.name,
            "exist_ok": True}  # fmt: skip
    yolo = YOLO(str(start))
    yolo.train(trainer=trainer_for(model.task), **args)
    trained = yolo.model
    model.net.load_state_dict({k: v.float() for k, v in trained.state_dict().items()})
    model._sync_widths()
    metrics = {str(k): float(v) for k, v in (getattr(yolo, "metrics", None) and yolo.metrics.results_dict or {}).items()}
    params = sum(p.numel() for p in model.net.parameters())
    save_checkpoint(out, model, spec, kind=kind, plan=plan, recipe=recipe, class_names=["__background__", *names],
                    metrics={"params": params, "ultralytics": metrics})  # fmt: skip
    back = save_for_ultralytics(model, out.with_suffix(".ultralytics.pt"), class_names=["__background__", *names],
                                source=str(out))  # fmt: skip
    start.unlink(missing_ok=True)
    return UltralyticsRetrain(out, back.path, Path(yolo.trainer.save_dir), params, metrics)
