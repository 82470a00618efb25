"""ONNX export of torchvision detectors (pruned ones too: they are ordinary modules with thinner
layers), verified against PyTorch with onnxruntime.

The graph is traced for one ``3 x S x S`` image, the model's own pre-processing (normalisation,
resize to ``min_size``) and post-processing (box decoding, NMS, top-k) included, so the ONNX model
takes one float image ``image: [3, H, W]`` in [0, 1] and returns the detections of that image in
one documented order for every family (:data:`OUTPUT_ORDER`): ``boxes [N, 4]`` (x1, y1, x2, y2 in
input pixels), ``scores [N]``, ``labels [N]`` (int64), then ``masks`` / ``keypoints`` /
``keypoints_scores`` where the model has them (torchvision itself returns two-stage outputs as
boxes, labels, scores). The input is ``[3, S, S]`` (S: the traced size) unless ``dynamic_size``
asks for dynamic ``H`` and ``W`` (the graph contains the model's own resize, as in torchvision's
ONNX tests). Dynamic files match PyTorch only approximately at other sizes: ONNX ``Resize`` maps
coordinates with the computed scale, torch's ``interpolate(recompute_scale_factor=True)`` with the
rounded output size, a sub-pixel resampling difference (scores within ~2e-3 on the quickstart
model); they are verified exactly at ``S`` and within :data:`DYNAMIC_TOL` at another size. One image per
call: the number of detections differs per image, so a batch dimension would need padding that
no family's post-processing does; the network-only part is timed batched by ``surgery bench``.
Metadata (``surgery.*`` keys in ``metadata_props``) records the model, kind, ratio, parameters,
MACs and class names, so ``surgery bench``/``eval``/``predict`` can take the file itself.

The TorchScript-based exporter (``dynamo=False``) is used first: it needs nothing beyond torch and
handles torchvision's detection models, which have ONNX-specific code paths for it. The dynamo
exporter is the fallback (it needs ``onnxscript``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..detectors.postprocess import fast_postprocess
from ..errors import MeasureError, SurgeryError, require_extra
from ..measure import configured_detections, count_macs, count_params
from ..measure.split import onnx_scopes
from ..storage.atomic import atomic_path
from .onnx_io import (
    METADATA_PREFIX,
    check_metadata,
    onnx_parameter_count,
    output_names,
    read_metadata,
    run_onnx,
    write_metadata,
)

__all__ = ["METADATA_PREFIX", "ExportError", "ExportResult", "check_metadata", "checkpoint_metadata", "export_onnx",
           "onnx_parameter_count", "read_metadata", "run_onnx", "write_metadata"]

OUTPUT_ORDER: tuple[str, ...] = ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores")
FAST_NOTE = ("post-processing: vectorised (one top-k per level, one class-aware NMS capped at the "
             "detection count; surgery.detectors.postprocess), verified against torchvision's own")
DYNAMIC_TOL = (1e-2, 1e-2)  # (atol, rtol) at a size other than the traced one: see the module docstring


class ExportError(SurgeryError):
    """A model cannot be exported to ONNX, or the exported model does not match PyTorch."""


@dataclass
class ExportResult:
    path: Path
    input_size: int
    opset: int
    exporter: str  # "torchscript" or "dynamo"
    output_names: list[str]
    file_bytes: int
    export_s: float
    verified: bool | None = None  # None: not verified
    num_detections: int | None = None  # on the verification image
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # per output, matched detections
    ambiguous: int = 0  # detections tied at the score cut-off, which either side may keep
    dynamic_size: bool = False  # H and W are dynamic axes (verified at a second size)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _image(size: int, seed: int) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def _output_names(out: Any) -> list[str]:
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], dict):
        keys = list(out[0].keys())
        return [k for k in OUTPUT_ORDER if k in keys] + [k for k in keys if k not in OUTPUT_ORDER]
    if isinstance(out, (list, tuple)) and len(out) == 2 and isinstance(out[1], (list, tuple)):
        return _output_names(out[1])  # scripted torchvision models return (losses, detections)
    return []


class _Ordered(nn.Module):
    """One image in, the detections as a tuple in :data:`OUTPUT_ORDER` out (torchvision returns a
    list of dicts whose key order differs between one- and two-stage families)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model([image])
        if isinstance(out, tuple):  # scripted torchvision models return (losses, detections)
            out = out[1]
        return tuple(out[0][k] for k in self.names)


