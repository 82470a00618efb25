"""An Ultralytics model config (a model yaml as a dict) checked as *data* before Ultralytics sees it.

Ultralytics turns a model yaml into layers with ``eval()`` (the ``activation`` string) and a lookup
in its module's globals (each row's module name: ``torch_safe_load`` is as reachable as ``Conv``).
Its restricted mode (``ULTRALYTICS_SAFE_LOAD``) is read once, when the package is first imported, so
a process that imported ``ultralytics`` before surgery builds with ``eval()``. The config recorded in
a checkpoint (``model.kwargs.cfg``) or a user's yaml is therefore checked here against an allow-list,
whatever was imported first:

- top-level keys from a fixed set; ``nc`` an integer in 1..MAX_CLASSES; ``depth_multiple`` and
  ``width_multiple`` finite in (0, MAX_MULTIPLE]; ``scales`` rows ``[depth, width, max_channels]``
  within the same bounds; ``reg_max`` and ``channels`` small integers; ``end2end`` a bool;
- ``activation`` exactly ``[torch.]nn.<Name>(<literal numbers / bools>)`` with ``<Name>`` from a
  fixed set of activations;
- every row ``[from, repeats, module, args]``: ``from`` layer indices that point backwards,
  ``repeats`` a small positive integer, ``module`` one of the detection layers Ultralytics defines
  (``Conv``, ``C2f``, ``SPPF``, ``Detect``...) or a few ``nn.`` layers, ``args`` finite numbers,
  bools, short lists of those, or one of a few strings (``nc``, ``None``, ``nearest``...);
- a size estimate: the widest layer (after the width multiple) and the total repeats are bounded,
  so ``width_multiple: 1000`` or ``depth_multiple: 100000`` is one line, not 295 GB.

Each violation is one :class:`~surgery.errors.UnknownModelError` line naming the key and the
source. No torch, no Ultralytics here: this module only reads Python data.
"""

from __future__ import annotations

import ast
import math
from typing import Any

from ..errors import UnknownModelError

MAX_CLASSES = 100_000
MAX_MULTIPLE = 4.0  # YOLOv8x: depth 1.0, width 1.25; scales never reach 2
MAX_CHANNELS = 8192  # the widest layer after the width multiple (YOLOv8x: 640)
MAX_REPEATS = 64  # one row's repeats after the depth multiple (YOLOv8x: 9)
MAX_ROWS = 512  # backbone + head (YOLOv9e: ~50)
MAX_LIST = 64  # elements in one argument list
MAX_INT_ARG = 100_000

TOP_KEYS = frozenset({
    "nc", "scales", "scale", "depth_multiple", "width_multiple", "activation", "backbone", "head",
    "reg_max", "end2end", "channels", "ch", "yaml_file",
})  # fmt: skip

# layers Ultralytics defines for detection models (its shipped detection yamls use these); heads
# other than detection (Segment, Pose, OBB, Classify), text/vision downloads (WorldDetect, YOLOE*,
# TorchVision) and anything else in its module namespace (functions such as torch_safe_load) are not
MODULES = frozenset({
    "A2C2f", "AConv", "ADown", "AIFI", "Bottleneck", "BottleneckCSP", "C1", "C2", "C2PSA", "C2f",
    "C2fCIB", "C2fPSA", "C3", "C3Ghost", "C3TR", "C3k2", "C3x", "CBFuse", "CBLinear", "Concat", "Conv",
    "ConvTranspose", "DWConv", "DWConvTranspose2d", "Detect", "ELAN1", "Focus", "GhostBottleneck",
    "GhostConv", "HGBlock", "HGStem", "PSA", "RepC3", "RepNCSPELAN4", "ResNetLayer", "SCDown", "SPP",
    "SPPELAN", "SPPF", "v10Detect",
    "nn.BatchNorm2d", "nn.ConvTranspose2d", "nn.Identity", "nn.MaxPool2d", "nn.Upsample", "nn.ZeroPad2d",
})  # fmt: skip

ACTIVATIONS = frozenset({
    "SiLU", "ReLU", "ReLU6", "LeakyReLU", "Hardswish", "Hardsigmoid", "Mish", "GELU", "ELU", "SELU",
    "CELU", "Sigmoid", "Tanh", "Identity", "PReLU",
})  # fmt: skip
ACTIVATION_KEYWORDS = frozenset({"inplace", "negative_slope", "alpha", "num_parameters", "init", "approximate"})

STRING_ARGS = frozenset({"nc", "None", "nearest", "bilinear", "True", "False"})

# ---- task heads: segmentation (Segment: mask prototypes), pose (Pose: keypoints), oriented boxes
# (OBB: an angle per box), and their YOLO26 forms. Kept in this one block, apart from the size bounds.
TASK_HEADS = frozenset({"Segment", "Segment26", "Pose", "Pose26", "OBB", "OBB26"})
MODULES = MODULES | TASK_HEADS
STRING_ARGS = STRING_ARGS | {"kpt_shape"}  # Pose's argument: the yaml's kpt_shape
TOP_KEYS = TOP_KEYS | {"kpt_shape"}
MAX_KEYPOINTS = 1024


