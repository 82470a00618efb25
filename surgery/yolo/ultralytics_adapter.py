"""Ultralytics YOLO detectors (``--model ultralytics:yolov8n.yaml``), an optional extra.

Ultralytics is AGPL-3.0: nothing of it is copied here. This is the only module that imports it, and
only when such a model is built (``pip install 'surgery[yolo]'``); without it the model name is one
clear error. Before the import the package is made offline and inert: ``YOLO_OFFLINE`` (no
connectivity probe, no downloads), ``YOLO_AUTOINSTALL=0`` (never pip-installs missing requirements),
``ULTRALYTICS_SAFE_LOAD=1`` (model yamls are parsed without ``eval``: a yaml is data here; as the
package may have been imported before, every config is also checked by :mod:`.config_check` and
built with that mode forced for the call),
``YOLO_VERBOSE=0``, its settings file kept in surgery's cache unless ``YOLO_CONFIG_DIR`` is set, and
its event ``sync`` switched off for this process. Plotting (which may fetch a font) is never called.

References: a yaml the package ships (``yolov8n.yaml``, ``yolo11s.yaml``: the scale letter picks
the size), a user's model yaml (data), or a user's ``.pt`` (a pickle: needs ``--trust-code``).
The resolved yaml is recorded in the spec's ``cfg`` argument, so a checkpoint rebuilds from it with
``weights_only=True`` and never needs the original file (nor the pickle) again.

The network is wrapped in :class:`~surgery.yolo.interface.YoloInterface` (torchvision's interface)
and trained with the model's own detection loss (its ``init_criterion()``: ``v8DetectionLoss``,
task-aligned assignment, BCE, CIoU and DFL with Ultralytics' default gains; for end-to-end heads
``E2ELoss``, the one-to-many and one-to-one branches' losses weighted 0.8/0.2, the weights
Ultralytics starts its decay from), averaged per image.

**Heads.** ``Detect`` (YOLOv3/v5/v6/v8/v9, YOLO11, YOLO12) and the end-to-end (NMS-free) heads:
``v10Detect`` (YOLOv10) and ``Detect`` with ``end2end: True`` (YOLO26, ``reg_max: 1``). These have
a second, one-to-one branch (``one2one_cv2``/``one2one_cv3``, copies of ``cv2``/``cv3``) trained on
*detached* neck features. By default (``end2end=True``) eval, predict and export use the one-to-one
outputs through the head's own top-k, without NMS; ``-k end2end=false`` uses the one-to-many
outputs with NMS instead (Ultralytics' ``nms=True`` behaviour). Both branches are pruned with the
neck (see ``trace_context``). Task heads: ``Segment`` / ``Pose`` / ``OBB`` (and YOLO26's ``Segment26``,
``Pose26``, ``OBB26``) build as Ultralytics' Segmentation/Pose/OBB models and prune the same way; their
mask prototypes and coefficients, keypoints and angles reach the loss directly, so the trace finds
them as output layers and never cuts them. surgery's own loop trains them with what its targets hold
(box-shaped masks, invisible keypoints unless given, angle 0: see ``_task_targets``) and evaluates
their boxes; real masks / keypoints / angles train through Ultralytics' trainer (``retrain --engine
ultralytics``) and are scored by Ultralytics' val on the handed-back file. Every other head of the package is refused in one line
(:data:`REFUSED_HEADS`); :func:`list_ultralytics_detection_yamls` says which shipped yamls work.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .. import compat
from ..data.synth import default_synthetic_root
from ..detectors.specs import register_scheme
from ..errors import UnknownModelError
from ..storage.trust import read_small_file, refuse, safe_yaml_load, trust_enabled
from .config_check import MAX_CLASSES, MAX_SIDE, check_config, short_source
from .interface import YoloInterface, xyxy_to_cxcywh

SCHEME = "ultralytics"
INSTALL_HINT = "pip install 'surgery[yolo]' (or: pip install ultralytics; Ultralytics is AGPL-3.0)"
_ENV_FORCED = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "ULTRALYTICS_SAFE_LOAD": "1"}
DETECT_HEADS = ("Detect", "v10Detect")
# task heads (Detect subclasses): pruned through the graph like Detect; their extra outputs (mask
# prototypes and coefficients, keypoints, angles) feed the loss directly, so they are output layers
# and never cut. Ultralytics' task of each (its trainer, its val) and the model class that builds it.
TASK_HEADS = {"Segment": "segment", "Segment26": "segment", "Pose": "pose", "Pose26": "pose", "OBB": "obb",
              "OBB26": "obb"}  # fmt: skip
SUPPORTED_HEADS = DETECT_HEADS + tuple(TASK_HEADS)
_MODEL_CLASSES = {"detect": "DetectionModel", "segment": "SegmentationModel", "pose": "PoseModel", "obb": "OBBModel"}
# Heads of the package that are refused, by the name a model yaml gives its last module, with why.
REFUSED_HEADS = {
    "WorldDetect": "YOLO-World is open-vocabulary: its class embeddings come from a CLIP text model (downloaded)",
    "YOLOEDetect": "YOLOE is open-vocabulary: its prompt embeddings come from a text/visual encoder (downloaded)",
    "RTDETRDecoder": "RT-DETR's transformer decoder (Hungarian matching, no Detect head) is not supported",
    "Classify": "a classifier, not a detector",
}


@functools.cache
def _ultralytics() -> SimpleNamespace:
    """Import the package offline (see the module docstring); one clear error without it."""
    os.environ.update(_ENV_FORCED)
    os.environ.setdefault("YOLO_VERBOSE", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(default_synthetic_root() / "ultralytics"))
    try:
        from ultralytics import __version__
        from ultralytics.cfg import DEFAULT_CFG_DICT
        from ultralytics.nn import tasks
        from ultralytics.nn.modules.head import Detect
        from ultralytics.utils import SETTINGS
    except ImportError as e:
        raise UnknownModelError(f"Ultralytics models need the optional package: {INSTALL_HINT} ({e})") from None
    dict.__setitem__(SETTINGS, "sync", False)  # in memory only: the user's settings file is not rewritten
    models_dir = Path(tasks.__file__).resolve().parents[1] / "cfg" / "models"
    return SimpleNamespace(tasks=tasks, Detect=Detect, hyp=dict(DEFAULT_CFG_DICT), models_dir=models_dir,
                           version=str(__version__))  # fmt: skip


def ultralytics_version() -> str:
    """The installed Ultralytics version (imported offline, see the module docstring)."""
    return _ultralytics().version


def _head_name(cfg: dict[str, Any]) -> str:
    """The class name of a model yaml's last module (its head), ``"?"`` if the yaml has none."""
    try:
        return str(cfg["head"][-1][2]).split(".")[-1]
    except (KeyError, IndexError, TypeError):
        return "?"