def _export(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, names: list[str], dynamo: bool, dynamic: bool = True,
    vectorized: bool = True,
) -> bool:
    """Write the file; returns whether the vectorised post-processing (:mod:`surgery.detectors.postprocess`)
    went into it (not with dynamic sizes: which levels need a top-k is decided at the traced size)."""
    kwargs: dict[str, Any] = {"opset_version": opset, "input_names": ["image"], "do_constant_folding": True}
    target: nn.Module = model
    if names:
        kwargs["output_names"] = names
        target = _Ordered(model, names).eval()
        axes: dict[str, dict[int, str]] = {k: {0: "detections"} for k in names}
        if dynamic:
            axes["image"] = {1: "height", 2: "width"}
        kwargs["dynamic_axes"] = axes
    with _quiet(), torch.no_grad(), fast_postprocess(model, enabled=vectorized and bool(names) and not dynamic) as fast, \
            no_identity_resize(model, tuple(example.shape[-2:]), enabled=not dynamic):
        torch.onnx.export(target, (example,) if names else ([example],), str(path), dynamo=dynamo, **kwargs)
    if names:
        _outputs_named_first(path, _network_scopes(model))
    return fast


@contextlib.contextmanager
def no_identity_resize(model: nn.Module, size: tuple[int, int], enabled: bool = True) -> Iterator[int]:
    """Inside the block, each of ``model``'s pre-processing transforms (torchvision's
    ``GeneralizedRCNNTransform``) that would resize an image of ``size`` to that same size passes
    it through instead, and its post-processing leaves the boxes as they are (torchvision scales
    them back by a ratio of 1, an exact copy traced as a split, four multiplications and a stack);
    yields how many were bypassed (restored after).

    A static-size export traced at the model's own ``min_size`` (the quickstart FCOS at 128 px)
    otherwise keeps a bilinear ``Resize`` at scale 1, which copies the image exactly but is not
    free: in OpenVINO a layout reorder and the resize itself, 0.2-0.9 ms of the 25%-MACs
    quickstart FCOS's ~6 ms, a cost the cut does not shrink (docs/benchmarks/runtimes.md). The
    check runs the transform's own ``resize`` once, eagerly, on a blank image of ``size``: other
    sizes, and dynamic-size exports (``enabled=False``), keep the resize."""
    bypassed = []
    if enabled:
        for mod in model.modules():
            resize = getattr(mod, "resize", None)
            if type(mod).__name__ != "GeneralizedRCNNTransform" or not callable(resize) or mod.training:
                continue
            with torch.no_grad():
                out, _ = resize(torch.zeros(3, *size))
            if tuple(out.shape[-2:]) == tuple(size):
                bypassed.append(mod)
    for mod in bypassed:
        mod.resize = _unresized
        mod.postprocess = types.MethodType(_boxes_unscaled, mod)
    try:
        yield len(bypassed)
    finally:
        for mod in bypassed:
            del mod.resize
            del mod.postprocess


def _unresized(image: torch.Tensor, target: Any = None) -> tuple[torch.Tensor, Any]:
    return image, target


