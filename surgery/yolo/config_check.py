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
- every argument of every row against :data:`LAYER_ARGS`, a table of what each allowed layer's
  arguments mean (kernel, stride, padding, groups, expansion, channel counts, ``nc`` used as a
  channel count, ``nn.Upsample``'s scale, ``nn.ZeroPad2d``'s padding...) and their bounds
  (:data:`ARG_KINDS`): ``Conv [64, 5000, 1]`` is one line, not 102 GB. A new layer is one row there;
- a size estimate: the widest layer (after the width multiple) and the total repeats are bounded,
  so ``width_multiple: 1000`` or ``depth_multiple: 100000`` is one line, not 295 GB; then
  :func:`estimate_cost` follows channels and feature-map sides through the rows (as Ultralytics'
  parser will) and bounds parameters plus activation memory at the trace size by
  :func:`max_build_bytes` (12 GiB, an overestimate about 2x: fits a 24 GB machine; ``--max-model-gb``,
  :func:`model_size_limit` in Python, or ``SURGERY_MAX_MODEL_GB`` sets it).

Each violation is one :class:`~surgery.errors.UnknownModelError` line naming the key and the
source. No torch, no Ultralytics here: this module only reads Python data.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ..errors import RecipeError, UnknownModelError

MAX_CLASSES = 100_000
MAX_MULTIPLE = 4.0  # YOLOv8x: depth 1.0, width 1.25; scales never reach 2
MAX_CHANNELS = 8192  # the widest layer after the width multiple (YOLOv8x: 640)
MAX_REPEATS = 64  # one row's repeats after the depth multiple (YOLOv8x: 9)
MAX_ROWS = 512  # backbone + head (YOLOv9e: ~50)
MAX_LIST = 64  # elements in one argument list
MAX_INT_ARG = 100_000
MAX_KERNEL = 31  # shipped yamls: at most 13 (SPP)
MAX_STRIDE = 16
MAX_DILATION = 16
MAX_EXPANSION = 8.0  # C2f/C3 e (shipped: 0.5, 1.0), ResNetLayer e (4), mlp ratios (1.2, 2.0)
MAX_HEADS = 64
MAX_SIDE = 4096  # a feature map's side (Upsample size) and the trace size
MAX_UPSAMPLE = 8.0
MAX_BUILD_GB = 12.0  # parameters (+ grads, Adam) and batch-1 activations at the trace size
BUILD_GB_ENV = "SURGERY_MAX_MODEL_GB"
BUILD_GB_FLAG = "--max-model-gb"
MAX_BUILD_GB_SETTING = 1_000_000.0  # the highest limit that may be set (GiB): finite, far above any machine
_BUILD_GB: ContextVar[float | None] = ContextVar("surgery_max_model_gb", default=None)

