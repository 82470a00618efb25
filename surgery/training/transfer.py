"""Fine-tuning to the user's classes: load weights (a file or a surgery checkpoint) into a model
built with another ``num_classes``, keeping everything but the class outputs, which stay freshly
initialised by the builder.

Which tensors are class outputs is found from the builder itself, not from a list of layer
names: the architecture is built (on the ``meta`` device: no memory, no init cost) with two class
counts, and the tensors whose shapes differ are the class outputs (FCOS/RetinaNet ``cls_logits``,
every SSD/SSDlite classification predictor, Faster/Mask R-CNN ``box_predictor.cls_score`` and
``bbox_pred``, ``mask_predictor.mask_fcn_logits``; user builders alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..detectors.builders import ModelSpec, build_model, load_weights_file
from ..errors import CheckpointError
from ..storage.checkpoint import apply_structure, read_checkpoint, resize_to_state_dict


@dataclass
class Transfer:
    """What a class-changing load did."""

    loaded: int  # tensors taken from the weights
    reinitialised: list[str] = field(default_factory=list)  # class-output layers left as built
    classes_before: int | None = None  # num_classes of the weights, when known


def class_dependent_keys(spec: ModelSpec) -> set[str]:
    """State-dict keys whose shape depends on ``num_classes`` for this builder."""
    base = int(spec.kwargs.get("num_classes") or 2)
    shapes = []
    for k in (base, base + 1):
        kwargs = {**spec.kwargs, "num_classes": k}
        kwargs.pop("weights", None)
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
            model = build_model(ModelSpec(spec.name, kwargs, spec.code))
        shapes.append({n: tuple(t.shape) for n, t in model.state_dict().items()})
    return {n for n, s in shapes[0].items() if shapes[1].get(n) != s}


def _layer(key: str) -> str:
    return key.rpartition(".")[0] or key


def fit_class_outputs(model: nn.Module, state_dict: dict[str, torch.Tensor], class_keys: set[str], source: str) -> dict[str, torch.Tensor]:
    """``state_dict`` with its class-output tensors replaced by the model's own (fresh) ones, cut
    to the saved input widths (a pruned head feeds fewer channels into its class layer)."""
    own = model.state_dict()
    out = dict(state_dict)
    for k in class_keys & set(state_dict):
        mine, saved = own[k], state_dict[k]
        if mine.dim() != saved.dim() or any(a < b for a, b in zip(mine.shape[1:], saved.shape[1:], strict=True)):
            raise CheckpointError(f"{source}: class output {k} has shape {tuple(saved.shape)}, the model {tuple(mine.shape)}")
        out[k] = mine[(slice(None), *(slice(0, n) for n in saved.shape[1:]))].clone()
    return out


def load_except_classes(model: nn.Module, spec: ModelSpec, state_dict: dict[str, torch.Tensor], source: str) -> Transfer:
    """Load ``state_dict`` into ``model`` (built for ``spec``, another ``num_classes``) except its
    class outputs. Any other mismatch is one :class:`CheckpointError` naming the tensor."""
    class_keys = class_dependent_keys(spec)
    own = model.state_dict()
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    wrong = [k for k, v in state_dict.items() if k in own and k not in class_keys and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{source} does not match the model beyond its class outputs: {k} is "
                              f"{tuple(state_dict[k].shape)} in the file, {tuple(own[k].shape)} in the model")
    changed = [k for k in class_keys if k in state_dict and k in own and own[k].shape != state_dict[k].shape]
    keep = {k: v for k, v in state_dict.items() if k not in changed}
    missing, unexpected = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if k not in changed]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: {len(missing)} missing keys (e.g. {missing[:2]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    before = None
    for k in changed:
        mine, saved = own[k].shape[0], state_dict[k].shape[0]
        n = int(spec.kwargs.get("num_classes") or 0)
        if n and saved * n % mine == 0:
            before = saved * n // mine
    return Transfer(len(keep), sorted({_layer(k) for k in changed}), before)


def build_with_weights_file(spec: ModelSpec, path: str | Path) -> tuple[nn.Module, Transfer]:
    """``spec``'s model with the weights of ``path`` (a state dict, a training checkpoint or a
    surgery checkpoint of the same dense architecture): class outputs re-initialised when the
    file has another ``num_classes``."""
    model = build_model(spec)
    try:
        load_weights_file(model, Path(path))
        return model, Transfer(len(model.state_dict()))
    except CheckpointError as e:
        if "num_classes" not in spec.kwargs:
            raise
        first = e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, unreadable or not a tensor file: load_weights_file's line says which
        raise first from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        raise first from None  # a pickled model (an Ultralytics one, its classes allowed to torch): not weights
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and all(isinstance(v, torch.Tensor) for v in obj[key].values()):
            obj = obj[key]
            break
    return model, load_except_classes(model, spec, obj, f"weights file {path}")


def load_checkpoint_with(path: str | Path, kwargs: dict[str, Any], device: str = "cpu") -> tuple[nn.Module, Any, Transfer | None]:
    """A surgery checkpoint rebuilt with other builder ``kwargs`` (``num_classes`` to fine-tune to
    new classes: every weight but the class outputs is kept, also of a pruned model; any other
    argument must keep the saved shapes). Returns the model, the checkpoint (its spec updated) and
    the :class:`Transfer` when the classes changed."""
    ckpt = read_checkpoint(path)
    spec = ModelSpec(ckpt.spec.name, {**ckpt.spec.kwargs, **kwargs}, ckpt.spec.code)
    new_classes = "num_classes" in kwargs and kwargs["num_classes"] != ckpt.spec.kwargs.get("num_classes")
    build_kwargs = {k: (None if k in ("weights", "weights_backbone") else v) for k, v in spec.kwargs.items()}
    model = build_model(ModelSpec(spec.name, build_kwargs, spec.code))
    apply_structure(model, ckpt.plan)
    transfer = None
    sd = ckpt.state_dict
    if new_classes:
        sd = fit_class_outputs(model, sd, class_dependent_keys(spec), f"checkpoint {path}")
        changed = [k for k, v in sd.items() if v.shape != ckpt.state_dict[k].shape]
        transfer = Transfer(len(sd) - len(changed), sorted({_layer(k) for k in changed}),
                            ckpt.spec.kwargs.get("num_classes"))
        if ckpt.masks:  # masks of re-initialised class outputs no longer apply
            ckpt.masks = {k: m for k, m in ckpt.masks.items() if k not in changed}
    resize_to_state_dict(model, sd)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"--kwarg {kwargs}: checkpoint {path} no longer fits ({str(e).splitlines()[0]})") from e
    ckpt.spec = spec
    ckpt.class_names = None if new_classes else ckpt.class_names
    return model.to(device), ckpt, transfer


__all__ = ["Transfer", "build_with_weights_file", "class_dependent_keys", "fit_class_outputs", "load_checkpoint_with",
           "load_except_classes"]
