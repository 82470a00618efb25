"""INT8 post-training quantization of exported detectors with ONNX Runtime's tooling.

The float graph comes from :func:`surgery.deployment.export.export_onnx` (one ``3 x S x S`` image, the
model's own pre- and post-processing inside). ``onnxruntime.quantization.quantize_static`` then
writes a QDQ model: weights per-channel, activations calibrated on training images at the export
size. Only the network's convolutions and fully-connected layers are quantized - the ONNX nodes
that come from an ``nn.Conv*d`` / ``nn.Linear`` module - and never the output layers (class
logits, box deltas, centerness, SSD predictors, mask/keypoint logits), which the autograd graph
of the training loss names (:func:`surgery.pruning.graph.output_layers`): 8-bit score and box outputs are
known to wreck detections. Decoding, NMS and RoIAlign are not Conv/MatMul/Gemm and stay float.

ONNX nodes are mapped to modules through the TorchScript exporter's scope names
(``/head/classification_head/conv/conv.0_2/Conv``: the third call of ``head.classification_head.conv.0``).

After a quantization-aware fine-tune (:mod:`surgery.training.qat`) the activation ranges observed during
training replace the calibrated ones (ORT's ``TensorQuantOverrides``), so the INT8 file uses the
ranges the weights were trained for.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import dataset_for
from ..errors import SurgeryError, require_extra
from ..measure.split import onnx_scopes, onnx_split_ms
from ..pruning.graph import output_layers
from ..pruning.masked import fold_masks
from ..storage.atomic import atomic_path
from ..storage.checkpoint import load_checkpoint
from ..training.qat import qat_ranges
from .export import METADATA_PREFIX, ExportError, checkpoint_metadata, export_onnx
from .runtime import OnnxDetector, fit_image

# Quantized operator types: the network's convolutions and matmuls; everything else stays float.
QUANT_OPS = ("Conv", "MatMul", "Gemm")
MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# INT8 forms: ONNX Runtime's two formats x weight granularity. QDQ keeps float Conv nodes between
# QuantizeLinear/DequantizeLinear pairs (ORT fuses them into int8 kernels, Conv+Relu included, when
# it loads the file); QOperator writes QLinearConv nodes (Relu folded in by the quantizer) with
# explicit QuantizeLinear/DequantizeLinear only at the float boundaries. Which is faster depends on
# the model's widths and the CPU, so "auto" measures them (choose_form).
FORMS: tuple[str, ...] = ("qdq-per-channel", "qdq-per-tensor", "qoperator-per-channel", "qoperator-per-tensor")
AGREEMENT_SLACK = 0.02  # a form may match at most this fraction fewer float detections than the best


class QuantizeError(SurgeryError):
    """A model cannot be quantized (it does not export, or has nothing ONNX Runtime can quantize)."""


@dataclass
class Agreement:
    """How closely INT8 detections follow the float model's on the same images: a float detection
    with score >= ``score_thresh`` is *matched* when an INT8 detection of the same label overlaps
    it with IoU >= ``iou_thresh`` and its score is within ``score_tol``."""

    images: int
    float_detections: int  # above score_thresh
    matched: int
    mean_iou: float  # best same-label IoU per float detection
    mean_score_diff: float  # over detections with a same-label overlap >= 0.5
    max_score_diff: float
    int8_detections: int = 0  # above score_thresh
    score_thresh: float = 0.3
    iou_thresh: float = 0.9
    score_tol: float = 0.05

    @property
    def fraction(self) -> float:
        return self.matched / self.float_detections if self.float_detections else 1.0


@dataclass
class QuantizeResult:
    path: Path
    input_size: int
    calib_images: int
    quantized_nodes: int  # Conv/MatMul/Gemm nodes with INT8 weights
    float_nodes: list[str]  # Conv/MatMul/Gemm nodes left in float (output layers, unmapped nodes)
    excluded_layers: list[str]  # modules kept in float (the output layers)
    float_bytes: int
    int8_bytes: int
    activation_type: str
    weight_type: str
    reduce_range: bool
    ranges: str  # "calibration" or "qat" (activation ranges observed while training)
    float_path: Path | None = None  # kept float export, if asked
    agreement: Agreement | None = None
    form: str = "qdq-per-channel"  # one of FORMS
    form_ms: dict[str, float] = field(default_factory=dict)  # "auto": kernel ms per image of every form measured
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# ONNX nodes <-> modules


def node_module(node_name: str, modules: set[str] | dict[str, Any]) -> str | None:
    """The module a TorchScript-exported node comes from, or ``None``.

    The exporter names a node ``/scope/.../OpType``; each scope component names a module that ran
    ``forward``, relative to an enclosing scope (``/backbone/body/layer1/layer1.0/conv1/Conv`` ->
    ``backbone.body.layer1.0.conv1``), with ``_N`` appended for its N-th extra call (shared heads run
    once per pyramid level). Each candidate is checked against the model's module names.
    """
    path: list[str] = []
    comps = node_name.strip("/").split("/")[:-1]
    if comps and comps[0] == "model" and "model" not in modules:
        comps = comps[1:]  # surgery.deployment.export's output-ordering wrapper holds the detector as ``model``
    for comp in comps:
        names = [comp] + ([re.sub(r"_\d+$", "", comp)] if re.search(r"_\d+$", comp) else [])
        resolved = None
        for name in names:
            segs = name.split(".")
            for k in range(min(len(segs) - 1, len(path)), -1, -1):  # longest overlap with the path first
                if k and path[-k:] != segs[:k]:
                    continue
                if ".".join(path + segs[k:]) in modules:
                    resolved = path + segs[k:]
                    break
            if resolved is not None:
                break
        if resolved is None:
            return None
        path = resolved
    return ".".join(path) or None


def layer_nodes(graph: Any, model: nn.Module) -> dict[str, str]:
    """``{onnx node name: module name}`` for the Conv/MatMul/Gemm nodes that come from a
    convolution or linear module of ``model``."""
    modules = {n: m for n, m in model.named_modules() if n}
    out: dict[str, str] = {}
    for node in graph.node:
        if node.op_type in QUANT_OPS:
            name = node_module(node.name, modules)
            if name is not None and isinstance(modules[name], MODULE_TYPES):
                out[node.name] = name
    return out


def constants_to_initializers(proto: Any) -> int:
    """Turn ``Constant`` nodes, and ``Identity`` nodes of an initializer, that feed a quantized
    operator into initializers (in place); returns how many. The TorchScript exporter writes some
    folded biases as Constant nodes and shared weights (FCOS/RetinaNet heads, run once per level)
    as Identity copies of one initializer, and ONNX Runtime's QOperator quantizer looks weights
    and biases up among the initializers only (``'NoneType' object has no attribute 'data_type'``)."""
    from onnx import numpy_helper

    feeds = {i for n in proto.graph.node if n.op_type in QUANT_OPS for i in n.input}
    inits = {i.name: i for i in proto.graph.initializer}
    moved = []
    for node in proto.graph.node:
        if node.output[0] not in feeds:
            continue
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
        elif node.op_type == "Identity" and node.input[0] in inits:
            value = inits[node.input[0]]
        else:
            continue
        if value is None:
            continue
        init = numpy_helper.from_array(numpy_helper.to_array(value), node.output[0])
        proto.graph.initializer.append(init)
        moved.append(node)
    for node in moved:
        proto.graph.node.remove(node)
    return len(moved)


def quantized_weight_nodes(graph: Any) -> list[str]:
    """Names of the Conv/MatMul/Gemm nodes whose weight is INT8: QDQ form, a float node reading a
    DequantizeLinear output; QOperator form, a QLinearConv / QLinearMatMul / QGemm node (named
    after the float node, ``_quant`` appended by ONNX Runtime's quantizer)."""
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    qdq = [n.name for n in graph.node if n.op_type in QUANT_OPS and len(n.input) > 1 and n.input[1] in dq]
    qop = [n.name.removesuffix("_quant") for n in graph.node if n.op_type in ("QLinearConv", "QLinearMatMul", "QGemm")]
    return qdq + qop


# --------------------------------------------------------------------------------------------
# comparing an INT8 file with its float export (both run by :class:`surgery.deployment.runtime.OnnxDetector`)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = (box[2:] - box[:2]).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    return inter / np.maximum(area + areas - inter, 1e-9)


def compare_detections(
    reference: OnnxDetector,
    candidate: OnnxDetector,
    images: Sequence[torch.Tensor],
    *,
    score_thresh: float = 0.3,
    iou_thresh: float = 0.9,
    score_tol: float = 0.05,
    top_k: int | None = None,
) -> Agreement:
    """Match ``candidate``'s detections to ``reference``'s on the same images (see :class:`Agreement`);
    ``top_k``: only the reference's ``k`` best detections per image are checked."""
    total = matched = n_cand = 0
    ious: list[float] = []
    diffs: list[float] = []
    for image in images:
        x = fit_image(image, reference.size)
        ref, got = reference.run(x), candidate.run(x)
        n_cand += int((got["scores"] >= score_thresh).sum())
        order = np.argsort(-ref["scores"], kind="stable")[:top_k]
        for box, score, label in zip(ref["boxes"][order], ref["scores"][order], ref["labels"][order], strict=True):
            if score < score_thresh:
                continue
            total += 1
            same = got["labels"] == label
            if not same.any():
                ious.append(0.0)
                continue
            overlap = np.where(same, _iou(box, got["boxes"]), 0.0)
            j = int(np.argmax(overlap))
            diff = abs(float(got["scores"][j]) - float(score))
            ious.append(float(overlap[j]))
            if overlap[j] >= 0.5:
                diffs.append(diff)
            matched += int(overlap[j] >= iou_thresh and diff <= score_tol)
    return Agreement(
        images=len(images), float_detections=total, matched=matched,
        mean_iou=float(np.mean(ious)) if ious else 1.0, mean_score_diff=float(np.mean(diffs)) if diffs else 0.0,
        max_score_diff=float(np.max(diffs)) if diffs else 0.0, int8_detections=n_cand,
        score_thresh=score_thresh, iou_thresh=iou_thresh, score_tol=score_tol,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# quantization


class _Reader:
    """ORT's ``CalibrationDataReader`` protocol over a list of images."""

    def __init__(self, name: str, images: Sequence[np.ndarray]) -> None:
        self._it = iter([{name: im} for im in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - ORT only calls it for some calibrators
        pass


@contextlib.contextmanager
def _ort_warnings_off() -> Any:
    """ORT's quantizer logs advice through the root logger (e.g. to run its shape pre-processing,
    which the detector's graph does not need); the library never prints."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _range_overrides(graph: Any, mapped: dict[str, str], chosen: Sequence[str],
                     ranges: dict[str, tuple[float, float]]) -> dict[str, list[dict[str, Any]]]:
    """ORT ``TensorQuantOverrides`` from QAT ranges (``{module name: (min, max)}`` of each layer's
    input): per input tensor, the union over the quantized layers reading it."""
    bounds: dict[str, tuple[float, float]] = {}
    for node in graph.node:
        r = ranges.get(mapped.get(node.name, ""))
        if node.name in chosen and r is not None:
            lo, hi = bounds.get(node.input[0], r)
            bounds[node.input[0]] = (min(lo, r[0], 0.0), max(hi, r[1], 0.0))
    # ORT wants numpy scalars of the tensor's type here
    return {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for t, (lo, hi) in bounds.items()}


def _finish_int8(tmp: Path, float_path: Path, own: dict[str, str]) -> list[str]:
    """The quantizer's output at ``tmp`` made loadable and self-describing: inferred shapes dropped,
    the float file's ``surgery.*`` metadata carried over with ``own`` on top. Returns the quantized
    weight nodes."""
    import onnx  # optional extra (export): quantization needs it

    qmodel = onnx.load(str(tmp))
    # quantize_static leaves the shapes it inferred in value_info; with them ORT's graph
    # optimizer folds the detector's box reshapes into static ones that fail on an empty level
    # ("cannot reshape {0,2,2} to {0,-1}") on every image. The float export has no value_info.
    del qmodel.graph.value_info[:]
    _carry_metadata(onnx.load(str(float_path)).metadata_props, qmodel, own)
    onnx.save(qmodel, str(tmp))
    return quantized_weight_nodes(qmodel.graph)


def quantize_onnx(
    float_path: str | Path,
    out: str | Path,
    model: nn.Module,
    calib_images: Sequence[torch.Tensor],
    *,
    input_size: int,
    exclude: Sequence[str] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
    reduce_range: bool = False,
    form: str = "qdq-per-channel",
) -> QuantizeResult:
    """Write an INT8 copy (``form``: one of :data:`FORMS`) of the float export ``float_path`` (of ``model``) to ``out``, atomically.

    ``calib_images`` (``3 x H x W`` in [0, 1], resized to ``input_size``) calibrate the activation
    ranges; ``ranges`` (``{module name: (min, max)}`` of each layer's input, from QAT) override them.
    ``exclude``: modules kept in float (default: the model's output layers). The INT8 file keeps
    the float file's ``surgery.*`` metadata (model, classes, params, MACs) and adds its own
    (``precision``, ``calibration``, ``activations``, ``weights``, ``float_source``).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if form not in FORMS:
        raise QuantizeError(f"unknown INT8 form {form!r}: choose one of {', '.join(FORMS)} or auto")
    t0 = time.perf_counter()
    float_path = Path(float_path)
    proto = onnx.load(str(float_path))
    graph = proto.graph
    mapped = layer_nodes(graph, model)
    excluded = list(exclude) if exclude is not None else output_layers(model)
    chosen = [n for n, m in mapped.items() if m not in excluded]
    if not chosen:
        raise QuantizeError(
            f"{type(model).__name__}: no convolution or linear layer outside the output layers was found in the "
            "ONNX graph, nothing to quantize"
        )
    extra: dict[str, Any] = {"TensorQuantOverrides": _range_overrides(graph, mapped, chosen, ranges)} if ranges else {}
    images = [fit_image(im, input_size).numpy().astype(np.float32) for im in calib_images]
    name = graph.input[0].name
    with atomic_path(out) as tmp, _ort_warnings_off():
        source = tmp.with_name(tmp.name + ".float.onnx")
        constants_to_initializers(proto)
        onnx.save(proto, str(source))
        try:
            # U8S8 (uint8 activations, int8 weights): on this AVX2 CPU without VNNI, measured on the
            # dense quickstart FCOS at 128 px (2 threads, interleaved): U8S8 8.6 ms, U8S8 + reduce_range
            # 8.7 ms, U8U8 10.9 ms, S8S8 14.6 ms, FP32 13.1 ms; 224/225 detections matched for U8S8,
            # 221 with reduce_range, 225 for U8U8. ORT's docs recommend reduce_range (7-bit weights) for
            # U8S8 on non-VNNI x86 to avoid saturation in VPMADDUBSW's int16 pair sums; it cost accuracy
            # and no speed here, so it is an option (--reduce-range), not the default.
            quantize_static(
                str(source), str(tmp), _Reader(name, images),
                quant_format=QuantFormat.QDQ if form.startswith("qdq") else QuantFormat.QOperator,
                op_types_to_quantize=list(QUANT_OPS), nodes_to_quantize=chosen, per_channel=form.endswith("per-channel"),
                reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - ORT raises many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QuantizeError(f"onnxruntime cannot quantize {float_path.name} ({form}): {first}") from e
        finally:
            source.unlink(missing_ok=True)
        quantized = _finish_int8(tmp, float_path, {
            "precision": "int8",
            "calibration": f"qat ranges of {len(ranges)} layers" if ranges else f"minmax on {len(images)} training images",
            "activations": "uint8 per-tensor",
            "weights": f"int8 {'per-channel' if form.endswith('per-channel') else 'per-tensor'}"
                       f"{' (reduce_range)' if reduce_range else ''}, {'QDQ' if form.startswith('qdq') else 'QOperator'}",
            "float_source": float_path.name,
            "input_size": str(input_size),
        })
        int8_bytes = tmp.stat().st_size
    floats = [n.name for n in graph.node if n.op_type in QUANT_OPS and n.name not in set(quantized)]
    return QuantizeResult(
        path=Path(out), input_size=input_size, calib_images=len(images), quantized_nodes=len(quantized),
        float_nodes=floats, excluded_layers=excluded, float_bytes=float_path.stat().st_size, int8_bytes=int8_bytes,
        activation_type="uint8", weight_type="int8", reduce_range=reduce_range,
        ranges="qat" if ranges else "calibration", seconds=time.perf_counter() - t0, form=form,
    )  # fmt: skip


def choose_form(
    float_path: str | Path,
    model: nn.Module,
    calib_images: Sequence[torch.Tensor],
    *,
    input_size: int,
    verify_images: Sequence[torch.Tensor] = (),
    candidates: Sequence[str] = FORMS,
    ranges: dict[str, tuple[float, float]] | None = None,
    reduce_range: bool = False,
    threads: int | None = 2,
    rounds: int = 3,
    runs: int = 10,
) -> tuple[str, dict[str, float], dict[str, float]]:
    """The fastest INT8 form of ``candidates`` for this model on this machine: each is written,
    timed in ONNX Runtime (profiled kernel time of the whole file on calibration images, the
    forms interleaved over ``rounds`` passes, medians: robust to a busy machine), and with
    ``verify_images`` forms matching more than :data:`AGREEMENT_SLACK` fewer float detections
    than the best one are left out. Returns ``(form, kernel ms per form, agreement per form)``."""
    import statistics


    feeds = [{"image": fit_image(im, input_size).numpy().astype(np.float32)} for im in list(calib_images)[:2]]
    with tempfile.TemporaryDirectory(prefix="surgery-int8-forms-") as tmp:
        paths: dict[str, Path] = {}
        for form in candidates:
            path = Path(tmp) / f"{form}.onnx"
            try:
                quantize_onnx(float_path, path, model, calib_images, input_size=input_size, ranges=ranges,
                              reduce_range=reduce_range, form=form)
            except QuantizeError:
                continue  # a form ORT cannot write for this graph is not a candidate
            paths[form] = path
        if not paths:
            raise QuantizeError("no INT8 form could be written for this model")
        samples: dict[str, list[float]] = {f: [] for f in paths}
        scopes = onnx_scopes(model)
        for _ in range(rounds):
            for form, path in paths.items():
                split = onnx_split_ms(path, feeds, scopes, threads=threads, warmup=1, runs=runs)
                # all kernels: QOperator moves Q/DQ work to the float boundaries, which the
                # network/pipeline split would count on the other side
                samples[form].append(split.network_ms + split.pipeline_ms)
        ms = {f: statistics.median(v) for f, v in samples.items()}
        agree: dict[str, float] = {}
        if verify_images:
            ref = OnnxDetector(float_path, threads)
            agree = {f: compare_detections(ref, OnnxDetector(p, threads), verify_images).fraction for f, p in paths.items()}
    best_agree = max(agree.values()) if agree else 1.0
    eligible = [f for f in ms if not agree or agree[f] >= best_agree - AGREEMENT_SLACK]
    return min(eligible, key=lambda f: ms[f]), ms, agree


def _carry_metadata(float_props: Any, qmodel: Any, own: dict[str, str]) -> None:
    """The float file's ``metadata_props`` (what ``bench``/``info``/``predict`` read: model, class
    names, params, MACs) onto the quantized model, with ``surgery.<key>`` entries of ``own`` on top:
    onnxruntime's quantizer writes only its own ``onnx.infer`` entry."""

    props = {p.key: p.value for p in qmodel.metadata_props}
    props.update({p.key: p.value for p in float_props})
    props.update({METADATA_PREFIX + k: v for k, v in own.items()})
    del qmodel.metadata_props[:]
    for k, v in props.items():
        entry = qmodel.metadata_props.add()
        entry.key, entry.value = k, v


def export_size(model: nn.Module) -> int:
    """The square input size a checkpoint is exported at by default: its transform's ``min_size``."""
    min_size = getattr(getattr(model, "transform", None), "min_size", None)
    if isinstance(min_size, (list, tuple)) and min_size:
        return int(max(min_size))
    if isinstance(min_size, int):
        return min_size
    raise QuantizeError(f"{type(model).__name__} has no transform.min_size: pass --input-size")


def dataset_images(data: Any, split: str, count: int, *, source: str | None = None) -> list[torch.Tensor]:
    """The first ``count`` images of ``split`` of a recipe's data section, without augmentation."""
    ds = dataset_for(data, split, train=False, source=source)
    return [ds.load_image(i) for i in range(min(count, len(ds)))]


def quantize_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    *,
    calib_batches: int = 8,
    batch_size: int = 8,
    input_size: int | None = None,
    keep_float: str | Path | None = None,
    verify_images: int = 8,
    data: str | None = None,
    reduce_range: bool = False,
    trust_code: bool | None = None,
    threads: int | None = None,
    form: str = "auto",
) -> QuantizeResult:
    """Export a surgery checkpoint (dense, structured or masked: masks are folded first) to ONNX,
    quantize it to INT8 calibrated on ``calib_batches x batch_size`` training images of the
    checkpoint's dataset (``data`` overrides its source), and compare INT8 with float detections
    on ``verify_images`` validation images. A QAT checkpoint (:mod:`surgery.training.qat`) gives its
    trained activation ranges instead of calibrated ones. ``keep_float`` also writes the float export.
    ``form``: one of :data:`FORMS`, or ``auto`` to measure them all and keep the fastest
    (:func:`choose_form`; the timings are in ``form_ms`` and the notes)."""
    require_extra(("onnx", "onnxruntime"), "export", "INT8 quantization")
    if calib_batches < 1 or batch_size < 1:
        raise QuantizeError(f"--calib-batches and --batch-size must be >= 1, got {calib_batches} and {batch_size}")
    t0 = time.perf_counter()
    model, ckpt = load_checkpoint(ckpt_path, trust_code=trust_code)
    if ckpt.masks:
        fold_masks(model, ckpt.masks)
    model.eval()
    size = input_size or export_size(model)
    recipe_data = (ckpt.recipe or {}).get("data")
    calib = dataset_images(recipe_data, "train", calib_batches * batch_size, source=data)
    ranges = qat_ranges(ckpt)
    with tempfile.TemporaryDirectory(prefix="surgery-quantize-") as tmpdir:
        float_path = Path(keep_float) if keep_float is not None else Path(tmpdir) / "float.onnx"
        try:
            export_onnx(model, float_path, size, verify=False, metadata=checkpoint_metadata(model, ckpt, size))
        except ExportError as e:
            raise QuantizeError(f"cannot quantize {ckpt.spec.name}: {e}") from e
        images = dataset_images(recipe_data, "val", verify_images, source=data) if verify_images > 0 else []
        form_ms: dict[str, float] = {}
        if form == "auto":
            form, form_ms, agree = choose_form(float_path, model, calib, input_size=size, verify_images=images[:4],
                                               ranges=ranges, reduce_range=reduce_range,
                                               threads=threads if threads is not None else 2)
        result = quantize_onnx(float_path, out, model, calib, input_size=size, ranges=ranges, reduce_range=reduce_range,
                               form=form)
        result.form_ms = form_ms
        if form_ms:
            timings = ", ".join(f"{f} {v:.2f} ms" for f, v in sorted(form_ms.items(), key=lambda kv: kv[1]))
            result.notes.append(f"INT8 form {form} (fastest measured here, kernel time per image: {timings})")
        if images:
            result.agreement = compare_detections(
                OnnxDetector(float_path, threads), OnnxDetector(result.path, threads), images
            )
    result.float_path = Path(keep_float) if keep_float is not None else None
    result.seconds = time.perf_counter() - t0
    if ranges:
        result.notes.append(f"activation ranges of {len(ranges)} layers from quantization-aware training")
    return result


__all__ = [
    "FORMS", "Agreement", "QuantizeError", "QuantizeResult", "choose_form", "compare_detections", "constants_to_initializers", "dataset_images",
    "export_size", "layer_nodes", "node_module", "quantize_checkpoint", "quantize_onnx", "quantized_weight_nodes",
]  # fmt: skip