TOP_KEYS = frozenset({
    "nc", "scales", "scale", "depth_multiple", "width_multiple", "activation", "backbone", "head",
    "reg_max", "end2end", "channels", "ch", "yaml_file",
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
HEADS = frozenset({"Detect", "v10Detect"}) | TASK_HEADS
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


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _ints_in(v: Any, lo: int, hi: int, lengths: tuple[int, ...] = (1, 2, 3, 4)) -> bool:
    return _int_in(v, lo, hi) or (isinstance(v, list) and len(v) in lengths and all(_int_in(x, lo, hi) for x in v))


def _in(v: Any, lo: float, hi: float) -> bool:  # lo < v <= hi
    return _number(v) and lo < v <= hi


# what an argument may be, by its meaning: (check, description for the error line)
ARG_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "channels": (lambda v: _int_in(v, 1, MAX_CHANNELS), f"a channel count in 1..{MAX_CHANNELS}"),
    "channel_list": (lambda v: isinstance(v, list) and 0 < len(v) <= 8 and all(_int_in(x, 1, MAX_CHANNELS) for x in v),
                     f"a short list of channel counts in 1..{MAX_CHANNELS}"),
    "kernel": (lambda v: _ints_in(v, 1, MAX_KERNEL), f"a kernel size in 1..{MAX_KERNEL} (or a short list of them)"),
    "stride": (lambda v: _int_in(v, 1, MAX_STRIDE), f"a stride in 1..{MAX_STRIDE}"),
    "stride_or_none": (lambda v: v is None or _int_in(v, 1, MAX_STRIDE), f"a stride in 1..{MAX_STRIDE} or None"),
    "padding": (lambda v: v is None or _ints_in(v, 0, MAX_KERNEL, (1, 2)), f"a padding in 0..{MAX_KERNEL} or None"),
    "pad4": (lambda v: _ints_in(v, 0, MAX_KERNEL, (2, 4)), f"a padding in 0..{MAX_KERNEL} (or 2 or 4 of them)"),
    "groups": (lambda v: _int_in(v, 1, MAX_CHANNELS), f"a group count in 1..{MAX_CHANNELS}"),
    "dilation": (lambda v: _ints_in(v, 1, MAX_DILATION, (1, 2)), f"a dilation in 1..{MAX_DILATION}"),
    "expansion": (lambda v: _in(v, 0, MAX_EXPANSION), f"an expansion in (0, {MAX_EXPANSION:g}]"),
    "repeats": (lambda v: _int_in(v, 1, MAX_REPEATS), f"a repeat count in 1..{MAX_REPEATS}"),
    "heads": (lambda v: _int_in(v, 1, MAX_HEADS), f"a head count in 1..{MAX_HEADS}"),
    "area": (lambda v: v == -1 or _int_in(v, 1, 16), "an area count in 1..16 (or -1: none)"),
    "dropout": (lambda v: _number(v) and 0 <= v < 1, "a dropout in [0, 1)"),
    "flag": (lambda v: isinstance(v, bool) or v in (0, 1), "true or false"),
    "act": (lambda v: isinstance(v, bool) or v is None, "true, false or None"),
    "nc": (lambda v: _int_in(v, 1, MAX_CLASSES), f"a class count in 1..{MAX_CLASSES}"),
    "dim": (lambda v: _int_in(v, 1, 3), "a tensor dimension in 1..3"),
    "indices": (lambda v: isinstance(v, list) and 0 < len(v) <= 8 and all(_int_in(x, 0, 8) for x in v),
                "a short list of small indices"),
    "side": (lambda v: v is None or _ints_in(v, 1, MAX_SIDE, (1, 2)), f"None or a size in 1..{MAX_SIDE}"),
    "scale": (lambda v: v is None or _in(v, 0, MAX_UPSAMPLE), f"None or a scale in (0, {MAX_UPSAMPLE:g}]"),
    "mode": (lambda v: v in ("nearest", "bilinear"), "'nearest' or 'bilinear'"),
    "ignored": (lambda v: True, "anything (ignored)"),
    "kpt_shape": (lambda v: v == "kpt_shape", "kpt_shape (the yaml's top-level key)"),
    "extra": (lambda v: _int_in(v, 1, 8), "a count of extra box parameters in 1..8"),
}

_C2 = ("c2", "channels")  # the output channels base layers scale by the width multiple
_CSP = (_C2, ("shortcut", "flag"), ("g", "groups"), ("e", "expansion"))

# the layers Ultralytics defines for detection models (its shipped detection yamls use these), each
# with its yaml arguments in order, by meaning (Ultralytics inserts the input channels and, for
# blocks with repeats, the repeat count; those are not in the yaml). A new layer is one row. Heads
# other than these and the task heads below (Classify, SemanticSegment), text/vision downloads (WorldDetect, YOLOE*,
# TorchVision) and anything else in its module namespace (functions such as torch_safe_load) are not.
LAYER_ARGS: dict[str, tuple[tuple[str, str], ...]] = {
    "Conv": (_C2, ("k", "kernel"), ("s", "stride"), ("p", "padding"), ("g", "groups"), ("d", "dilation"), ("act", "act")),
    "ConvTranspose": (_C2, ("k", "kernel"), ("s", "stride"), ("p", "padding"), ("bn", "flag"), ("act", "act")),
    "DWConv": (_C2, ("k", "kernel"), ("s", "stride"), ("d", "dilation"), ("act", "act")),
    "DWConvTranspose2d": (_C2, ("k", "kernel"), ("s", "stride"), ("p", "padding"), ("p2", "padding")),
    "GhostConv": (_C2, ("k", "kernel"), ("s", "stride"), ("g", "groups"), ("act", "act")),
    "Focus": (_C2, ("k", "kernel"), ("s", "stride"), ("p", "padding"), ("g", "groups"), ("act", "act")),
    "Bottleneck": (_C2, ("shortcut", "flag"), ("g", "groups"), ("k", "kernel"), ("e", "expansion")),
    "GhostBottleneck": (_C2, ("k", "kernel"), ("s", "stride")),
    "SCDown": (_C2, ("k", "kernel"), ("s", "stride")),
    "SPP": (_C2, ("k", "kernel")),
    "SPPF": (_C2, ("k", "kernel"), ("n", "repeats"), ("shortcut", "flag")),
    "SPPELAN": (_C2, ("c3", "channels"), ("k", "kernel")),
    "ADown": (_C2,),
    "AConv": (_C2,),
    "ELAN1": (_C2, ("c3", "channels"), ("c4", "channels")),
    "RepNCSPELAN4": (_C2, ("c3", "channels"), ("c4", "channels"), ("n", "repeats")),
    "C1": (_C2,),
    "C2": _CSP, "C2f": _CSP, "C3": _CSP, "C3x": _CSP, "C3TR": _CSP, "C3Ghost": _CSP, "BottleneckCSP": _CSP,
    "C2fCIB": (_C2, ("shortcut", "flag"), ("lk", "flag"), ("g", "groups"), ("e", "expansion")),
    "C3k2": (_C2, ("c3k", "flag"), ("e", "expansion"), ("attn", "flag"), ("g", "groups"), ("shortcut", "flag")),
    "A2C2f": (_C2, ("a2", "flag"), ("area", "area"), ("residual", "flag"), ("mlp_ratio", "expansion"),
              ("e", "expansion"), ("g", "groups"), ("shortcut", "flag")),
    "C2PSA": (_C2, ("e", "expansion")), "C2fPSA": (_C2, ("e", "expansion")), "PSA": (_C2, ("e", "expansion")),
    "RepC3": (_C2, ("e", "expansion")),
    "HGStem": (("cm", "channels"), ("c2", "channels")),
    "HGBlock": (("cm", "channels"), ("c2", "channels"), ("k", "kernel"), ("lightconv", "flag"), ("shortcut", "flag"),
                ("act", "act")),
    "ResNetLayer": (("c1", "channels"), ("c2", "channels"), ("s", "stride"), ("is_first", "flag"), ("n", "repeats"),
                    ("e", "expansion")),
    "AIFI": (("cm", "channels"), ("num_heads", "heads"), ("dropout", "dropout"), ("act", "act"), ("normalize_before", "flag")),
    "CBLinear": (("c2s", "channel_list"), ("k", "kernel"), ("s", "stride"), ("p", "padding"), ("g", "groups")),
    "CBFuse": (("idx", "indices"),),
    "Concat": (("dimension", "dim"),),
    "Detect": (("nc", "nc"),),
    "v10Detect": (("nc", "nc"),),
    # task heads (the block above): mask coefficients and prototype channels, keypoints, box angles
    **{m: (("nc", "nc"), ("nm", "channels"), ("npr", "channels")) for m in ("Segment", "Segment26")},
    **{m: (("nc", "nc"), ("kpt_shape", "kpt_shape")) for m in ("Pose", "Pose26")},
    **{m: (("nc", "nc"), ("ne", "extra")) for m in ("OBB", "OBB26")},
    "nn.BatchNorm2d": (("num_features", "ignored"),),  # Ultralytics passes the input channels instead
    "nn.Identity": (),
    "nn.ConvTranspose2d": (_C2, ("kernel_size", "kernel"), ("stride", "stride"), ("padding", "padding"),
                           ("output_padding", "padding"), ("groups", "groups"), ("bias", "flag"), ("dilation", "dilation")),
    "nn.MaxPool2d": (("kernel_size", "kernel"), ("stride", "stride_or_none"), ("padding", "padding"), ("dilation", "dilation"),
                     ("return_indices", "flag"), ("ceil_mode", "flag")),
    "nn.Upsample": (("size", "side"), ("scale_factor", "scale"), ("mode", "mode"), ("align_corners", "act")),
    "nn.ZeroPad2d": (("padding", "pad4"),),
}  # fmt: skip
MODULES = frozenset(LAYER_ARGS)


def short_source(source: Any) -> str:
    """A config's name (its ``yaml_file``, from the file) shortened for a one-line error."""
    text = str(source)
    return text if len(text) <= 120 else text[:117] + "..."


def _fail(source: str, what: str) -> UnknownModelError:
    return UnknownModelError(
        f"ultralytics model {short_source(source)}: {what}; refused (the model config is data, checked before it is built)"
    )


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
    if chain[0] == "PReLU":  # one activation module is shared by every Conv: only a single slope fits them all
        count = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "num_parameters"), None)
        if count is not None and not (isinstance(count, ast.Constant) and count.value == 1):
            raise _fail(source, f"activation {_short(text)}: PReLU's num_parameters must be 1 (one module serves every layer)")
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


