"""Checkpoints that rebuild without pickled code.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``weights_only=True``:

- ``model``: the :class:`~surgery.detectors.builders.ModelSpec` (builder name or ``module:function`` + kwargs)
- ``kind``: ``dense``, ``structured`` (channels cut) or ``masked`` (unstructured weight masks)
- ``plan``: the pruning plan (:mod:`surgery.pruning.plan`, stored as a dict: groups, widths, anchors, chain)
- ``masks``: for masked models, ``{param_name: bool tensor}`` kept during retraining
- ``recipe``: the resolved recipe, ``metrics``: anything measured, ``train_state``: for ``--resume``
- ``class_names``: label index -> name (index 0 is the background) from the data it was trained on
- ``state_dict``: the weights

:func:`load` rebuilds the architecture from the original builder, re-applies the structural part of
the plan (anchor shapes), resizes every layer to the saved shapes and loads the weights. Writes are
atomic (temporary file + rename), so a killed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deployment.onnx_io import is_onnx
from ..detectors.anchors import apply_anchor_plan
from ..detectors.builders import ModelSpec, build_model
from ..errors import CheckpointError, SurgeryError
from ..pruning.plan import Plan, plan_chain, plan_from_dict
from ..yolo.pickle_probe import is_ultralytics_pickle, ultralytics_pickle_hint
from .atomic import atomic_open
from .trust import UntrustedCodeError, code_reference, is_user_code, origin, trust_enabled

FORMAT = "surgery-checkpoint"
FORMAT_VERSION = 1
KINDS = ("dense", "structured", "masked")


@dataclass
class Checkpoint:
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    kind: str = "dense"
    plan: Plan | None = None
    masks: dict[str, torch.Tensor] | None = None
    recipe: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    class_names: list[str] | None = None  # label index -> name (0: background), from the training data

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.spec.to_dict(),
            "kind": self.kind,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "masks": self.masks,
            "recipe": self.recipe,
            "metrics": self.metrics,
            "train_state": self.train_state,
            "meta": self.meta,
            "class_names": self.class_names,
            "state_dict": self.state_dict,
        }


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    import io

    # serialised in memory first: torch's zip writer reports a full disk as "inline_container.cc:
    # unexpected pos" (a RuntimeError); a plain write says ENOSPC, which atomic_open names in one line
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getbuffer())
    return Path(path)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    spec: ModelSpec,
    *,
    kind: str = "dense",
    plan: Plan | dict[str, Any] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """Write ``model`` and how to rebuild it, atomically. ``class_names``: label index -> name
    (index 0 the background), shown by ``surgery predict`` and ``surgery info``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model = getattr(model, "module", model)  # unwrap DDP
    if ":" in spec.name and spec.code is None:  # user code: record which file (and content) built it

        spec = ModelSpec(spec.name, dict(spec.kwargs), code_reference(spec.name))
    ckpt = Checkpoint(
        spec=spec,
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        kind=kind,
        plan=plan_from_dict(plan),
        masks={k: v.detach().cpu().bool() for k, v in masks.items()} if masks else None,
        recipe=recipe,
        metrics=dict(metrics or {}),
        train_state=train_state,
        class_names=[str(c) for c in class_names] if class_names else None,
        meta={
            "torch": str(torch.__version__),  # TorchVersion is not weights_only-loadable
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return atomic_save(ckpt.to_dict(), path)


def save_pruned(
    path: str | Path,
    model: nn.Module,
    spec: ModelSpec,
    plan: Plan,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """The one way a pruning step (structured or masked) writes its checkpoint: the kind comes
    from the plan, masks of a masked plan are required."""
    if plan.kind == "masked" and not masks:
        raise ValueError("a masked plan is saved with its masks")
    return save_checkpoint(path, model, spec, kind=plan.kind, plan=plan, masks=masks, recipe=recipe, metrics=metrics,
                           class_names=class_names)


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    try:
        read_checkpoint(p)
    except CheckpointError:
        return False
    return True


# checkpoint dicts: fields of the wrong type are one clear error (a hostile or damaged file)


def _json_like(value: Any, depth: int = 0) -> bool:
    if depth > 64:
        return False
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_like(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _json_like(v, depth + 1) for k, v in value.items())
    return False


def check_checkpoint_dict(obj: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint dict whose fields have the wrong types (a hostile or damaged file)."""
    def bad(field: str, expected: str) -> CheckpointError:
        got = type(obj.get(field)).__name__
        return CheckpointError(f"checkpoint {path}: field '{field}' is {got}, expected {expected} (damaged or not written by surgery)")

    model = obj.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not model.get("name"):
        raise bad("model", "a mapping with a builder 'name'")
    if not isinstance(model.get("kwargs") or {}, dict) or not _json_like(model.get("kwargs") or {}):
        raise CheckpointError(f"checkpoint {path}: field 'model.kwargs' must be a mapping of plain values")
    code = model.get("code")
    if code is not None and not (isinstance(code, dict) and all(isinstance(code.get(k), (str, type(None))) for k in ("file", "sha256"))):
        raise CheckpointError(f"checkpoint {path}: field 'model.code' must be a mapping with 'file' and 'sha256'")
    if obj.get("kind", "dense") not in ("dense", "structured", "masked"):
        raise bad("kind", "dense, structured or masked")
    for field_name in ("plan", "recipe", "train_state"):
        if obj.get(field_name) is not None and not isinstance(obj[field_name], dict):
            raise bad(field_name, "a mapping or null")
    plan = obj.get("plan")
    depth = 0
    while isinstance(plan, dict) and plan.get("previous") is not None:
        plan = plan["previous"]
        depth += 1
        if not isinstance(plan, dict) or depth > 100:
            raise CheckpointError(f"checkpoint {path}: field 'plan.previous' must be a mapping (chain of at most 100)")
    for field_name in ("metrics", "meta"):
        if obj.get(field_name) is not None and not isinstance(obj[field_name], dict):
            raise bad(field_name, "a mapping or null")
    names = obj.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise bad("class_names", "a list of strings or null")
    sd = obj.get("state_dict")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise bad("state_dict", "a mapping of names to tensors")
    masks = obj.get("masks")
    if masks is not None and (
        not isinstance(masks, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in masks.items())
    ):
        raise bad("masks", "a mapping of parameter names to tensors or null")
    version = obj.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("version", "an integer")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a surgery checkpoint (no model is built)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong magic, unsafe pickle...
        if is_onnx(path):
            raise CheckpointError(
                f"{path} is an ONNX export, not a surgery checkpoint: bench, eval and predict take it; "
                "this command needs the .pt checkpoint it was exported from"
            ) from None
        if is_ultralytics_pickle(path):
            raise CheckpointError(ultralytics_pickle_hint(path)) from None
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a torch file ({e.__class__.__name__})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        if is_ultralytics_pickle(path):  # loadable here when Ultralytics registered its classes as safe
            raise CheckpointError(ultralytics_pickle_hint(path))
        raise CheckpointError(
            f"{path} is not a surgery checkpoint (a plain state dict can be given as the model's weights instead)"
        )
    check_checkpoint_dict(obj, path)
    if obj.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer surgery (format {obj.get('version')})")
    return Checkpoint(
        spec=ModelSpec.from_dict(obj["model"]),
        state_dict=obj["state_dict"],
        kind=obj.get("kind", "dense"),
        plan=plan_from_dict(obj.get("plan"), where=str(path)),
        masks=obj.get("masks"),
        recipe=obj.get("recipe"),
        metrics=obj.get("metrics") or {},
        train_state=obj.get("train_state"),
        meta=obj.get("meta") or {},
        path=path,
        class_names=obj.get("class_names"),
    )


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Give every layer the shapes found in ``state_dict`` (the cut widths), keeping attributes
    (``out_channels``, ``groups`` of depthwise convs, ``num_features``...) consistent."""
    for mname, module in model.named_modules():
        changed = False
        for pname, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            saved = state_dict.get(f"{mname}.{pname}" if mname else pname)
            if saved is None or tensor is None or saved.shape == tensor.shape:
                continue
            _check_cut_shape(f"{mname}.{pname}" if mname else pname, module, tensor, saved)
            new = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(module, pname, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                setattr(module, pname, new)  # an existing buffer: nn.Module keeps it a buffer
            changed = True
        if changed:
            _sync_attributes(module)


def _check_cut_shape(name: str, module: nn.Module, tensor: torch.Tensor, saved: torch.Tensor) -> None:
    """A cut changes channel counts, never a tensor's rank or a conv's kernel: anything else is a
    corrupt or crafted checkpoint, one line here instead of an IndexError in the first forward."""
    if not isinstance(saved, torch.Tensor) or saved.dim() != tensor.dim():
        got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise CheckpointError(f"checkpoint tensor {name} has shape {got}, but the layer needs {tensor.dim()} "
                              f"dimensions like {tuple(tensor.shape)}: a corrupt or edited checkpoint")
    if isinstance(module, nn.modules.conv._ConvNd) and saved.shape[2:] != tensor.shape[2:]:
        raise CheckpointError(f"checkpoint tensor {name} has kernel {tuple(saved.shape[2:])}, the layer "
                              f"{tuple(tensor.shape[2:])}: a cut never changes kernels (a corrupt or edited checkpoint)")


def _sync_attributes(module: nn.Module) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            module.in_channels = w.shape[0]
            module.out_channels = w.shape[1] * module.groups if not depthwise else w.shape[0]
        else:
            module.out_channels = w.shape[0]
            module.in_channels = w.shape[1] * module.groups if not depthwise else w.shape[0]
        if depthwise:
            module.groups = module.in_channels = module.out_channels = w.shape[0]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = module.weight.shape[0]


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", *, trust_code: bool | None = None
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model a checkpoint describes and load its weights.

    A checkpoint whose builder is user code (``module:function``, ``file.py:function``) is refused
    unless ``trust_code=True`` (``--trust-code``); the builder file's recorded hash is verified first.
    """
    ckpt = read_checkpoint(path)
    with origin(f"checkpoint {path}"):
        return _load(path, ckpt, device, trust_code)


def _refuse_unpinned_code(path: str | Path, spec: ModelSpec, trust_code: bool | None) -> None:
    """With --trust-code, a checkpoint naming a builder file runs it only if it recorded the file's
    sha256 (``code.sha256``, written by save_checkpoint): without it nothing shows that the file
    found now is the code that built the model, so trust is not extended to it."""
    if not is_user_code(spec.name) or not trust_enabled(trust_code):
        return  # registered builders run no user code; untrusted ones are refused by build_model
    code = spec.code if isinstance(spec.code, dict) else {}
    names_file = spec.name.rpartition(":")[0].endswith(".py") or bool(code.get("file"))
    digest = code.get("sha256")
    if names_file and not (isinstance(digest, str) and len(digest) == 64):
        raise UntrustedCodeError(
            f"checkpoint {path} names builder {spec.name!r} but records no sha256 of its file (code.sha256), so "
            "surgery cannot check that the file found now is the code that built it; nothing was run, even with "
            f"--trust-code. To run that file anyway: --model {spec.name} --weights {path} --trust-code"
        )


def _load(path: str | Path, ckpt: Checkpoint, device: str | torch.device, trust_code: bool | None) -> tuple[nn.Module, Checkpoint]:
    spec = ModelSpec(ckpt.spec.name, {**ckpt.spec.kwargs}, ckpt.spec.code)
    # the architecture comes from the builder; the weights from the checkpoint
    if "weights" in spec.kwargs:
        spec.kwargs["weights"] = None
    if "weights_backbone" in spec.kwargs:
        spec.kwargs["weights_backbone"] = None
    _refuse_unpinned_code(path, spec, trust_code)
    try:
        model = build_model(spec, trust_code=trust_code)
    except Exception as e:
        if isinstance(e, SurgeryError):
            raise
        raise CheckpointError(f"checkpoint {path}: cannot rebuild model {spec.name!r}: {e}") from e
    apply_structure(model, ckpt.plan)
    resize_to_state_dict(model, ckpt.state_dict)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match model {spec.name!r}: {str(e).splitlines()[0]}") from e
    return model.to(device), ckpt


def apply_structure(model: nn.Module, plan: Plan | None) -> None:
    """Re-apply the non-weight part of a plan chain (anchor shapes), oldest first."""
    for p in reversed(plan_chain(plan)):
        if getattr(p, "anchors", None):
            apply_anchor_plan(model, p.anchors)


def looks_like_path(source: str) -> bool:
    return Path(source).suffix in {".pt", ".pth", ".ckpt"} or Path(source).is_file()


def resolve_model(
    source: str, kwargs: dict[str, Any] | None = None, weights: str | None = None, *, trust_code: bool | None = None
) -> tuple[nn.Module, ModelSpec, Checkpoint | None]:
    """A model from a registered name, ``module:function`` or a surgery checkpoint path.

    Returns the model, the spec that rebuilds its architecture, and the checkpoint if any.
    """
    if ":" not in source and looks_like_path(source):
        model, ckpt = load_checkpoint(source, trust_code=trust_code)
        return model, ckpt.spec, ckpt
    kw = dict(kwargs or {})
    if weights is not None:
        kw["weights"] = weights
    spec = ModelSpec(source, kw)
    return build_model(spec, trust_code=trust_code), spec, None


def load(path: str | Path, device: str | torch.device = "cpu", *, trust_code: bool | None = None) -> nn.Module:
    """Load a surgery checkpoint (pruned, masked or dense) as a ready ``nn.Module`` **in eval mode**
    (call ``.train()`` to fine-tune it; :func:`load_checkpoint` leaves the mode as built).

    ``trust_code=True`` is needed when the checkpoint's builder is user code (see :mod:`surgery.storage.trust`)."""
    return load_checkpoint(path, device, trust_code=trust_code)[0].eval()
