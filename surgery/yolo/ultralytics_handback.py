"""Hand a pruned Ultralytics YOLO back to Ultralytics: ``surgery export CKPT --format ultralytics``.

Ultralytics rebuilds a model from its yaml whenever it can, and a yaml cannot say "this conv has 23
channels": loading pruned weights into a rebuilt model silently restores the original widths or
fails on shapes. So the file holds the network *object* itself, the way Ultralytics' own ``.pt``
files do: a ``torch.save`` dict ``{"model": DetectionModel, "train_args": {...}, "version",
"date", "license", "surgery": {...}}`` whose ``DetectionModel`` has the pruned layers (and the
original yaml in ``model.yaml``, which therefore no longer describes it). ``YOLO("pruned.pt")``
then predicts, validates and exports with the pruned widths.

**It is a pickle.** Loading it with plain ``torch.load`` runs whatever code it references, so trust
such a file only if you made it. Ultralytics can load it without running code
(``ULTRALYTICS_SAFE_LOAD=1``: ``weights_only`` with an allow-list of its own classes), and the file
references nothing else: plain dicts, tensors and Ultralytics/torch modules. surgery itself never
reads it back (its own checkpoints stay ``weights_only`` state dicts).

Training it with ``YOLO("pruned.pt").train(...)`` alone goes through Ultralytics' trainer, which
rebuilds the model from ``model.yaml`` and copies the weights whose shapes match: the pruned widths
would be lost. Pass ``trainer=PrunedDetectionTrainer`` (:mod:`.ultralytics_trainer`, the line
:func:`surgery.yolo.ultralytics_trainer.train_line` prints) or run ``surgery retrain CKPT --engine
ultralytics``. ``train_args`` holds the image size, the task and the training arguments of the
user's own ``best.pt`` when the model came from one; ``model.names`` the class names (from the
checkpoint, the ``.pt`` it came from, or the dataset its recipe names).
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.loader import build_dataset
from ..data.synth import SYNTH_CLASSES
from ..data.yolo_format import read_data_yaml
from ..deployment.export import ExportError
from ..errors import DataError
from ..storage.atomic import atomic_path
from .ultralytics_adapter import UltralyticsDetector, ultralytics_version


@dataclass(frozen=True)
class HandBack:
    path: Path
    params: int  # parameters of the network written (what Ultralytics will count)
    names: dict[int, str]
    imgsz: int
    file_bytes: int


def recipe_class_names(recipe: dict[str, Any] | None) -> list[str] | None:
    """The object class names (no background) of the dataset a checkpoint's recipe names, or
    ``None`` when it names none or it cannot be read (a model pruned from a yaml has no names of
    its own; the dataset its recipe calibrated or recovered on has)."""
    source = ((recipe or {}).get("data") or {}).get("source")
    if not isinstance(source, str) or not source:
        return None
    try:
        if source == "synthetic":
            return list(SYNTH_CLASSES)
        if source.startswith("yolo:"):
            return read_data_yaml(source[5:]).names
        return build_dataset(source, "val", train=False).class_names[1:]
    except (DataError, OSError):
        return None


def save_for_ultralytics(
    model: nn.Module, path: str | Path, *, class_names: list[str] | None = None, source: str = "",
    task: str | None = None,
) -> HandBack:
    """Write ``model``'s Ultralytics network (``model.net``, with its pruned widths) to ``path`` in
    the checkpoint layout Ultralytics loads (see the module docstring), atomically.
    ``class_names``: label index -> name with index 0 the background (a surgery checkpoint's)."""
    if not isinstance(model, UltralyticsDetector):
        raise ExportError(
            f"--format ultralytics needs an Ultralytics model (ultralytics:<yaml>), got {type(model).__name__}"
        )
    model._sync_widths()  # C2f-style blocks read their half width at run time
    net = copy.deepcopy(model.net).float().eval()
    for name in ("args", "criterion"):  # surgery's loss settings: Ultralytics attaches its own on load
        net.__dict__.pop(name, None)
    head = net.model[-1]
    for name in ("max_det", "_end2end"):  # surgery's inference choices: Ultralytics makes its own (nms=...)
        head.__dict__.pop(name, None)
    if class_names and len(class_names) == model.num_classes + 1:
        net.names = {i: str(n) for i, n in enumerate(class_names[1:])}
    elif model.class_names and len(model.class_names) == model.num_classes:
        net.names = dict(enumerate(model.class_names))
    size = int(model.transform.canvas())
    params = sum(p.numel() for p in net.parameters())
    ckpt = {
        "model": net,
        "train_args": {**getattr(model, "train_args", {}), "task": task or model.task, "imgsz": size},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": ultralytics_version(),
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "surgery": {"source": str(source), "params": int(params)},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return HandBack(path, int(params), dict(net.names), size, path.stat().st_size)