_LITERALS = {"None": None, "True": True, "False": False}


def _named_args(m: str, args: list[Any], nc: int, where: str, source: str) -> dict[str, Any]:
    """``args`` by name (``nc`` and ``None``/``True``/``False`` strings resolved as Ultralytics will),
    each checked against its kind in :data:`LAYER_ARGS`."""
    spec = LAYER_ARGS[m]
    if len(args) > len(spec) and m not in ("nn.BatchNorm2d", "nn.Identity"):
        names = ", ".join(n for n, _ in spec) or "none"
        raise _fail(source, f"{where}: {m} takes at most {len(spec)} argument(s) ({names}), got {len(args)}")
    named: dict[str, Any] = {}
    for (name, kind), raw in zip(spec, args):
        value = nc if raw == "nc" else _LITERALS.get(raw, raw) if isinstance(raw, str) else raw
        ok, allowed = ARG_KINDS[kind]
        if not ok(value):
            via = f" (nc = {nc})" if raw == "nc" else ""
            raise _fail(source, f"{where}: {m} argument {name} = {_short(raw)}{via} must be {allowed}")
        named[name] = value
    return named


@dataclass
class Cost:
    """What building a model config will allocate, estimated from its rows (no torch)."""

    params: int  # weights
    activations: int  # activation values of one image at the trace size (what autograd keeps)
    size: int  # the trace size used

    @property
    def bytes(self) -> int:  # float32 weights, grads and two Adam moments; batch-1 activations
        return 4 * (4 * self.params + self.activations)


