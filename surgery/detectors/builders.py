"""Model registry: every torchvision detection builder, the project's own compact builders, and
user-built detectors given as ``package.module:function`` (or ``path/to/file.py:function``).

A model is described by a :class:`ModelSpec` (builder name + keyword arguments). The spec is what a
checkpoint records, so a pruned model can be rebuilt without pickled code.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import CheckpointError, SurgeryError, UnknownModelError
from ..registry import close_matches, did_you_mean
from ..storage.trust import _ORIGIN, import_user_builder
from .specs import (
    Builder,
    ModelSpec,
    own_builders,
    register_model,
    register_scheme,
    scheme_of,
    scheme_resolver,
)

# ModelSpec, register_model, register_scheme and scheme_of live in surgery.detectors.specs (torch-free) and
# stay importable from here
__all__ = [
    "Builder", "ModelSpec", "accepts", "build_model", "check_builder_kwargs", "default_kwargs", "get_builder",
    "is_torchvision_model", "list_models", "load_weights_file", "register_model", "register_scheme", "scheme_of",
    "torchvision_detection_models",
]

def torchvision_detection_models() -> list[str]:
    """Every builder in ``torchvision.models.detection``, as torchvision lists them."""
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def list_models() -> list[str]:
    """All builder names ``build_model`` accepts (torchvision's and the project's own)."""
    return sorted(set(torchvision_detection_models()) | set(own_builders()))


def is_torchvision_model(name: str) -> bool:
    return name in torchvision_detection_models()


def _import_callable(target: str, trust_code: bool | None = None, expected: dict[str, Any] | None = None) -> Builder:
    """Resolve ``package.module:function`` or ``path/to/file.py:function`` (user code: only when
    trusted, see :mod:`surgery.storage.trust`)."""
    return import_user_builder(target, trust_code=trust_code, expected=expected)[0]


def get_builder(name: str, trust_code: bool | None = None, expected: dict[str, Any] | None = None) -> Builder:
    scheme = scheme_of(name)
    if scheme is not None:
        return scheme_resolver(scheme)(ModelSpec(name))
    if ":" in name:
        return _import_callable(name, trust_code, expected)
    if name in own_builders():
        return own_builders()[name]
    if is_torchvision_model(name):
        return torchvision.models.get_model_builder(name)
    close = close_matches(name, list_models(), n=3)
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


# --------------------------------------------------------------------------------------------
# builder arguments: unknown (misspelled) and out-of-range ones are one clear error


def _where() -> str:
    src = _ORIGIN.get()
    return f" (from {src})" if src else ""


def _params(fn: Any) -> tuple[set[str], bool]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set(), True
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def accepts(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes keyword ``name`` (directly or through ``**kwargs``)."""
    names, var_kw = _params(fn)
    return name in names or var_kw


def _detector_class(name: str) -> list[Any]:
    """The torchvision classes a registered builder's ``**kwargs`` end up in."""
    from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    table = [("fasterrcnn", [FasterRCNN]), ("maskrcnn", [MaskRCNN, FasterRCNN]),
             ("keypointrcnn", [KeypointRCNN, FasterRCNN]), ("retinanet", [RetinaNet]), ("fcos", [FCOS]),
             ("ssd", [SSD])]  # fmt: skip
    for prefix, classes in table:
        if name.startswith(prefix):
            return [*classes, GeneralizedRCNNTransform]
    return []