def _boxes_unscaled(self: nn.Module, result: list[dict[str, torch.Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """The transform's ``postprocess`` where nothing was resized: boxes kept as they are (masks and
    keypoints, and any image whose size changed, go through torchvision's own)."""
    same = all(tuple(a) == tuple(b) for a, b in zip(image_shapes, original_image_sizes))
    if same and not any("masks" in r or "keypoints" in r for r in result):
        return result
    return type(self).postprocess(self, result, image_shapes, original_image_sizes)


def _network_scopes(model: nn.Module) -> tuple[str, ...]:
    try:
        return onnx_scopes(model)
    except MeasureError:  # a model without network modules: every tensor is post-processing's
        return ()


POST_PREFIX = "~"  # sorts after every letter: see _outputs_named_first


def _outputs_named_first(path: Path, scopes: tuple[str, ...]) -> None:
    """Keep ``boxes`` / ``scores`` / ``labels`` the first name of each output in OpenVINO.

    OpenVINO's graph optimisations fold ops such as the Concat that assembles ``boxes`` and merge
    the folded input's tensor name into the output's names; ``get_any_name()`` returns the first
    in sorted order, which was ``/model/Gather_30_output_0`` for the quickstart FCOS. The
    post-processing's intermediate tensors (produced by nodes outside the network ``scopes``) are
    renamed with :data:`POST_PREFIX`, which sorts after the output names. Network tensors keep
    their names: ONNX Runtime's layout pass names a convolution after its output tensor, and the
    network/pipeline split of :mod:`surgery.measure.split` reads node names by scope."""
    import onnx  # optional extra (export), required by the caller

    proto = onnx.load(str(path))
    graph = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return  # a Loop / If body may name outer tensors implicitly: left as exported
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    renamed = {}
    for node in graph.node:
        if node.name.startswith(scopes) and scopes:
            continue
        for k, out in enumerate(node.output):
            if out and out not in keep:
                renamed[out] = node.output[k] = POST_PREFIX + out
    if not renamed:
        return
    for node in graph.node:
        for k, inp in enumerate(node.input):
            if inp in renamed:
                node.input[k] = renamed[inp]
    for info in graph.value_info:
        if info.name in renamed:
            info.name = renamed[info.name]
    onnx.save(proto, str(path))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: int,
    opset: int = 17,
    *,
    verify: bool = True,
    atol: float = 1e-3,
    rtol: float = 1e-4,
    metadata: dict[str, str] | None = None,
    dynamic_size: bool = False,
    vectorized_postprocess: bool = True,
) -> ExportResult:
    """Export a detector to ONNX (traced on a ``3 x input_size x input_size`` image); write atomically.

    With ``verify`` the ONNX model runs in onnxruntime on a random image *different from the traced
    one* (so sizes or detections frozen into the graph are caught) and its detections are matched to
    PyTorch's eval output: the same number of detections, and each PyTorch detection has an ONNX one
    with the same label and box/score within ``atol + rtol*|value|`` (order may differ where scores
    tie). Detections tied with the lowest kept score may legitimately differ (which of several equal
    scores survives top-k / NMS is implementation-defined); they are counted in ``ambiguous``.
    A mismatch raises :class:`ExportError`. With ``dynamic_size`` the height and width are dynamic
    axes, and (with ``verify``) the file must also match on a non-square image of another size
    within :data:`DYNAMIC_TOL`. ``metadata`` goes into the file's ``metadata_props``.
    ``vectorized_postprocess``: FCOS / RetinaNet / SSD get :mod:`surgery.detectors.postprocess`'s
    post-processing (same detections, far fewer nodes; verified against torchvision's own);
    ``False`` traces torchvision's loops as they are.
    """
    require_extra(("onnx", "onnxruntime"), "export", "ONNX export")
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    example = _image(input_size, seed=0)
    try:
        with _quiet(), torch.no_grad():
            names = _output_names(model([example]))
    except Exception as e:
        raise ExportError(f"{type(model).__name__} does not run on a {input_size}px image: {e}") from e
    notes: list[str] = []
    t0 = time.perf_counter()
    with atomic_path(path) as tmp:
        dynamic = bool(dynamic_size and names)
        exporter = _export_either(model, example, tmp, opset, names, notes, dynamic=dynamic,
                                  vectorized=vectorized_postprocess)
        result = ExportResult(
            path=path,
            input_size=input_size,
            opset=opset,
            exporter=exporter,
            output_names=names,
            file_bytes=0,
            export_s=time.perf_counter() - t0,
            dynamic_size=dynamic,
            notes=notes,
        )
        if verify and dynamic:
            _verify_at_other_size(model, tmp, input_size, result)
        if verify:
            _verify(model, tmp, _image(input_size, seed=1), result, atol, rtol)
            if result.verified is None and result.num_detections == 0:
                _verify_without_threshold(model, example, tmp.with_suffix(".verify.onnx"), opset, result, atol, rtol)
        if metadata:
            result.metadata = write_metadata(tmp, metadata)
        result.file_bytes = tmp.stat().st_size
    return result


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _export_either(
    model: nn.Module, example: torch.Tensor, tmp: Path, opset: int, names: list[str], notes: list[str], dynamic: bool,
    vectorized: bool = True,
) -> str:
    """Export with the TorchScript exporter, falling back to dynamo; returns which one worked."""
    try:
        if _export(model, example, tmp, opset, names, dynamo=False, dynamic=dynamic, vectorized=vectorized):
            notes.append(FAST_NOTE)
        return "torchscript"
    except Exception as e:  # noqa: BLE001 - fall back to the dynamo exporter
        first = _first_line(e)
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ExportError(
                f"cannot export {type(model).__name__} to ONNX: the TorchScript exporter failed ({first}) "
                "and the dynamo exporter needs onnxscript (pip install onnxscript)"
            ) from e
        notes.append(f"TorchScript exporter failed ({first}); used dynamo")
        try:
            if _export(model, example, tmp, opset, names, dynamo=True, dynamic=dynamic, vectorized=vectorized):
                notes.append(FAST_NOTE)
        except Exception as e2:
            raise ExportError(
                f"cannot export {type(model).__name__} to ONNX: TorchScript exporter: {first}; "
                f"dynamo exporter: {_first_line(e2)}"
            ) from e2
        return "dynamo"


def _verify_at_other_size(model: nn.Module, path: Path, size: int, result: ExportResult) -> None:
    """A dynamic-size export must also match PyTorch on a non-square image of another size."""
    h, w = max(32, (size * 3) // 4), size + 32
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(2))
    probe = ExportResult(path=path, input_size=size, opset=0, exporter="", output_names=output_names(path), file_bytes=0, export_s=0)
    try:
        _verify(model, path, image, probe, *DYNAMIC_TOL)
    except ExportError as e:
        raise ExportError(f"dynamic-size export at {h}x{w}: {e} (export without --dynamic-size instead)") from e
    result.notes.append(f"dynamic height/width: also matches PyTorch at {h}x{w} (atol/rtol {DYNAMIC_TOL[0]:g})")


def _verify_without_threshold(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, result: ExportResult, atol: float, rtol: float
) -> None:
    """The export gave no detections to compare: export a copy with score thresholds at 0 (the same
    graph but for that constant) and compare that instead."""
    relaxed = copy.deepcopy(model)
    for mod in (relaxed, getattr(relaxed, "roi_heads", None)):
        if mod is not None and isinstance(getattr(mod, "score_thresh", None), float):
            mod.score_thresh = 0.0
    try:
        _export(
            relaxed, example, path, opset, result.output_names, dynamo=result.exporter == "dynamo", dynamic=result.dynamic_size
        )
        result.notes = [n for n in result.notes if not n.startswith("no detections")]
        result.notes.append(
            "no detections above the score threshold on a random image: verified a copy exported with "
            "score_thresh=0 instead (the same graph but for that constant)"
        )
        _verify(relaxed, path, _image(result.input_size, seed=1), result, atol, rtol)
    finally:
        if path.exists():
            path.unlink()


def _verify(model: nn.Module, onnx_path: Path, image: torch.Tensor, result: ExportResult, atol: float, rtol: float) -> None:
    import numpy as np

    with _quiet(), torch.no_grad():
        ref_out = model([image])
    names = result.output_names
    if not names:
        result.verified = None
        result.notes.append("outputs are not torchvision detections: not verified")
        return
    if isinstance(ref_out, tuple):
        ref_out = ref_out[1]
    ref = {k: v.detach().cpu().numpy() for k, v in ref_out[0].items()}
    got = run_onnx(onnx_path, image)
    missing = [k for k in names if k not in got]
    if missing:
        raise ExportError(f"exported model lacks outputs {missing}")
    n_ref, n_got = len(ref["boxes"]), len(got["boxes"])
    result.num_detections = n_ref
    if n_ref != n_got:
        raise ExportError(f"ONNX model gives {n_got} detections, PyTorch {n_ref} (on the same image)")
    if n_ref == 0:
        result.verified = None
        result.notes.append("no detections on the random image: only the (empty) outputs were compared")
        return
    rs = ref["scores"].astype(np.float64)
    gs = got["scores"].astype(np.float64)
    rb = ref["boxes"].astype(np.float64)
    gb = got["boxes"].astype(np.float64)
    rl, gl = ref["labels"], got["labels"]
    low = rs.min()

    def close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.abs(a - b) <= atol + rtol * np.abs(b)

    used = np.zeros(n_got, dtype=bool)
    pairs: list[tuple[int, int]] = []
    ambiguous = 0
    bad = 0
    for i in np.argsort(-rs, kind="stable"):
        cand = np.where(~used & (gl == rl[i]) & close(gs, rs[i]))[0]
        if cand.size:
            d = np.abs(gb[cand] - rb[i]).max(axis=1)
            j = int(cand[int(np.argmin(d))])
            if close(gb[j], rb[i]).all():
                used[j] = True
                pairs.append((int(i), j))
                continue
        if abs(rs[i] - low) <= atol + rtol * abs(low):
            ambiguous += 1  # tied at the cut-off
        else:
            bad += 1
    result.ambiguous = ambiguous
    if pairs:
        ri = np.array([p[0] for p in pairs])
        gi = np.array([p[1] for p in pairs])
        for k in names:
            a, b = ref[k][ri].astype(np.float64), got[k][gi].astype(np.float64)
            result.max_abs_diff[k] = float(np.abs(a - b).max()) if a.size else 0.0
    if bad:
        tied = n_ref - len(np.unique(rs))
        hint = (
            f"; {tied + 1} of {n_ref} scores share values (an untrained or barely trained model?), and which of "
            "several tied detections NMS / top-k keeps is implementation-defined: train the model first, or "
            "write the file anyway with --no-verify"
            if tied >= n_ref // 2
            else ""
        )
        raise ExportError(
            f"ONNX output does not match PyTorch: {bad} of {n_ref} detections have no counterpart "
            f"(label, score and box within atol={atol}, rtol={rtol}){hint}; nothing was written"
        )
    if ambiguous:
        result.notes.append(
            f"{ambiguous} of {n_ref} detections are tied with the lowest kept score; which of them survive "
            "is implementation-defined, so they were not compared"
        )
    result.verified = True if pairs else None
    if not pairs:
        result.notes.append("inconclusive: every detection is tied (an untrained model?)")


def checkpoint_metadata(model: nn.Module, ckpt: Any, input_size: int) -> dict[str, str]:
    """What ``surgery bench`` / ``eval`` need to know about an exported checkpoint without it: the
    builder, kind, method and ratio, parameters, MACs at the export size, class names."""

    params, nonzero = count_params(model)
    macs = count_macs(model, input_size, detections=configured_detections(model))
    plan = ckpt.plan
    meta = {
        "model": ckpt.spec.name,
        "kind": ckpt.kind,
        "method": str(getattr(plan, "method", None) or ckpt.kind),
        "ratio": "" if getattr(plan, "ratio", None) is None else f"{plan.ratio:g}",
        "params": str(params),
        "params_nonzero": str(nonzero),
        "macs": str(macs.total),
        "input_size": str(input_size),
        "source": str(ckpt.path.name) if ckpt.path is not None else "",
        "precision": "float32",  # `surgery quantize` keeps every key and sets its own precision
    }
    detections = configured_detections(model)
    if detections is not None:
        meta["detections"] = str(detections)
    names = getattr(ckpt, "class_names", None)
    if names:
        meta["class_names"] = json.dumps(list(names))
    if ckpt.recipe:  # the data section says which (synthetic) set the model was trained on
        meta["recipe"] = json.dumps(ckpt.recipe, default=str)
    meta["num_classes"] = str(ckpt.spec.kwargs.get("num_classes", ""))
    return meta
