"""Model registry: every torchvision detection builder, the project's own compact builders, and
user-built detectors given as ``package.module:function`` (or ``path/to/file.py:function``).

A model is described by a :class:`ModelSpec` (builder name + keyword arguments). The spec is what a
checkpoint records, so a pruned model can be rebuilt without pickled code.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from .errors import CheckpointError, SurgeryError, UnknownModelError

Builder = Callable[..., nn.Module]

# The project's own builders (registered below and by ``register_model``). Torchvision's builders
# are listed from torchvision itself so new releases show up without a code change.
_OWN_BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a detector builder under ``name``."""

    def deco(fn: Builder) -> Builder:
        if name in _OWN_BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _OWN_BUILDERS[name] = fn
        return fn

    return deco


# ``scheme:reference`` models (``ultralytics:yolov8n.yaml``): a resolver turns the spec into a builder
# (and may record what it resolved in ``spec.kwargs``). The reference is data, not an import path:
# these names are not user code (surgery.trust); a resolver that reads a pickle checks trust itself.
_SCHEMES: dict[str, Callable[[ModelSpec], Builder]] = {}


def register_scheme(prefix: str, resolver: Callable[[ModelSpec], Builder]) -> None:
    """Let ``build_model`` accept ``prefix:reference`` names, resolved by ``resolver(spec)``."""
    if prefix in _SCHEMES:
        raise ValueError(f"model scheme {prefix!r} is already registered")
    _SCHEMES[prefix] = resolver


def scheme_of(name: str) -> str | None:
    """``"ultralytics"`` for ``ultralytics:yolov8n.yaml``; ``None`` for other names."""
    prefix = name.partition(":")[0]
    return prefix if ":" in name and prefix in _SCHEMES else None


def torchvision_detection_models() -> list[str]:
    """Every builder in ``torchvision.models.detection``, as torchvision lists them."""
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def list_models() -> list[str]:
    """All builder names ``build_model`` accepts (torchvision's and the project's own)."""
    return sorted(set(torchvision_detection_models()) | set(_OWN_BUILDERS))


def is_torchvision_model(name: str) -> bool:
    return name in torchvision_detection_models()