def head_refusal(cfg: dict[str, Any]) -> str | None:
    """Why a model yaml's head is refused (one line), or ``None`` when surgery prunes it."""
    head = _head_name(cfg)
    if head in SUPPORTED_HEADS:
        return None
    why = REFUSED_HEADS.get(head, "not a YOLO detection head")
    return (f"head {head}: {why}; surgery prunes YOLO models with a Detect, v10Detect, Segment, Pose or OBB head "
            "(YOLOv3/v5/v6/v8/v9/v10, YOLO11, YOLO12, YOLO26)")  # fmt: skip


@dataclass(frozen=True)
class UltralyticsYaml:
    """One detection model yaml the installed Ultralytics ships (``surgery models``, tests, README)."""

    name: str  # what ``ultralytics:<name>`` takes (the smallest scale: yolov8n.yaml for yolov8.yaml)
    file: str  # the shipped file, relative to ultralytics/cfg/models
    head: str
    supported: bool
    reason: str = ""  # why it is refused (one line), empty when supported


def list_ultralytics_detection_yamls() -> list[UltralyticsYaml]:
    """Every *detection* model yaml of the installed package (Ultralytics' own task guess from the
    head's name), named at its first scale, with whether surgery builds it and why not."""
    u = _ultralytics()
    out = []
    for path in sorted(u.models_dir.rglob("*.yaml")):
        cfg = safe_yaml_load(path.read_bytes(), str(path))
        if not isinstance(cfg, dict) or "head" not in cfg:
            continue
        if u.tasks.guess_model_task(cfg) != "detect" and _head_name(cfg) != "RTDETRDecoder":  # RT-DETR detects too
            continue
        name = path.name
        scales = cfg.get("scales")
        if isinstance(scales, dict) and scales and re.match(r"yolo\D*\d+(-|$)", path.stem):  # no scale letter
            name = re.sub(r"(\d+)", rf"\g<1>{next(iter(scales))}", path.stem, count=1) + path.suffix
        why = head_refusal(cfg)
        out.append(UltralyticsYaml(name, str(path.relative_to(u.models_dir)), _head_name(cfg), why is None, why or ""))
    return out