def check_build_gb(value: object, what: str = BUILD_GB_FLAG) -> float:
    """``value`` as a model-size limit in GiB: a finite number in (0, :data:`MAX_BUILD_GB_SETTING`]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= MAX_BUILD_GB_SETTING:
        raise RecipeError(f"{what} {_short(value)}: expected a number of GiB in (0, {MAX_BUILD_GB_SETTING:g}]")
    return float(value)


@contextlib.contextmanager
def model_size_limit(gb: float | None) -> Iterator[None]:
    """Within the block, a model config may need up to ``gb`` GiB (``--max-model-gb``); ``None``
    keeps the default (``SURGERY_MAX_MODEL_GB``, else 12 GiB). Only this call (context) sees it."""
    token = _BUILD_GB.set(None if gb is None else check_build_gb(gb))
    try:
        yield
    finally:
        _BUILD_GB.reset(token)


def max_build_bytes() -> int:
    """The most :attr:`Cost.bytes` a config may need: :func:`model_size_limit`'s value, else
    ``SURGERY_MAX_MODEL_GB`` (GiB), else 12 GiB."""
    gb = _BUILD_GB.get()
    if gb is None:
        raw = os.environ.get(BUILD_GB_ENV, "")
        try:
            gb = float(raw) if raw else MAX_BUILD_GB
        except ValueError:
            gb = MAX_BUILD_GB
    return int((gb if math.isfinite(gb) and gb > 0 else MAX_BUILD_GB) * 2**30)


def _first(v: Any, default: int) -> int:
    v = default if v is None else v
    return int(max(v)) if isinstance(v, list) else int(v)


def _side(m: str, a: dict[str, Any], side: float) -> float:
    """A row's output feature-map side from its input side (an estimate: padding ignored)."""
    s = _first(a.get("s"), 1)
    if m in ("Conv", "GhostConv", "DWConv", "GhostBottleneck", "SCDown", "CBLinear"):
        return math.ceil(side / s)
    if m == "Focus":
        return math.ceil(side / 2 / s)
    if m in ("ADown", "AConv"):
        return math.ceil(side / 2)
    if m == "HGStem":
        return math.ceil(side / 4)
    if m == "ResNetLayer":
        return math.ceil(side / 4) if a.get("is_first") else math.ceil(side / s)
    if m == "nn.MaxPool2d":
        return math.ceil(side / _first(a.get("stride"), _first(a.get("kernel_size"), 1)))
    if m in ("ConvTranspose", "DWConvTranspose2d"):
        return side * _first(a.get("s"), 2 if m == "ConvTranspose" else 1)
    if m == "nn.ConvTranspose2d":
        return side * _first(a.get("stride"), 1) + _first(a.get("kernel_size"), 1)
    if m == "nn.Upsample":
        return _first(a["size"], 1) if a.get("size") is not None else side * float(a.get("scale_factor") or 1)
    if m == "nn.ZeroPad2d":
        return side + 2 * _first(a.get("padding"), 0)
    return side


