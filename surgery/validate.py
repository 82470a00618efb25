"""Validation at the edge: builder arguments, checkpoint dicts and numbers read from files or flags
are checked before they reach torch, so bad input gives one clear error instead of a traceback or a
silently wrong result."""

from __future__ import annotations

import difflib
import inspect
import math
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnknownModelError


def _where() -> str:
    from .trust import _ORIGIN

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
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UnknownModelError(
                    f"model {name!r} has no argument {key!r}{hint}{_where()}; it takes: {', '.join(sorted(known))}"
                )
    for key, (ok, allowed) in _RANGES.items():
        if key in kwargs and kwargs[key] is not None and not ok(kwargs[key]):
            raise UnknownModelError(f"model {name!r}: bad argument {key}={kwargs[key]!r}{_where()}: expected {allowed}")


# --------------------------------------------------------------------------------------------
# checkpoint dicts


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
    import torch

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


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------
# flags and recipe values


FLAG_SOURCE = "command-line flags"


def check_flag_overrides(overrides: dict[str, Any]) -> None:
    """Validate the values flags set (``{"prune.ratio": 1.5}``) on their own, so an error blames the
    flag rather than the recipe file or ``<defaults>``."""
    from .recipe import recipe_from_dict

    data: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if data:
        recipe_from_dict(data, FLAG_SOURCE)


def check_device(device: Any, flag: str = "--device") -> None:
    import re

    from .errors import RecipeError

    if device is None:
        return
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d{1,2})?|mps", device):
        raise RecipeError(f"{flag} {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RecipeError(f"{flag} {device}: CUDA is not available on this machine (use cpu)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise RecipeError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# --------------------------------------------------------------------------------------------
# COCO files


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_coco_lists(data: dict[str, Any], ann_file: Path) -> None:
    """Every image, annotation and category entry is a mapping with integer ids (the file is
    refused with one line otherwise, not a traceback deep in the loader)."""
    from .errors import DataError

    for k, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_id(c.get("id")):
            raise DataError(f"{ann_file}: category entry {k} has no integer 'id' (got {c!r:.80})")
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{ann_file}: image entry {k} is not an object")
        if "id" in im and not _is_id(im["id"]):
            raise DataError(f"{ann_file}: image entry {k} has id {im['id']!r}; expected an integer")
        for key in ("width", "height"):
            v = im.get(key)
            if v is not None and (not _is_id(v) or not 0 < v <= 65_535):
                raise DataError(f"{ann_file}: image entry {k} has {key} {v!r}; expected an integer in [1, 65535]")
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{ann_file}: annotation entry {k} is not an object")
        for key in ("image_id", "category_id"):
            if key in a and not _is_id(a[key]):
                raise DataError(f"{ann_file}: annotation entry {k} has {key} {a[key]!r}; expected an integer")


def _category_ids(ann: Path) -> list[int] | None:
    import json

    try:
        data = json.loads(ann.read_text())
        return sorted(int(c["id"]) for c in data["categories"])
    except Exception:  # noqa: BLE001 - the split's own loader reports a bad file
        return None


def check_coco_splits(root: Path, split: str, ann: Path, layout: Any) -> None:
    """Labels are numbered from the category list: the train and val files of one COCO folder
    must list the same categories, or the labels (and the mAP) would silently differ per split."""
    from .errors import DataError

    other = "val" if split == "train" else "train"
    try:
        _, other_ann = layout(root, other)
    except DataError:
        return
    mine, theirs = _category_ids(ann), _category_ids(other_ann)
    if mine is not None and theirs is not None and mine != theirs:
        only = sorted(set(mine) ^ set(theirs))
        raise DataError(
            f"{ann} and {other_ann} list different categories (ids only in one of them: {only[:10]}); labels are "
            "numbered from the category list, so both splits must list the full, same category list"
        )


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_synth(images: Any, size: Any, seed: Any, val_images: Any = None) -> None:
    """Synthetic-set options in range, and a per-image memory estimate that fits (a 100000 px side
    would need ~240 GB per image)."""
    from .errors import DataError
    from .recipe import MAX_SYNTH_IMAGES, MAX_SYNTH_SIZE

    if not _int_at_least(images, 1) or images > MAX_SYNTH_IMAGES:
        raise DataError(f"synthetic dataset: images {images!r}: expected an integer in [1, {MAX_SYNTH_IMAGES}]")
    if val_images is not None and (not _int_at_least(val_images, 1) or val_images > MAX_SYNTH_IMAGES):
        raise DataError(f"synthetic dataset: val images {val_images!r}: expected an integer in [1, {MAX_SYNTH_IMAGES}]")
    if not _int_at_least(size, 32) or size > MAX_SYNTH_SIZE:
        raise DataError(f"synthetic dataset: size {size!r}: expected an integer in [32, {MAX_SYNTH_SIZE}] (pixels)")
    if not _int_at_least(seed, 0) or seed >= 2**32:
        raise DataError(f"synthetic dataset: seed {seed!r}: expected an integer in [0, 2**32)")
    need = size * size * 3 * 8  # uint8 image, float working copies, JPEG encoder buffers
    avail = _available_memory()
    if avail is not None and need > avail // 4:
        raise DataError(
            f"synthetic dataset: {size}x{size} px images need about {need / 2**30:.1f} GiB each; "
            f"only {avail / 2**30:.1f} GiB of memory is available"
        )