@contextlib.contextmanager
def _restricted(tasks: Any) -> Iterator[None]:
    """Ultralytics' no-eval build path for this call, whatever its import-time ``ULTRALYTICS_SAFE_LOAD``
    was (it is read once, when the package is first imported, maybe before surgery set it). The
    thread flag is the one its own restricted loads set; :func:`check_config` is the boundary either way."""
    local = getattr(getattr(tasks, "_SafeLoad", None), "_local", None)
    before = getattr(local, "active", False)
    if local is not None:
        local.active = True
    try:
        yield
    finally:
        if local is not None:
            local.active = before


def resolve(spec: Any) -> Any:
    """The builder for ``spec`` (``ultralytics:<yaml or .pt>``); records the resolved yaml in
    ``spec.kwargs["cfg"]`` the first time (called by :func:`surgery.detectors.builders.build_model`)."""
    ref = spec.name.split(":", 1)[1]
    if not ref:
        raise UnknownModelError(f"model {spec.name!r}: expected ultralytics:<model yaml or .pt>, e.g. ultralytics:yolov8n.yaml")
    _ultralytics()
    state = None
    if spec.kwargs.get("cfg") is None:
        cfg, state, meta = _read_reference(spec.name, ref)
        spec.kwargs["cfg"] = cfg
        for key, value in meta.items():  # a trained .pt's names, imgsz, training arguments (recorded)
            spec.kwargs.setdefault(key, value)
    return functools.partial(build_ultralytics, _state_dict=state)


