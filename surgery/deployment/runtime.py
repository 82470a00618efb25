"""Deployment runtimes: :class:`OnnxDetector` (an exported detector called like a torchvision one,
run by ONNX Runtime or OpenVINO) and :func:`load_detector` (a checkpoint or an ONNX file). Sessions
and ONNX metadata come from :mod:`surgery.deployment.onnx_io` (their names stay importable from here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..detectors.builders import ModelSpec
from ..pruning.masked import fold_masks
from ..storage.checkpoint import Checkpoint, load_checkpoint
from .onnx_io import (
    RuntimeUnavailable,
    check_metadata,
    import_onnxruntime,
    is_onnx,
    ort_session,
    read_metadata,
    session,
)

__all__ = ["OnnxDetector", "RuntimeUnavailable", "fit_image", "import_onnxruntime", "is_onnx", "load_detector",
           "ort_session", "run_image"]


class OnnxDetector(nn.Module):
    """An exported detector run by ONNX Runtime or OpenVINO (``runtime``; OpenVINO at
    ``precision``, see :mod:`surgery.deployment.onnx_io`), callable like a torchvision detector in eval mode:
    ``model(images)`` with a list of ``3 x H x W`` float tensors in [0, 1] returns one dict per
    image with ``boxes`` (in that image's pixels), ``scores``, ``labels`` (+ ``masks`` /
    ``keypoints``). A fixed-size file (``[3, S, S]``) gets each image resized to ``S x S`` and its
    boxes, keypoints and masks mapped back. It is an ``nn.Module`` without parameters so the code
    that evaluates and times torch models (``.eval()``, ``.to()``, ``parameters()``) takes it too.
    """

    def __init__(self, path: str | Path, threads: int | None = None, *, spinning: bool = False,
                 runtime: str = "onnxruntime", precision: str = "f32") -> None:
        super().__init__()
        self.path = Path(path)
        self.runtime, self.precision = runtime, precision
        self.session = session(path, runtime, threads, precision=precision, spinning=spinning)
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 3:
            raise RuntimeUnavailable(f"{path}: expected a surgery export (one image [3, H, W] in), the input is {shape}")
        check_input_shape(shape, path)
        self.input_name = self.session.get_inputs()[0].name
        self.fixed = (int(shape[1]), int(shape[2])) if all(isinstance(d, int) for d in shape[1:]) else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = [k for k in ("boxes", "scores", "labels") if k not in self.output_names]
        if missing:
            raise RuntimeUnavailable(f"{path}: not a detector export (no {', '.join(missing)} output)")
        self.metadata = check_metadata(read_metadata(self.session), path)  # this session's: no second load

    @property
    def size(self) -> int | None:
        """The fixed input side of a ``[3, S, S]`` file (``None``: dynamic height and width)."""
        return self.fixed[0] if self.fixed is not None else None

    def run(self, image: torch.Tensor) -> dict[str, Any]:
        """The raw outputs (numpy, by name) for one image already at the file's input size."""
        outs = self.session.run(None, {self.input_name: image.detach().cpu().float().contiguous().numpy()})
        return dict(zip(self.output_names, outs))

    def forward(self, images: list[torch.Tensor], targets: Any = None) -> list[dict[str, torch.Tensor]]:
        return [run_image(self, img) for img in images]


MAX_SIDE = 8192  # an image side an exported detector may fix (larger: a 480 GB resize, refused)


def check_input_shape(shape: list[Any], path: str | Path) -> None:
    """The file's declared input ``[3, H, W]``: 3 channels, and a fixed H/W within ``MAX_SIDE``
    (a file declaring ``[3, 200000, 200000]`` would have every image resized to 480 GB)."""
    c, *hw = shape
    if isinstance(c, int) and c != 3:
        raise RuntimeUnavailable(f"{path}: expected an RGB image input [3, H, W], the file declares {shape}")
    for d in hw:
        if isinstance(d, int) and not 1 <= d <= MAX_SIDE:
            raise RuntimeUnavailable(
                f"{path}: input {shape} declares a side of {d} pixels (at most {MAX_SIDE}); refused"
            )


def fit_image(image: torch.Tensor, size: int | tuple[int, int] | None) -> torch.Tensor:
    """``image`` (``3 x H x W``, float, CPU) resized bilinearly to a fixed-size file's ``size``;
    unchanged when it already has that size or ``size`` is ``None`` (dynamic height and width)."""
    import torch.nn.functional as F

    x = image.detach().float().cpu()
    if size is None:
        return x
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False)[0]


def run_image(det: OnnxDetector, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """One image through an :class:`OnnxDetector`; outputs as CPU torch tensors in the image's pixels."""
    import torch.nn.functional as F

    h, w = int(image.shape[-2]), int(image.shape[-1])
    res = {name: torch.from_numpy(v) for name, v in det.run(fit_image(image, det.fixed)).items()}
    if det.fixed is not None and (h, w) != det.fixed:
        sy, sx = h / det.fixed[0], w / det.fixed[1]
        scale = torch.tensor([sx, sy, sx, sy])
        res["boxes"] = res["boxes"] * scale
        if "keypoints" in res:
            res["keypoints"] = res["keypoints"] * torch.tensor([sx, sy, 1.0])
        if "masks" in res and res["masks"].numel():
            res["masks"] = F.interpolate(res["masks"].float(), size=(h, w), mode="bilinear", align_corners=False)
    res["labels"] = res["labels"].long()
    return res


def load_detector(
    path: str | Path, device: str = "cpu", *, threads: int | None = None, trust_code: bool | None = None,
    spinning: bool = False, runtime: str = "onnxruntime", precision: str = "f32",
) -> tuple[nn.Module, Any]:
    """A checkpoint or an ONNX export, ready for inference: ``(model, checkpoint)``.

    Checkpoints load with :func:`surgery.storage.checkpoint.load_checkpoint` (masks folded in); an ONNX file
    becomes an :class:`OnnxDetector` (CPU; ``runtime`` onnxruntime or openvino at ``precision``) with a :class:`~surgery.storage.checkpoint.Checkpoint`
    made from its ``surgery.*`` metadata (model, kind, recipe; no weights). Both come back in eval mode.
    """
    import json

    if is_onnx(path):
        if str(device) != "cpu":
            raise RuntimeUnavailable(f"{path}: ONNX files run on the CPU here (got --device {device})")
        det = OnnxDetector(path, threads, spinning=spinning, runtime=runtime, precision=precision)
        meta = det.metadata
        kwargs = {"num_classes": int(meta["num_classes"])} if meta.get("num_classes", "").isdigit() else {}
        ckpt = Checkpoint(
            spec=ModelSpec(meta.get("model", Path(path).stem), kwargs),
            state_dict={},
            kind=meta.get("kind", "onnx"),
            recipe=json.loads(meta["recipe"]) if meta.get("recipe") else None,
            meta={"onnx": meta},
            class_names=json.loads(meta["class_names"]) if meta.get("class_names") else None,
            path=Path(path),
        )
        return det.eval(), ckpt
    if runtime != "onnxruntime" or precision != "f32":
        raise RuntimeUnavailable(f"{path}: --runtime {runtime} / --precision {precision} run exported .onnx files "
                                 "(surgery export first); a checkpoint runs in torch")
    model, ckpt = load_checkpoint(path, device=device, trust_code=trust_code)
    if ckpt.kind == "masked":
        fold_masks(model, ckpt.masks)
    return model.eval(), ckpt