def check_task_keys(cfg: dict[str, Any], source: str) -> None:
    """``kpt_shape`` (pose yamls): ``[keypoints, 2 or 3]`` with a bounded keypoint count."""
    kpt = cfg.get("kpt_shape")
    if kpt is None:
        return
    if (not isinstance(kpt, list) or len(kpt) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in kpt)
            or not 1 <= kpt[0] <= MAX_KEYPOINTS or kpt[1] not in (2, 3)):  # fmt: skip
        raise _fail(source, f"kpt_shape must be [keypoints in 1..{MAX_KEYPOINTS}, 2 or 3], got {_short(kpt)}")


def _fail(source: str, what: str) -> UnknownModelError:
    return UnknownModelError(f"ultralytics model {source}: {what}; refused (the model config is data, checked before it is built)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(cfg: dict[str, Any], key: str, hi: float, source: str, *, integer: bool = False) -> None:
    v = cfg[key]
    ok = isinstance(v, int) and not isinstance(v, bool) if integer else _number(v)
    if not ok or not 0 < v <= hi:
        kind = "an integer" if integer else "a finite number"
        raise _fail(source, f"{key} must be {kind} in (0, {hi:g}], got {_short(v)}")


def check_activation(text: Any, source: str = "config") -> None:
    """``[torch.]nn.<Name>(literal args)`` with ``<Name>`` in :data:`ACTIVATIONS`, or refused."""
    if not isinstance(text, str) or len(text) > 80:
        raise _fail(source, f"activation must be a short string like 'nn.SiLU()', got {_short(text)}")
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise _fail(source, f"activation {_short(text)} is not 'nn.<Activation>(...)'") from None
    func = call.func if isinstance(call, ast.Call) else None
    chain: list[str] = []
    while isinstance(func, ast.Attribute):
        chain.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        chain.append(func.id)
    names = ", ".join(sorted(ACTIVATIONS))
    if not isinstance(call, ast.Call) or chain[1:] not in (["nn"], ["nn", "torch"]) or chain[0] not in ACTIVATIONS:
        raise _fail(source, f"activation {_short(text)} is not 'nn.<Activation>(...)' with an activation from: {names}")
    values = [*call.args, *(k.value for k in call.keywords)]
    if any(k.arg not in ACTIVATION_KEYWORDS for k in call.keywords) or len(values) > 3:
        raise _fail(source, f"activation {_short(text)}: arguments other than {sorted(ACTIVATION_KEYWORDS)}")
    for v in values:
        if not (isinstance(v, ast.Constant) and (_number(v.value) or isinstance(v.value, bool) or v.value in ("tanh", "none"))):
            if not (isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.USub) and isinstance(v.operand, ast.Constant) and _number(v.operand.value)):
                raise _fail(source, f"activation {_short(text)}: arguments must be literal numbers or bools")


def _check_arg(a: Any, where: str, source: str, depth: int = 0) -> None:
    if isinstance(a, bool) or a is None:
        return
    if isinstance(a, int):
        if abs(a) > MAX_INT_ARG:
            raise _fail(source, f"{where}: argument {a} is out of range (|x| <= {MAX_INT_ARG})")
        return
    if isinstance(a, float):
        if not math.isfinite(a) or abs(a) > MAX_INT_ARG:
            raise _fail(source, f"{where}: argument {a!r} is not a finite number in range")
        return
    if isinstance(a, str):
        if a not in STRING_ARGS:
            raise _fail(source, f"{where}: string argument {_short(a)} is not one of {sorted(STRING_ARGS)}")
        return
    if isinstance(a, list) and depth < 2 and len(a) <= MAX_LIST:
        for x in a:
            _check_arg(x, where, source, depth + 1)
        return
    raise _fail(source, f"{where}: argument {_short(a)} is not a number, bool, short list or known name")


def _check_from(f: Any, i: int, where: str, source: str) -> list[int]:
    idx = f if isinstance(f, list) else [f]
    if not idx or len(idx) > MAX_LIST:
        raise _fail(source, f"{where}: 'from' {_short(f)} must be a layer index or a short list of them")
    for x in idx:
        if not isinstance(x, int) or isinstance(x, bool) or not (-i <= x < i or (i == 0 and x == -1)):
            raise _fail(source, f"{where}: 'from' {_short(f)} must name earlier layers (-{max(i, 1)}..{max(i - 1, 0)})")
    return idx