def _read_reference(name: str, ref: str) -> tuple[dict[str, Any], dict[str, Tensor] | None, dict[str, Any]]:
    u = _ultralytics()
    path = Path(ref).expanduser()
    if path.suffix in {".pt", ".pth"}:
        return _read_pickle(name, path)
    if path.suffix not in {".yaml", ".yml"}:
        raise UnknownModelError(f"model {name!r}: expected a model .yaml (shipped or yours) or a .pt file, got {ref!r}")
    if path.exists():  # the user's yaml: read as data (stat first: a 3 GB or FIFO yaml is one line)
        raw = read_small_file(path, f"model {name!r}: yaml", error=UnknownModelError)
        try:
            cfg = safe_yaml_load(raw, str(path))
        except yaml.YAMLError as e:  # e.g. a !!python tag: safe loading refuses it
            raise UnknownModelError(f"model {name!r}: {path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(cfg, dict) or "backbone" not in cfg or "head" not in cfg:
            raise UnknownModelError(f"model {name!r}: {path} is not an Ultralytics model yaml (no backbone/head)")
        cfg.setdefault("scale", u.tasks.guess_model_scale(path))
        cfg.setdefault("yaml_file", str(path))
        return cfg, None, {}
    if len(path.parts) > 1:
        raise UnknownModelError(f"model {name!r}: file {ref} does not exist")
    try:
        return u.tasks.yaml_model_load(ref), None, {}  # a yaml the package ships (no download for a bare name)
    except (FileNotFoundError, OSError) as e:
        raise UnknownModelError(
            f"model {name!r}: Ultralytics ships no model yaml {ref!r} (e.g. yolov8n.yaml, yolo11s.yaml) ({e})"
        ) from None


def _json_args(args: Any) -> dict[str, Any]:
    """The plain-valued training arguments of an Ultralytics checkpoint (what a surgery checkpoint
    can record without a pickle): strings, numbers, booleans, None and lists of them."""
    plain = (str, int, float, bool, type(None))
    items = vars(args).items() if hasattr(args, "__dict__") else dict(args or {}).items()
    return {str(k): (list(v) if isinstance(v, tuple) else v) for k, v in items
            if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}  # fmt: skip


def _pickle_meta(ckpt: Any, net: nn.Module) -> dict[str, Any]:
    """What a user's trained ``best.pt`` says besides its weights: class names (``names``), the
    image size it was trained at (``size``, a multiple of 32) and its training arguments."""
    meta: dict[str, Any] = {}
    names = getattr(net, "names", None)
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        meta["names"] = [str(names[i]) for i in range(len(names))]
    elif isinstance(names, (list, tuple)):
        meta["names"] = [str(n) for n in names]
    args = _json_args(ckpt.get("train_args") if isinstance(ckpt, dict) else None)
    if args:
        meta["train_args"] = args
    imgsz = args.get("imgsz")
    if isinstance(imgsz, int) and not isinstance(imgsz, bool) and 32 <= imgsz <= 4096:
        meta["size"] = imgsz
    return meta


def _read_pickle(name: str, path: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    if not trust_enabled():
        raise refuse(name)  # a .pt is a pickle: it runs code when loaded
    if not path.is_file():
        raise UnknownModelError(f"model {name!r}: file {path} does not exist (nothing is downloaded)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # trusted above, like --trust-code asks
    net = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
    if not isinstance(net, nn.Module) or not isinstance(getattr(net, "yaml", None), dict):
        raise UnknownModelError(f"model {name!r}: {path} is not an Ultralytics model checkpoint")
    cfg = copy.deepcopy(net.yaml)
    cfg["nc"] = int(getattr(net, "nc", cfg.get("nc", 80)))
    return cfg, {k: v.float() for k, v in net.state_dict().items()}, _pickle_meta(ckpt, net)


def build_ultralytics(
    cfg: dict[str, Any],
    nc: int | None = None,
    size: int = 640,
    score_thresh: float = 0.001,
    nms_thresh: float = 0.7,
    detections_per_img: int = 100,
    end2end: bool = True,
    names: list[str] | None = None,
    train_args: dict[str, Any] | None = None,
    _state_dict: dict[str, Tensor] | None = None,
) -> UltralyticsDetector:
    """An Ultralytics ``DetectionModel`` built from ``cfg`` (a model yaml dict), in torchvision's
    interface. ``nc``: object classes (labels 1..nc; the yaml's value by default); ``size``: the
    letterbox size (a multiple of 32 is used); ``end2end``: for heads with a one-to-one branch
    (YOLOv10, YOLO26), predict with it and without NMS (``False``: the one-to-many branch and NMS);
    ``names``, ``train_args``: what a trained ``.pt`` recorded (class names, Ultralytics' training
    arguments), kept for the hand-back (:mod:`.ultralytics_handback`)."""
    u = _ultralytics()
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or not 1 <= nc <= MAX_CLASSES):
        raise UnknownModelError(f"ultralytics model: nc must be an integer in 1..{MAX_CLASSES} (object classes), got {nc!r}")
    # a head surgery does not prune (YOLO-World, YOLOE, RT-DETR...) is named first: its reason is
    # clearer than the allow-list's complaint about the keys such a yaml brings along
    refusal = head_refusal(cfg) if isinstance(cfg, dict) else None
    if refusal is not None:
        raise UnknownModelError(f"ultralytics model {short_source(cfg.get('yaml_file', '?'))}: {refusal}")
    if not isinstance(size, int) or isinstance(size, bool) or not 32 <= size <= MAX_SIDE:
        raise UnknownModelError(f"ultralytics model: size must be an integer in [32, {MAX_SIDE}] (the letterbox side), got {size!r}")
    check_config(cfg, str(cfg.get("yaml_file", "config")) if isinstance(cfg, dict) else "config", nc=nc, size=size)
    if not isinstance(end2end, bool):
        raise UnknownModelError(f"ultralytics model: end2end must be true or false, got {end2end!r}")
    try:
        with _restricted(u.tasks):
            task = TASK_HEADS.get(_head_name(cfg), "detect")
            net = getattr(u.tasks, _MODEL_CLASSES[task])(copy.deepcopy(cfg), ch=3, nc=nc, verbose=False)
    except (KeyError, TypeError, ValueError, AssertionError, IndexError) as e:
        why = " ".join(str(e).split())
        raise UnknownModelError(f"ultralytics model {short_source(cfg.get('yaml_file', '?'))}: cannot build it from its yaml "
                                f"({type(e).__name__}: {why[:200]})") from e
    head = net.model[-1]
    if not isinstance(head, u.Detect) or type(head).__name__ not in SUPPORTED_HEADS:  # a yaml naming another class
        raise UnknownModelError(
            f"ultralytics model {short_source(cfg.get('yaml_file', '?'))}: head {type(head).__name__}: not a YOLO detection head"
        )
    if _has_one2one(head):
        head.end2end = bool(end2end)  # which branch inference uses; training always runs both
    if _state_dict is not None:
        try:
            net.load_state_dict(_state_dict)
        except RuntimeError as e:  # e.g. a pruned model handed back by `export --format ultralytics`
            raise UnknownModelError(
                f"ultralytics model {short_source(cfg.get('yaml_file', '?'))}: its weights do not fit the layers its yaml builds "
                f"(a pruned model? load the surgery checkpoint it came from instead): {str(e).splitlines()[0]}"
            ) from None
    detector = UltralyticsDetector(net, size=size, score_thresh=score_thresh, nms_thresh=nms_thresh,
                                   detections_per_img=detections_per_img)  # fmt: skip
    if names is not None and len(names) == detector.num_classes:
        detector.class_names = [str(n) for n in names]
    detector.train_args = dict(train_args or {})
    detector.task = task
    return detector


class UltralyticsDetector(YoloInterface):
    """An Ultralytics ``DetectionModel`` (``self.net``) behind torchvision's detection interface."""

    # what `surgery bench` times as the network (surgery.measure.split); Detect's box decoding
    # (DFL, anchors) runs inside it, the letterbox, top-k and NMS are the pipeline
    network_modules = ("net",)
    class_names: list[str] | None = None  # object class names a trained .pt recorded (no background)
    task = "detect"  # Ultralytics' task of the head: detect, segment, pose or obb
    train_args: dict[str, Any]  # Ultralytics' training arguments a trained .pt recorded

    def __init__(self, net: nn.Module, *, size: int, **kwargs: Any) -> None:
        super().__init__(size, **kwargs)
        self.net = net
        self.num_classes = int(net.model[-1].nc)
        self.nms = not bool(getattr(net.model[-1], "end2end", False))  # one-to-one outputs need no NMS
        hyp = _ultralytics().hyp
        # the loss reads its gains from model.args (Ultralytics' training defaults: box 7.5, cls 0.5, dfl 1.5)
        # (+ the task heads' gains: pose, kobj, rle, angle; masks one per object, not overlapped)
        self.net.args = SimpleNamespace(**{k: hyp[k] for k in ("box", "cls", "dfl", "pose", "kobj", "rle", "angle") if k in hyp},
                                        overlap_mask=False)  # fmt: skip
        self._half_width_blocks = [
            m for m in net.modules()
            if isinstance(getattr(m, "c", None), int) and isinstance(getattr(getattr(m, "cv1", None), "conv", None), nn.Conv2d)
            and m.cv1.conv.out_channels == 2 * m.c
        ]  # fmt: skip

    def losses(self, batch: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        size = float(batch.shape[-1])
        idx = torch.cat([torch.full((len(t["boxes"]),), float(i)) for i, t in enumerate(targets)])
        labels = torch.cat([t["labels"].float() for t in targets])
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"target labels must be in 1..{self.num_classes} (the model's nc={self.num_classes}); "
                f"got {int(labels.min()) + 1}..{int(labels.max()) + 1}"
            )
        boxes = torch.cat([xyxy_to_cxcywh(t["boxes"]) for t in targets]) / size
        device = batch.device
        labelled = {"batch_idx": idx.to(device), "cls": labels.to(device), "bboxes": boxes.to(device)}
        labelled.update(_task_targets(self.net.model[-1], batch, boxes, idx, labels, targets))
        self._sync_widths()
        preds = self.net(batch)
        # a fresh criterion each step: it caches strides and the device, which pruning and .to() change
        criterion = self.net.init_criterion()  # E2ELoss for end-to-end heads (both branches), else v8DetectionLoss
        total, _ = criterion(preds, labelled)
        per_image = total / batch.shape[0]  # Ultralytics scales by batch size; torchvision losses are means
        names = getattr(criterion, "loss_names", None) or criterion.one2many.loss_names  # box, cls, dfl or l1
        return {f"loss_{n.removesuffix('_loss')}": v for n, v in zip(names, per_image.unbind(0))}

    # C2PSA / PSA attention (Ultralytics' ``Attention``: ``qkv`` conv, per-head view and split on dim
    # 2, matmuls, depthwise ``pe`` on v, ``proj``). Torch-Pruning follows channel indices through the
    # head reshape and the matmuls as if they were element-wise and its index sets explode (YOLO11n:
    # 20 GB and counting). Cutting q/k/v channels would have to remove whole heads or equal key/value
    # dims per head, which this adapter does not do: the qkv outputs, ``pe`` and ``proj``'s inputs are
    # never cut. The block's input and output channels (the residual stream, qkv's input and proj's
    # output) are. During the trace only, attention runs as proj(v + pe(v)) with v the last C
    # channels of qkv: the same layers and widths, no head reshape, so the graph stays small.
    # YOLO12's area attention (``AAttn``: qkv, per-area and per-head reshapes, pe, proj) has the same
    # layers and the same trap, and gets the same treatment.
    def _attention_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.net.named_modules()
                if all(hasattr(m, a) for a in ("qkv", "proj", "pe", "num_heads"))]  # fmt: skip

    #
    # End-to-end heads (YOLOv10, YOLO26) feed their one-to-one branch ``x.detach()`` in training ("detach
    # keeps one2one out of the backbone"), so autograd never links that branch to the neck, exactly the
    # trap torchvision's RPN sets in eval mode: a trace would leave one2one_cv2/cv3's input convs at the
    # old widths and the pruned model would fail on its first forward. During the trace only, detach is
    # the identity inside the head's forward (compat.attached_detach): the values are the same and both
    # branches' input convs join the neck's groups. Their output convs are found from the loss as usual.
    @contextlib.contextmanager
    def trace_context(self) -> Iterator[None]:
        """Used by :func:`surgery.pruning.graph.trace` (see above)."""
        blocks = [m for _, m in self._attention_blocks()]
        head = self.net.model[-1]
        for m in blocks:
            m.forward = functools.partial(_attention_for_trace, m)
        try:
            with compat.attached_detach(head) if _has_one2one(head) else contextlib.nullcontext():
                yield
        finally:
            for m in blocks:
                del m.forward

    def fixed_channels(self) -> dict[str, str]:
        """Layers whose output channels are never cut (read by :func:`surgery.pruning.graph.trace`): attention
        (above); ``GhostConv`` (its output concatenates a conv's output with a depthwise copy of it,
        one channel twice, which Torch-Pruning's index maps get wrong); ``CBLinear`` (YOLOv9-E: its
        conv's output is split into the stored sizes ``c2s`` at run time)."""
        out = {}
        for name, m in self.net.named_modules():
            kind = type(m).__name__
            why = {"GhostConv": "GhostConv output (a conv and its depthwise copy, kept whole)",
                   "CBLinear": "CBLinear output (split into stored sizes, kept whole)"}.get(kind)  # fmt: skip
            for sub, c in m.named_modules() if why else ():
                if isinstance(c, nn.Conv2d):
                    out[f"net.{name}.{sub}"] = why
        for name, m in self._attention_blocks():
            for part, why in (("qkv", "attention q/k/v heads (kept whole)"),
                              ("proj", "attention reshapes with its input width (kept whole)")):  # fmt: skip
                for sub, _ in getattr(m, part).named_modules():
                    out[f"net.{name}.{part}.{sub}" if sub else f"net.{name}.{part}"] = why
        return out

    def head_layers(self) -> list[str]:
        """The Detect module (both branches of an end-to-end head): what ``prune.keep_head`` keeps
        (read by :func:`surgery.pruning.graph.head_layers`)."""
        head = self.net.model[-1]
        return [n for n, m in self.named_modules() if m is head]

    def fixed_weights(self) -> list[str]:
        """Layers holding constants, never masked (read by :func:`surgery.pruning.masked.prunable_parameters`):
        the Detect head's DFL conv, whose weights are 0..reg_max-1."""
        return [f"{n}.conv" for n, m in self.named_modules() if type(m).__name__ == "DFL" and hasattr(m, "conv")]

    def _sync_widths(self) -> None:
        """Blocks that split ``cv1``'s output with a stored half width (``split((self.c, self.c))``:
        C2PSA, C2fPSA, ELAN) read ``c`` at run time: keep it half the (cut) width of ``cv1``."""
        for m in self._half_width_blocks:
            m.c = m.cv1.conv.out_channels // 2

    def predict(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        self._sync_widths()
        head = self.net.model[-1]
        if not self.nms:
            head.max_det = self.detections_per_img  # the head's own top-k (Ultralytics' default 300)
        with _without_one2many(head) if not self.nms else contextlib.nullcontext():
            out = self.net(batch)
        y = out
        while isinstance(y, (tuple, list)):  # (predictions, extras); Segment nests (predictions, protos) once more
            y = y[0]
        if not self.nms:  # [B, K, 6]: x1, y1, x2, y2, score, class index, best first (one-to-one branch)
            scores = y.new_zeros(y.shape[0], y.shape[1], self.num_classes)
            scores.scatter_(2, y[..., 5:6].long(), y[..., 4:5])
            return y[..., :4], scores
        y = y.transpose(1, 2)  # [B, 4 + nc (+ mask coefficients / keypoints / angle), A]: cx, cy, w, h, scores
        cx, cy, w, h = y[..., :4].unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        return boxes, y[..., 4 : 4 + self.num_classes]


def _task_targets(
    head: nn.Module, batch: Tensor, boxes: Tensor, idx: Tensor, labels: Tensor, targets: list[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """What a task head's loss needs besides boxes, from what surgery's targets hold: box-shaped
    masks for ``Segment`` (surgery's letterbox does not carry instance masks: train masks with
    ``retrain --engine ultralytics``), invisible keypoints for ``Pose`` unless the targets carry
    ``keypoints`` (``[N, K, 3]`` in batch pixels), angle 0 for ``OBB`` (axis-aligned boxes)."""
    kind = type(head).__name__
    device, size = batch.device, float(batch.shape[-1])
    if kind.startswith("Segment"):
        side = int(batch.shape[-1]) // 4  # Ultralytics' mask resolution (the loss resizes to the prototypes')
        grid = (torch.arange(side, device=device, dtype=batch.dtype) + 0.5) / side
        cx, cy, w, h = boxes.to(device).unbind(-1)
        inside_x = (grid[None] >= (cx - w / 2)[:, None]) & (grid[None] <= (cx + w / 2)[:, None])
        inside_y = (grid[None] >= (cy - h / 2)[:, None]) & (grid[None] <= (cy + h / 2)[:, None])
        masks = inside_y[:, :, None] & inside_x[:, None, :]
        sem = torch.zeros(batch.shape[0], side, side, dtype=torch.long, device=device)  # YOLO26's semantic target
        for n, (i, c) in enumerate(zip(idx.long().tolist(), labels.long().tolist())):
            sem[i][masks[n]] = c
        return {"masks": masks.float(), "sem_masks": sem}
    if kind.startswith("Pose"):
        k, d = (int(v) for v in head.kpt_shape)
        parts = [t["keypoints"][..., :d].float() / size if "keypoints" in t else torch.zeros(len(t["boxes"]), k, d)
                 for t in targets]  # fmt: skip
        return {"keypoints": torch.cat(parts).to(device) if parts else torch.zeros(0, k, d, device=device)}
    if kind.startswith("OBB"):
        return {"bboxes": torch.cat([boxes, boxes.new_zeros(len(boxes), 1)], 1).to(device)}
    return {}


def _has_one2one(head: nn.Module) -> bool:
    """An end-to-end head: a one-to-one branch beside the one-to-many one (YOLOv10, YOLO26)."""
    return getattr(head, "one2one_cv2", None) is not None


@contextlib.contextmanager
def _without_one2many(head: nn.Module) -> Iterator[None]:
    """Predicting with the one-to-one branch, skip the one-to-many one: eager PyTorch would run it for
    outputs nobody reads (the ONNX exporter drops it anyway). The head computes nothing for a missing
    branch, which is how Ultralytics' own fused inference runs. The branch is put back afterwards."""
    saved = head.cv2, head.cv3
    head.cv2 = head.cv3 = None
    try:
        yield
    finally:
        head.cv2, head.cv3 = saved


def _attention_for_trace(m: nn.Module, x: Tensor) -> Tensor:
    """Trace-only stand-in for Ultralytics' ``Attention.forward`` / ``AAttn.forward`` (see ``trace_context``)."""
    qkv = m.qkv(x)
    width = next(c for c in m.pe.modules() if isinstance(c, nn.Conv2d)).in_channels  # v's channels
    v = qkv[:, qkv.shape[1] - width :]
    return m.proj(v + m.pe(v))


register_scheme(SCHEME, resolve)