def _row_cost(m: str, a: dict[str, Any], c1: int, c2: int, n: int, reg_max: int, nc: int) -> tuple[float, float]:
    """(parameters, activation values per output pixel) of one row: an upper-bound style estimate."""
    if m in HEADS:  # per input level: box and class branches
        return 0.0, 0.0  # added by the caller, which knows every input's channels
    g = _first(a.get("g", a.get("groups")), 1)
    k = _first(a.get("k", a.get("kernel_size")), 1)
    if m in ("Conv", "ConvTranspose", "GhostConv", "Focus", "CBLinear", "nn.ConvTranspose2d", "DWConvTranspose2d", "DWConv"):
        per_group = 1 if m.startswith("DW") else 4 * c1 if m == "Focus" else c1 / g
        return per_group * c2 * k * k, 3.0 * c2
    if m in ("SPP", "SPPF", "SPPELAN", "nn.MaxPool2d", "nn.Upsample", "nn.ZeroPad2d", "nn.Identity", "nn.BatchNorm2d",
             "Concat", "CBFuse"):
        k = 1  # pooling kernels have no weights
    hidden = max(c2 * float(a.get("e", 0.5)), *(float(a.get(x, 0) or 0) for x in ("cm", "c3", "c4", "c1")))
    if "mlp_ratio" in a:
        hidden = max(hidden, c2 * float(a["mlp_ratio"]) * float(a.get("e", 0.5)))
    blocks = n * _first(a.get("n"), 1)
    kk = max(k, 3) if m not in ("SPP", "SPPF", "SPPELAN") else 1
    params = (c1 + c2) * max(c2, hidden) + blocks * 2 * hidden * hidden * kk * kk / g
    return params, 3.0 * (c1 + c2 + (2 * blocks + 2) * hidden)


