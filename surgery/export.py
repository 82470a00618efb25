"""ONNX export of torchvision detectors (pruned ones too: they are ordinary modules with thinner
layers), verified against PyTorch with onnxruntime.

The graph is traced for one ``3 x S x S`` image, the model's own pre-processing (normalisation,
resize to ``min_size``) and post-processing (box decoding, NMS, top-k) included, so the ONNX model
takes one float image ``[3, S, S]`` in [0, 1] at exactly that size and returns the detector's own
outputs (``boxes``, ``scores``, ``labels``, plus ``masks`` / ``keypoints`` where the model has
them) under the names PyTorch uses.

The TorchScript-based exporter (``dynamo=False``) is used first: it needs nothing beyond torch and
handles torchvision's detection models, which have ONNX-specific code paths for it. The dynamo
exporter is the fallback (it needs ``onnxscript``).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_path
from .errors import SurgeryError


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
        return list(out[0].keys())
    if isinstance(out, (list, tuple)) and len(out) == 2 and isinstance(out[1], (list, tuple)):
        return _output_names(out[1])  # scripted torchvision models return (losses, detections)
    return []


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, names: list[str], dynamo: bool) -> None:
    kwargs: dict[str, Any] = {"opset_version": opset, "input_names": ["image"], "do_constant_folding": True}
    if names:
        kwargs["output_names"] = names
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, ([example],), str(path), dynamo=dynamo, **kwargs)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: int,
    opset: int = 17,
    *,
    verify: bool = True,
    atol: float = 1e-3,
    rtol: float = 1e-4,
) -> ExportResult:
    """Export a detector to ONNX for ``3 x input_size x input_size`` images; write atomically.

    With ``verify`` the ONNX model runs in onnxruntime on a random image *different from the traced
    one* (so sizes or detections frozen into the graph are caught) and its detections are matched to
    PyTorch's eval output: the same number of detections, and each PyTorch detection has an ONNX one
    with the same label and box/score within ``atol + rtol*|value|`` (order may differ where scores
    tie). Detections tied with the lowest kept score may legitimately differ (which of several equal
    scores survives top-k / NMS is implementation-defined); they are counted in ``ambiguous``.
    A mismatch raises :class:`ExportError`.
    """
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
        exporter = "torchscript"
        try:
            _export(model, example, tmp, opset, names, dynamo=False)
        except Exception as e:  # noqa: BLE001 - fall back to the dynamo exporter
            first = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise ExportError(
                    f"cannot export {type(model).__name__} to ONNX: the TorchScript exporter failed ({first}) "
                    "and the dynamo exporter needs onnxscript (pip install onnxscript)"
                ) from e
            notes.append(f"TorchScript exporter failed ({first}); used dynamo")
            exporter = "dynamo"
            try:
                _export(model, example, tmp, opset, names, dynamo=True)
            except Exception as e2:
                raise ExportError(
                    f"cannot export {type(model).__name__} to ONNX: TorchScript exporter: {first}; "
                    f"dynamo exporter: {type(e2).__name__}: {str(e2).strip().splitlines()[0] if str(e2).strip() else ''}"
                ) from e2
        export_s = time.perf_counter() - t0
        result = ExportResult(
            path=path,
            input_size=input_size,
            opset=opset,
            exporter=exporter,
            output_names=names,
            file_bytes=tmp.stat().st_size,
            export_s=export_s,
            notes=notes,
        )
        if verify:
            _verify(model, tmp, input_size, result, atol, rtol)
            if result.verified is None and result.num_detections == 0:
                _verify_without_threshold(model, example, tmp.with_suffix(".verify.onnx"), opset, result, atol, rtol)
    return result


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
        _export(relaxed, example, path, opset, result.output_names, dynamo=result.exporter == "dynamo")
        result.notes = [n for n in result.notes if not n.startswith("no detections")]
        result.notes.append(
            "no detections above the score threshold on a random image: verified a copy exported with "
            "score_thresh=0 instead (the same graph but for that constant)"
        )
        _verify(relaxed, path, result.input_size, result, atol, rtol)
    finally:
        if path.exists():
            path.unlink()


def run_onnx(path: str | Path, image: torch.Tensor) -> dict[str, Any]:
    """Run an exported detector in onnxruntime (CPU) on one ``3 x S x S`` image."""
    from .runtime import ort_session

    sess = ort_session(path)
    feed = {sess.get_inputs()[0].name: image.detach().cpu().numpy()}
    outs = sess.run(None, feed)
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}


def _verify(model: nn.Module, onnx_path: Path, size: int, result: ExportResult, atol: float, rtol: float) -> None:
    import numpy as np

    image = _image(size, seed=1)
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
        raise ExportError(
            f"ONNX output does not match PyTorch: {bad} of {n_ref} detections have no counterpart "
            f"(label, score and box within atol={atol}, rtol={rtol})"
        )
    if ambiguous:
        result.notes.append(
            f"{ambiguous} of {n_ref} detections are tied with the lowest kept score; which of them survive "
            "is implementation-defined, so they were not compared"
        )
    result.verified = True if pairs else None
    if not pairs:
        result.notes.append("inconclusive: every detection is tied (an untrained model?)")