def _int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _prob(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _sizes(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_int_at_least(v, 32) and v <= 8192 for v in value)
    return _int_at_least(value, 32) and value <= 8192


_RANGES: dict[str, tuple[Any, str]] = {
    "num_classes": (lambda v: _int_at_least(v, 2) and v <= 100_000, "an integer >= 2 and <= 100000 (it counts the background class)"),
    "num_keypoints": (lambda v: _int_at_least(v, 1), "an integer >= 1"),
    "min_size": (_sizes, "an integer (or list of integers) in [32, 8192]"),
    "max_size": (lambda v: _int_at_least(v, 32) and v <= 8192, "an integer in [32, 8192]"),
    "trainable_backbone_layers": (lambda v: v is None or (_int_at_least(v, 0) and v <= 6), "an integer in [0, 6] or null"),
    "detections_per_img": (lambda v: _int_at_least(v, 1), "an integer >= 1"),
    "score_thresh": (_prob, "a number in [0, 1]"),
    "nms_thresh": (_prob, "a number in [0, 1]"),
    "fpn_channels": (lambda v: _int_at_least(v, 32) and v <= 4096 and v % 32 == 0, "a multiple of 32 in [32, 4096]"),
    "num_convs": (lambda v: _int_at_least(v, 0) and v <= 16, "an integer in [0, 16]"),
    "size": (lambda v: _int_at_least(v, 32) and v <= 4096, "an integer in [32, 4096] (the input side)"),
}


def check_builder_kwargs(name: str, builder: Any, kwargs: dict[str, Any]) -> None:
    """Unknown (misspelled) arguments of registered builders and out-of-range common ones are errors."""
    if not isinstance(kwargs, dict):
        raise UnknownModelError(f"model {name!r}: builder arguments must be a mapping{_where()}")
    for key in kwargs:
        if not isinstance(key, str):
            raise UnknownModelError(f"model {name!r}: argument name {key!r} is not a string{_where()}")
    known, open_ended = _params(builder)
    if ":" not in name and open_ended:
        classes = _detector_class(name)
        if classes:
            for c in classes:
                names, _ = _params(c.__init__)
                known |= names
            known -= {"self", "backbone"}
            known |= {"_skip_resize"}
            open_ended = False
    if not open_ended:
        for key in kwargs:
            if key not in known:
                raise UnknownModelError(
                    f"model {name!r} has no argument {key!r}{did_you_mean(key, sorted(known))}{_where()}; it takes: {', '.join(sorted(known))}"
                )
    for key, (ok, allowed) in _RANGES.items():
        if key in kwargs and kwargs[key] is not None and not ok(kwargs[key]):
            raise UnknownModelError(f"model {name!r}: bad argument {key}={kwargs[key]!r}{_where()}: expected {allowed}")


def _brief(kwargs: dict[str, Any]) -> str:
    """Builder arguments for a one-line error: a whole model config (a YOLO yaml dict) is named, not printed."""
    return ", ".join(f"{k}=<{type(v).__name__}>" if isinstance(v, (dict, list, tuple)) else f"{k}={v!r}"
                     for k, v in kwargs.items()) or "(none)"


def build_model(spec: ModelSpec | str, *, trust_code: bool | None = None, **overrides: Any) -> nn.Module:
    """Build a detector from a spec.

    A user-code builder (``module:function``, ``file.py:function``) runs only with ``trust_code=True``
    (or inside :func:`surgery.storage.trust.trusting`); its file's hash is then recorded in ``spec.code``
    (and checked against it when ``spec.code`` is already set, e.g. from a checkpoint).

    ``weights`` may be ``None``, a torchvision weights name (``"DEFAULT"``, ``"COCO_V1"``; needs
    internet the first time) or a path to a local checkpoint / state dict, which is loaded after
    building the architecture with no weights.
    """
    if isinstance(spec, str):
        spec = ModelSpec(spec)
    scheme = scheme_of(spec.name)
    if scheme is not None:
        builder = scheme_resolver(scheme)(spec)
    elif ":" in spec.name:
        builder, ref = import_user_builder(
            spec.name, trust_code=trust_code, expected=spec.code, kwargs=spec.kwargs
        )
        spec.code = ref
    else:
        builder = get_builder(spec.name)
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
        hint = ""
        if "ultralytics." in str(e):  # torch names the class it refused: an Ultralytics model pickle
            hint = f"; it is an Ultralytics model pickle: load it as --model ultralytics:{path} with --trust-code"
        raise CheckpointError(
            f"cannot read weights file {path}: not a plain tensor file ({e.__class__.__name__}); "
            f"surgery only reads weights that load with weights_only=True{hint}"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        # a pickled module that loaded anyway: Ultralytics' restricted loading registers its classes with
        # torch for the rest of the process once any Ultralytics checkpoint was read (same hint as above)
        raise CheckpointError(f"cannot read weights file {path}: it holds a pickled model, not weights; if it is an "
                              f"Ultralytics model pickle: load it as --model ultralytics:{path} with --trust-code")
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


def _resnet18_fpn(name: str, fpn_channels: int, weights: str | None) -> nn.Module:
    """The slim builders' backbone: ResNet-18 with real BatchNorm (``resnet_fpn_backbone`` would use
    FrozenBatchNorm2d even without weights, i.e. no normalisation at all when training from
    scratch) and an FPN on layer2-4 with P6/P7."""
    # torchvision's detection modules load on first use, like every builder's (registry stays light)
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if weights is not None:
        raise ValueError(f"{name} has no pretrained weights; pass a checkpoint path instead")
    return BackboneWithFPN(
        resnet18(weights=None, norm_layer=nn.BatchNorm2d),
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )


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
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    backbone = _resnet18_fpn("fcos_resnet18_slim", fpn_channels, weights)
    anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
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
    anchor_scales: int = 3,
    head_norm: bool = True,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A slim anchor-based RetinaNet sized for a CPU (the cross-family recovery benchmark's
    anchor-based detector): the quickstart FCOS's ResNet-18 (real BatchNorm) + FPN P3-P7 and
    torchvision's RetinaNet head with focal loss.

    Anchors as in the RetinaNet paper, scaled to small images: ``anchor_scales`` octave scales
    (2^0, 2^1/3, 2^2/3) x aspect ratios 0.5, 1, 2 per location, base size 2x the level's stride
    (16 px at P3). One scale at 1x the stride (the first version) gave only 24% of the synthetic
    set's boxes (15-59 px at 128 px) an anchor at IoU >= 0.5, 0.4 positives per box, and a model
    at mAP 0.002 after 800 steps; three scales at 2x give 99% and 7.9. ``head_norm``: GroupNorm in
    the head's conv towers (torchvision's v2 head, the FCOS head's norm), which a head trained
    from scratch needs."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead

    backbone = _resnet18_fpn("retinanet_resnet18_slim", fpn_channels, weights)
    sizes = tuple(tuple(round(2 * stride * 2 ** (i / anchor_scales), 1) for i in range(anchor_scales))
                  for stride in (8, 16, 32, 64, 128))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    norm = functools.partial(nn.GroupNorm, 32) if head_norm else None
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
    return RetinaNet(backbone, num_classes=num_classes, anchor_generator=anchors, head=head, min_size=min_size,
                     max_size=max_size, **kwargs)


# Imported for their registrations (register_model / register_scheme in surgery.detectors.specs).
from ..yolo import ultralytics_adapter as _ultralytics_adapter  # noqa: E402, F401
from ..yolo import yolov2 as _yolov2  # noqa: E402, F401