@dataclass
class ModelSpec:
    """How to (re)build a detector: a registered name or ``module:function`` plus kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    # user-code builders: {"file": path, "sha256": hex} of the file that defines it (surgery.trust)
    code: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "kwargs": copy.deepcopy(self.kwargs)}
        if self.code is not None:
            d["code"] = dict(self.code)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        code = d.get("code")
        return cls(name=str(d["name"]), kwargs=dict(d.get("kwargs") or {}), code=dict(code) if code else None)


def _import_callable(target: str, trust_code: bool | None = None, expected: dict[str, Any] | None = None) -> Builder:
    """Resolve ``package.module:function`` or ``path/to/file.py:function`` (user code: only when
    trusted, see :mod:`surgery.trust`)."""
    from .trust import import_user_builder

    return import_user_builder(target, trust_code=trust_code, expected=expected)[0]


def get_builder(name: str, trust_code: bool | None = None, expected: dict[str, Any] | None = None) -> Builder:
    scheme = scheme_of(name)
    if scheme is not None:
        return _SCHEMES[scheme](ModelSpec(name))
    if ":" in name:
        return _import_callable(name, trust_code, expected)
    if name in _OWN_BUILDERS:
        return _OWN_BUILDERS[name]
    if is_torchvision_model(name):
        return torchvision.models.get_model_builder(name)
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}.{hint} Run `surgery models` for the list, or pass a user-built "
        "detector as 'package.module:function'."
    )


def default_kwargs(name: str) -> dict[str, Any]:
    """Offline defaults: torchvision builders get ``weights=None, weights_backbone=None``."""
    if is_torchvision_model(name):
        return {"weights": None, "weights_backbone": None}
    return {}


def _is_local_file(w: Any) -> bool:
    return isinstance(w, (str, os.PathLike)) and (
        Path(w).suffix in {".pt", ".pth", ".ckpt", ".bin"} or os.sep in str(w) or Path(w).is_file()
    )


def _brief(kwargs: dict[str, Any]) -> str:
    """Builder arguments for a one-line error: a whole model config (a YOLO yaml dict) is named, not printed."""
    return ", ".join(f"{k}=<{type(v).__name__}>" if isinstance(v, (dict, list, tuple)) else f"{k}={v!r}"
                     for k, v in kwargs.items()) or "(none)"


def build_model(spec: ModelSpec | str, *, trust_code: bool | None = None, **overrides: Any) -> nn.Module:
    """Build a detector from a spec.

    A user-code builder (``module:function``, ``file.py:function``) runs only with ``trust_code=True``
    (or inside :func:`surgery.trust.trusting`); its file's hash is then recorded in ``spec.code``
    (and checked against it when ``spec.code`` is already set, e.g. from a checkpoint).

    ``weights`` may be ``None``, a torchvision weights name (``"DEFAULT"``, ``"COCO_V1"``; needs
    internet the first time) or a path to a local checkpoint / state dict, which is loaded after
    building the architecture with no weights.
    """
    if isinstance(spec, str):
        spec = ModelSpec(spec)
    scheme = scheme_of(spec.name)
    if scheme is not None:
        builder = _SCHEMES[scheme](spec)
    elif ":" in spec.name:
        from .trust import import_user_builder

        builder, ref = import_user_builder(
            spec.name, trust_code=trust_code, expected=spec.code, kwargs=spec.kwargs
        )
        spec.code = ref
    else:
        builder = get_builder(spec.name)
    from .validate import check_builder_kwargs

    check_builder_kwargs(spec.name, builder, {**spec.kwargs, **overrides})
    kwargs = {**default_kwargs(spec.name), **spec.kwargs, **overrides}
    weights_file = None
    if _is_local_file(kwargs.get("weights")):
        weights_file = Path(kwargs.pop("weights"))
        if "weights" in default_kwargs(spec.name):
            kwargs["weights"] = None
            kwargs["weights_backbone"] = None
    try:
        model = builder(**kwargs)
    except SurgeryError:
        raise  # the builder's own one-line error (UnknownModelError is a KeyError: keep it from below)
    except TypeError as e:
        raise UnknownModelError(f"model {spec.name!r} rejected its arguments {sorted(kwargs)}: {e}") from e
    except (KeyError, ValueError) as e:
        if kwargs.get("weights") is not None and (isinstance(e, KeyError) or "weight" in str(e).lower()):
            raise UnknownModelError(
                f"model {spec.name!r}: unknown weights {kwargs['weights']!r} ({e}); use DEFAULT, a torchvision "
                "weights name, or a local weights file"
            ) from e
        raise UnknownModelError(f"model {spec.name!r} rejected its arguments {_brief(spec.kwargs)}: {e}") from e
    except OSError as e:  # urllib's URLError is an OSError: no internet for pretrained weights
        raise CheckpointError(
            f"model {spec.name!r}: cannot download weights {kwargs.get('weights')!r} ({e}); "
            "pass a local .pth file as the weights instead"
        ) from e
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"model {spec.name!r}: builder returned {type(model).__name__}, not nn.Module")
    if weights_file is not None:
        load_weights_file(model, weights_file)
    return model


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a dense state dict (torchvision ``.pth``, a training checkpoint with a ``model`` key)."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        # (torch's message advises weights_only=False, i.e. running the file's pickled code: never)
        raise CheckpointError(
            f"cannot read weights file {path}: not a plain tensor file ({e.__class__.__name__}); "
            "surgery only reads weights that load with weights_only=True"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"weights file {path} does not hold a state dict")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"weights file {path} does not hold a state dict (names -> tensors)")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    own = model.state_dict()
    wrong = [k for k, v in obj.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"weights file {path} does not match the model: {len(wrong)} tensors have other shapes "
            f"(e.g. {k}: file {tuple(obj[k].shape)}, model {tuple(own[k].shape)}); check num_classes and the builder arguments"
        )
    missing, unexpected = model.load_state_dict(obj, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"weights file {path} does not match the model: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


# --------------------------------------------------------------------------------------------
# The project's own compact builders
# --------------------------------------------------------------------------------------------


@register_model("fcos_resnet18_slim")
def fcos_resnet18_slim(
    num_classes: int = 5,
    fpn_channels: int = 128,
    num_convs: int = 2,
    min_size: int = 160,
    max_size: int = 160,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A slim FCOS that learns from scratch in minutes on 2 CPU cores.

    ResNet-18 with real BatchNorm (``resnet_fpn_backbone`` would use FrozenBatchNorm2d even without
    weights, i.e. no normalisation at all when training from scratch), an FPN on layer2-4 with P6/P7
    and a 2-conv shared FCOS head. ``num_classes`` follows torchvision: it counts the background
    (index 0), so 4 object classes need ``num_classes=5``.
    """
    from torchvision.models import resnet18
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if weights is not None:
        raise ValueError("fcos_resnet18_slim has no pretrained weights; pass a checkpoint path instead")
    trunk = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        trunk,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )
    anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(anchor_sizes, ((1.0,),) * len(anchor_sizes))
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=num_convs)
    return FCOS(
        backbone,
        num_classes=num_classes,
        anchor_generator=anchors,
        head=head,
        min_size=min_size,
        max_size=max_size,
        **kwargs,
    )


@register_model("retinanet_resnet18_slim")
def retinanet_resnet18_slim(
    num_classes: int = 5,
    fpn_channels: int = 128,
    min_size: int = 160,
    max_size: int = 160,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A slim anchor-based RetinaNet sized for a CPU (the cross-family recovery benchmark's
    anchor-based detector): the quickstart FCOS's ResNet-18 (real BatchNorm) + FPN P3-P7, 3
    anchors per location (aspect ratios 0.5, 1, 2), torchvision's RetinaNet head and focal loss."""
    from torchvision.models import resnet18
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if weights is not None:
        raise ValueError("retinanet_resnet18_slim has no pretrained weights; pass a checkpoint path instead")
    trunk = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        trunk,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)
    return RetinaNet(backbone, num_classes=num_classes, anchor_generator=anchors, min_size=min_size,
                     max_size=max_size, **kwargs)


# Registered last: these modules use register_model / register_scheme from above.
from .yolo import ultralytics_adapter as _ultralytics_adapter  # noqa: E402
from .yolo import yolov2 as _yolov2  # noqa: E402, F401

register_scheme(_ultralytics_adapter.SCHEME, _ultralytics_adapter.resolve)
