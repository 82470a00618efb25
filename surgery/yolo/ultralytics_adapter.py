"""Ultralytics YOLO detectors (``--model ultralytics:yolov8n.yaml``), an optional extra.

Ultralytics is AGPL-3.0: nothing of it is copied here. This is the only module that imports it, and
only when such a model is built (``pip install 'surgery[yolo]'``); without it the model name is one
clear error. Before the import the package is made offline and inert: ``YOLO_OFFLINE`` (no
connectivity probe, no downloads), ``YOLO_AUTOINSTALL=0`` (never pip-installs missing requirements),
``ULTRALYTICS_SAFE_LOAD=1`` (model yamls are parsed without ``eval``: a yaml is data here),
``YOLO_VERBOSE=0``, its settings file kept in surgery's cache unless ``YOLO_CONFIG_DIR`` is set, and
its event ``sync`` switched off for this process. Plotting (which may fetch a font) is never called.

References: a yaml the package ships (``yolov8n.yaml``, ``yolo11s.yaml``: the scale letter picks
the size), a user's model yaml (data), or a user's ``.pt`` (a pickle: needs ``--trust-code``).
The resolved yaml is recorded in the spec's ``cfg`` argument, so a checkpoint rebuilds from it with
``weights_only=True`` and never needs the original file (nor the pickle) again.

The network is wrapped in :class:`~surgery.yolo.interface.YoloInterface` (torchvision's interface)
and trained with the model's own detection loss (``v8DetectionLoss``: task-aligned assignment, BCE,
CIoU and DFL with Ultralytics' default gains), averaged per image.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..data.synth import default_synthetic_root
from ..errors import UnknownModelError
from ..specs import register_scheme
from ..trust import refuse, safe_yaml_load, trust_enabled
from .interface import YoloInterface, xyxy_to_cxcywh

SCHEME = "ultralytics"
INSTALL_HINT = "pip install 'surgery[yolo]' (or: pip install ultralytics; Ultralytics is AGPL-3.0)"
_ENV_FORCED = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "ULTRALYTICS_SAFE_LOAD": "1"}
_LOSS_NAMES = ("loss_box", "loss_cls", "loss_dfl")


@functools.cache
def _ultralytics() -> SimpleNamespace:
    """Import the package offline (see the module docstring); one clear error without it."""
    os.environ.update(_ENV_FORCED)
    os.environ.setdefault("YOLO_VERBOSE", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(default_synthetic_root() / "ultralytics"))
    try:
        from ultralytics.cfg import DEFAULT_CFG_DICT
        from ultralytics.nn import tasks
        from ultralytics.nn.modules.head import Detect
        from ultralytics.utils import SETTINGS
    except ImportError as e:
        raise UnknownModelError(f"Ultralytics models need the optional package: {INSTALL_HINT} ({e})") from None
    dict.__setitem__(SETTINGS, "sync", False)  # in memory only: the user's settings file is not rewritten
    return SimpleNamespace(tasks=tasks, Detect=Detect, hyp=dict(DEFAULT_CFG_DICT))


def resolve(spec: Any) -> Any:
    """The builder for ``spec`` (``ultralytics:<yaml or .pt>``); records the resolved yaml in
    ``spec.kwargs["cfg"]`` the first time (called by :func:`surgery.models.build_model`)."""
    ref = spec.name.split(":", 1)[1]
    if not ref:
        raise UnknownModelError(f"model {spec.name!r}: expected ultralytics:<model yaml or .pt>, e.g. ultralytics:yolov8n.yaml")
    _ultralytics()
    state = None
    if spec.kwargs.get("cfg") is None:
        cfg, state = _read_reference(spec.name, ref)
        spec.kwargs["cfg"] = cfg
    return functools.partial(build_ultralytics, _state_dict=state)


def _read_reference(name: str, ref: str) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    u = _ultralytics()
    path = Path(ref).expanduser()
    if path.suffix in {".pt", ".pth"}:
        return _read_pickle(name, path)
    if path.suffix not in {".yaml", ".yml"}:
        raise UnknownModelError(f"model {name!r}: expected a model .yaml (shipped or yours) or a .pt file, got {ref!r}")
    if path.is_file():  # the user's yaml: read as data
        cfg = safe_yaml_load(path.read_bytes(), str(path))
        if not isinstance(cfg, dict) or "backbone" not in cfg or "head" not in cfg:
            raise UnknownModelError(f"model {name!r}: {path} is not an Ultralytics model yaml (no backbone/head)")
        cfg.setdefault("scale", u.tasks.guess_model_scale(path))
        cfg.setdefault("yaml_file", str(path))
        return cfg, None
    if len(path.parts) > 1:
        raise UnknownModelError(f"model {name!r}: file {ref} does not exist")
    try:
        return u.tasks.yaml_model_load(ref), None  # a yaml the package ships (no download for a bare name)
    except (FileNotFoundError, OSError) as e:
        raise UnknownModelError(
            f"model {name!r}: Ultralytics ships no model yaml {ref!r} (e.g. yolov8n.yaml, yolo11s.yaml) ({e})"
        ) from None


def _read_pickle(name: str, path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
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
    return cfg, {k: v.float() for k, v in net.state_dict().items()}


def build_ultralytics(
    cfg: dict[str, Any],
    nc: int | None = None,
    size: int = 640,
    score_thresh: float = 0.001,
    nms_thresh: float = 0.7,
    detections_per_img: int = 100,
    _state_dict: dict[str, Tensor] | None = None,
) -> UltralyticsDetector:
    """An Ultralytics ``DetectionModel`` built from ``cfg`` (a model yaml dict), in torchvision's
    interface. ``nc``: object classes (labels 1..nc; the yaml's value by default); ``size``: the
    letterbox size (a multiple of 32 is used)."""
    u = _ultralytics()
    if nc is not None and (not isinstance(nc, int) or nc < 1):
        raise UnknownModelError(f"ultralytics model: nc must be an integer >= 1 (object classes), got {nc!r}")
    try:
        net = u.tasks.DetectionModel(copy.deepcopy(cfg), ch=3, nc=nc, verbose=False)
    except (KeyError, TypeError, ValueError, AssertionError, IndexError) as e:
        raise UnknownModelError(f"ultralytics model {cfg.get('yaml_file', '?')}: cannot build it from its yaml ({e})") from e
    head = net.model[-1]
    if type(head) is not u.Detect or getattr(head, "one2one_cv2", None) is not None:
        raise UnknownModelError(
            f"ultralytics model {cfg.get('yaml_file', '?')}: head {type(head).__name__}"
            f"{' (end-to-end)' if type(head) is u.Detect else ''} is not supported; surgery takes YOLO detection "
            "models with a Detect head and NMS (YOLOv3/v5/v6/v8/v9, YOLO11, YOLO12)"
        )
    if _state_dict is not None:
        net.load_state_dict(_state_dict)
    return UltralyticsDetector(net, size=size, score_thresh=score_thresh, nms_thresh=nms_thresh,
                               detections_per_img=detections_per_img)  # fmt: skip


class UltralyticsDetector(YoloInterface):
    """An Ultralytics ``DetectionModel`` (``self.net``) behind torchvision's detection interface."""

    # what `surgery bench` times as the network (surgery.measure.split); Detect's box decoding
    # (DFL, anchors) runs inside it, the letterbox, top-k and NMS are the pipeline
    network_modules = ("net",)

    def __init__(self, net: nn.Module, *, size: int, **kwargs: Any) -> None:
        super().__init__(size, **kwargs)
        self.net = net
        self.num_classes = int(net.model[-1].nc)
        hyp = _ultralytics().hyp
        # the loss reads its gains from model.args (Ultralytics' training defaults: box 7.5, cls 0.5, dfl 1.5)
        self.net.args = SimpleNamespace(box=float(hyp["box"]), cls=float(hyp["cls"]), dfl=float(hyp["dfl"]))
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
        self._sync_widths()
        preds = self.net(batch)
        # a fresh criterion each step: it caches strides and the device, which pruning and .to() change
        criterion = self.net.init_criterion()
        total, _ = criterion(preds, labelled)
        per_image = total / batch.shape[0]  # Ultralytics scales by batch size; torchvision losses are means
        return dict(zip(_LOSS_NAMES, per_image.unbind(0)))

    # C2PSA / PSA attention (Ultralytics' ``Attention``: ``qkv`` conv, per-head view and split on dim
    # 2, matmuls, depthwise ``pe`` on v, ``proj``). Torch-Pruning follows channel indices through the
    # head reshape and the matmuls as if they were element-wise and its index sets explode (YOLO11n:
    # 20 GB and counting). Cutting q/k/v channels would have to remove whole heads or equal key/value
    # dims per head, which this adapter does not do: the qkv outputs, ``pe`` and ``proj``'s inputs are
    # never cut. The block's input and output channels (the residual stream, qkv's input and proj's
    # output) are. During the trace only, attention runs as proj(v + pe(v)) with v the last C
    # channels of qkv: the same layers and widths, no head reshape, so the graph stays small.
    def _attention_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.net.named_modules()
                if all(hasattr(m, a) for a in ("qkv", "proj", "pe", "num_heads", "key_dim"))]  # fmt: skip

    @contextlib.contextmanager
    def trace_context(self) -> Iterator[None]:
        """Used by :func:`surgery.graph.trace` (see above)."""
        blocks = [m for _, m in self._attention_blocks()]
        for m in blocks:
            m.forward = functools.partial(_attention_for_trace, m)
        try:
            yield
        finally:
            for m in blocks:
                del m.forward

    def fixed_channels(self) -> dict[str, str]:
        """Layers whose output channels are never cut (read by :func:`surgery.graph.trace`)."""
        out = {}
        for name, m in self._attention_blocks():
            for part, why in (("qkv", "attention q/k/v heads (kept whole)"),
                              ("proj", "attention reshapes with its input width (kept whole)")):  # fmt: skip
                for sub, _ in getattr(m, part).named_modules():
                    out[f"net.{name}.{part}.{sub}" if sub else f"net.{name}.{part}"] = why
        return out

    def fixed_weights(self) -> list[str]:
        """Layers holding constants, never masked (read by :func:`surgery.masked.prunable_parameters`):
        the Detect head's DFL conv, whose weights are 0..reg_max-1."""
        return [f"{n}.conv" for n, m in self.named_modules() if type(m).__name__ == "DFL" and hasattr(m, "conv")]

    def _sync_widths(self) -> None:
        """Blocks that split ``cv1``'s output with a stored half width (``split((self.c, self.c))``:
        C2PSA, C2fPSA, ELAN) read ``c`` at run time: keep it half the (cut) width of ``cv1``."""
        for m in self._half_width_blocks:
            m.c = m.cv1.conv.out_channels // 2

    def predict(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        self._sync_widths()
        out = self.net(batch)
        y = out[0] if isinstance(out, (tuple, list)) else out  # [B, 4 + nc, A]: cx, cy, w, h, class scores
        y = y.transpose(1, 2)
        cx, cy, w, h = y[..., :4].unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        return boxes, y[..., 4:]


def _attention_for_trace(m: nn.Module, x: Tensor) -> Tensor:
    """Trace-only stand-in for Ultralytics' ``Attention.forward`` (see ``trace_context``)."""
    qkv = m.qkv(x)
    v = qkv[:, qkv.shape[1] - x.shape[1] :]
    return m.proj(v + m.pe(v))


register_scheme(SCHEME, resolve)