def _scale_row(cfg: dict[str, Any], source: str) -> tuple[float, float, float]:
    scales = cfg.get("scales")
    depth, width, max_ch = cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), float(MAX_CHANNELS)
    if scales is None:
        return depth, width, max_ch
    if not isinstance(scales, dict) or not scales or len(scales) > 16:
        raise _fail(source, f"scales must be a mapping like {{n: [0.33, 0.25, 1024]}}, got {_short(scales)}")
    for key, row in scales.items():
        if not isinstance(key, str) or len(key) > 8:
            raise _fail(source, f"scale name {_short(key)} must be a short string (n, s, m, l, x)")
        if not (isinstance(row, list) and len(row) == 3 and all(_number(v) for v in row)):
            raise _fail(source, f"scales.{key} must be [depth, width, max_channels] numbers, got {_short(row)}")
        d, w, c = row
        if not (0 < d <= MAX_MULTIPLE and 0 < w <= MAX_MULTIPLE and 0 < c <= MAX_CHANNELS):
            raise _fail(
                source,
                f"scales.{key} = {_short(row)}: depth and width multiples must be in (0, {MAX_MULTIPLE:g}], "
                f"max_channels in (0, {MAX_CHANNELS}]",
            )
    scale = cfg.get("scale")
    if scale in (None, ""):
        scale = next(iter(scales))
    if scale not in scales:
        raise _fail(source, f"scale {_short(scale)} is not one of the yaml's scales {sorted(scales)}")
    d, w, c = scales[scale]
    return d, w, c


def check_config(cfg: Any, source: str = "config") -> None:
    """Raise :class:`UnknownModelError` (one line) unless ``cfg`` is a detection model config made
    only of allowed layers, literal arguments and bounded sizes (see the module docstring)."""
    if not isinstance(cfg, dict):
        raise _fail(source, f"the model config must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(str(k) for k in cfg if k not in TOP_KEYS)
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(_short(k) for k in unknown)} (allowed: {', '.join(sorted(TOP_KEYS))})")
    if "nc" in cfg:
        nc = cfg["nc"]
        if not isinstance(nc, int) or isinstance(nc, bool) or not 1 <= nc <= MAX_CLASSES:
            raise _fail(source, f"nc (object classes) must be an integer in 1..{MAX_CLASSES}, got {_short(nc)}")
    for key in ("depth_multiple", "width_multiple"):
        if key in cfg:
            _positive(cfg, key, MAX_MULTIPLE, source)
    for key, hi in (("reg_max", 64), ("channels", 3), ("ch", 3)):
        if key in cfg:
            _positive(cfg, key, hi, source, integer=True)
    if "end2end" in cfg and not isinstance(cfg["end2end"], (bool, type(None))):
        raise _fail(source, f"end2end must be true or false, got {_short(cfg['end2end'])}")
    for key in ("yaml_file", "scale"):
        if cfg.get(key) is not None and (not isinstance(cfg[key], str) or len(cfg[key]) > 4096):
            raise _fail(source, f"{key} must be a string, got {_short(cfg[key])}")
    check_task_keys(cfg, source)
    if cfg.get("activation") is not None:
        check_activation(cfg["activation"], source)
    depth, width, max_ch = _scale_row(cfg, source)
    rows = []
    for part in ("backbone", "head"):
        section = cfg.get(part)
        if not isinstance(section, list) or not section:
            raise _fail(source, f"{part} must be a non-empty list of [from, repeats, module, args] rows")
        rows += [(part, j, r) for j, r in enumerate(section)]
    if len(rows) > MAX_ROWS:
        raise _fail(source, f"{len(rows)} layers is more than {MAX_ROWS}")
    total = 0
    for i, (part, j, row) in enumerate(rows):
        where = f"{part}[{j}]"
        if not (isinstance(row, list) and len(row) == 4):
            raise _fail(source, f"{where} must be [from, repeats, module, args], got {_short(row)}")
        f, n, m, args = row
        _check_from(f, i, where, source)
        if not isinstance(m, str) or m not in MODULES:
            raise _fail(source, f"{where}: module {_short(m)} is not a detection layer surgery builds (e.g. Conv, C2f, SPPF, Detect)")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_REPEATS:
            raise _fail(source, f"{where}: repeats must be an integer in 1..{MAX_REPEATS}, got {_short(n)}")
        repeats = max(round(n * depth), 1) if n > 1 else n
        if repeats > MAX_REPEATS:
            raise _fail(source, f"{where}: {n} repeats x depth multiple {depth:g} = {repeats} (at most {MAX_REPEATS})")
        total += repeats
        if not isinstance(args, list) or len(args) > 16:
            raise _fail(source, f"{where}: args must be a short list, got {_short(args)}")
        for a in args:
            _check_arg(a, where, source)
        if args and _number(args[0]) and not m.startswith("nn.") and m not in ("Concat", "Detect", "v10Detect"):
            width_out = min(args[0], max_ch) * width
            if width_out > MAX_CHANNELS or args[0] < 0:
                raise _fail(source, f"{where}: {args[0]} channels x width multiple {width:g} = {width_out:g} (at most {MAX_CHANNELS})")
    if total > MAX_ROWS * 4:
        raise _fail(source, f"{total} layers after the depth multiple is more than {MAX_ROWS * 4}")
    head = rows[-1][2][2]
    if head not in ("Detect", "v10Detect", *TASK_HEADS):
        raise _fail(source, f"the last layer is {_short(head)}, not a detection head (Detect, v10Detect)")