def _detect_cost(chs: list[int], nc: int, reg_max: int, sides: list[float]) -> tuple[float, float]:
    params = acts = 0.0
    for c, side in zip(chs, sides):
        c2, c3 = max(16, c // 4, reg_max * 4), max(c, min(nc, 100))
        params += 9 * (c * c2 + c2 * c2 + c * c3 + c3 * c3) + c2 * 4 * reg_max + c3 * nc
        acts += side * side * 3.0 * (2 * c2 + 2 * c3 + 4 * reg_max + nc)
    return 2 * params, 2 * acts  # one-to-many and one-to-one branches (YOLOv10, YOLO26)


def estimate_cost(cfg: dict[str, Any], size: int = 640, nc: int | None = None) -> Cost:
    """Parameters and activation values of a config that passed the row checks (rows only in
    :func:`check_config`), following channels and sides as Ultralytics' parser builds them."""
    depth, width, max_ch = _scale_row(cfg, "config")
    nc = int(nc if nc is not None else cfg.get("nc", 80))
    reg_max = int(cfg.get("reg_max", 16))
    chs: list[int] = []
    sides: list[float] = []
    params = acts = 0.0
    for f, n, m, args in cfg["backbone"] + cfg["head"]:
        idx = f if isinstance(f, list) else [f]
        ins = [chs[x] if chs else 3 for x in idx]
        in_sides = [sides[x] if sides else float(size) for x in idx]
        a = _named_args(m, list(args), nc, m, "config")
        n = max(round(n * depth), 1) if n > 1 else n
        c1, side = ins[0], max(in_sides)
        if m in HEADS:
            p, act = _detect_cost(ins, nc, reg_max, in_sides)
            params, acts = params + p, acts + act
            chs.append(c1)
            sides.append(side)
            continue
        c2 = _out_channels(m, a, ins, width, max_ch)
        out_side = _side(m, a, side)
        p, per_pixel = _row_cost(m, a, c1, c2, n, reg_max, nc)
        params += p
        acts += per_pixel * max(out_side, side) ** 2
        chs.append(c2)
        sides.append(out_side)
    return Cost(int(params), int(acts), size)


def _out_channels(m: str, a: dict[str, Any], ins: list[int], width: float, max_ch: float) -> int:
    if "c2" in a and m not in ("HGStem", "HGBlock", "ResNetLayer"):
        return int(math.ceil(min(a["c2"], max_ch) * width / 8) * 8)
    if m in ("HGStem", "HGBlock"):
        return int(a["c2"])
    if m == "ResNetLayer":
        return int(a["c2"]) if a.get("is_first") else int(a["c2"]) * int(a.get("e", 4))
    if m == "Concat":
        return sum(ins)
    if m == "CBLinear":
        return sum(a["c2s"])
    return ins[-1]


def _check_cost(cfg: dict[str, Any], source: str, size: int, nc: int | None) -> None:
    cost = estimate_cost(cfg, size, nc)
    limit = max_build_bytes()
    if cost.bytes > limit:
        raise _fail(
            source,
            f"building it and tracing one {size}px image needs about {cost.bytes / 2**30:.1f} GiB "
            f"({cost.params / 1e6:.0f}M parameters, {cost.activations / 1e6:.0f}M activation values), "
            f"more than the {limit / 2**30:.3g} GiB limit (pass {BUILD_GB_FLAG} or set {BUILD_GB_ENV} to raise it on purpose)",
        )


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


def check_config(cfg: Any, source: str = "config", *, nc: int | None = None, size: int = 640) -> None:
    """Raise :class:`UnknownModelError` (one line) unless ``cfg`` is a detection model config made
    only of allowed layers, literal arguments and bounded sizes (see the module docstring).
    ``nc``: the class count the build will use instead of the yaml's; ``size``: the trace size."""
    if not isinstance(cfg, dict):
        raise _fail(source, f"the model config must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(str(k) for k in cfg if k not in TOP_KEYS)
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(_short(k) for k in unknown)} (allowed: {', '.join(sorted(TOP_KEYS))})")
    if "nc" in cfg:
        yaml_nc = cfg["nc"]
        if not isinstance(yaml_nc, int) or isinstance(yaml_nc, bool) or not 1 <= yaml_nc <= MAX_CLASSES:
            raise _fail(source, f"nc (object classes) must be an integer in 1..{MAX_CLASSES}, got {_short(yaml_nc)}")
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
        _named_args(m, args, nc if nc is not None else cfg.get("nc", 80), where, source)
        if args and _number(args[0]) and not m.startswith("nn.") and m not in ("Concat", *HEADS):
            width_out = min(args[0], max_ch) * width
            if width_out > MAX_CHANNELS or args[0] < 0:
                raise _fail(source, f"{where}: {args[0]} channels x width multiple {width:g} = {width_out:g} (at most {MAX_CHANNELS})")
    if total > MAX_ROWS * 4:
        raise _fail(source, f"{total} layers after the depth multiple is more than {MAX_ROWS * 4}")
    head = rows[-1][2][2]
    if head not in HEADS:
        raise _fail(source, f"the last layer is {_short(head)}, not a detection head (Detect, v10Detect)")
    _check_cost(cfg, source, size, nc)
