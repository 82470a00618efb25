"""Detections on image files: :func:`load_predictor` (the one place a model for prediction is
loaded), :func:`predict_files` (typed results), :func:`draw_detections` and
:func:`write_predictions` (boxes with class names on each image, plus one JSON of detections).

The library never prints; ``surgery predict`` renders the results."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.images import IMAGE_SUFFIXES, read_rgb
from ..errors import DataError
from ..storage.atomic import atomic_open, atomic_path
from ..storage.safety import OutputError
from .runtime import load_detector

_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]  # fmt: skip


@dataclass
class Detection:
    box: list[float]  # x1, y1, x2, y2 in pixels of the original image
    score: float
    label: int
    name: str


@dataclass
class ImagePrediction:
    file: str
    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)
    drawn: str | None = None  # the image written with its boxes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Predictor:
    """A detector callable like a torchvision detector in eval mode (list of CHW float tensors in
    [0, 1] -> list of dicts with ``boxes``/``scores``/``labels``) and its class names."""

    model: Callable[[list[Any]], list[dict[str, Any]]]
    class_names: list[str] | None
    source: str

    def name(self, label: int) -> str:
        names = self.class_names
        return names[label] if names and 0 <= label < len(names) else str(label)


def load_predictor(path: str | Path, device: str = "cpu", *, trust_code: bool | None = None,
                   runtime: str = "onnxruntime", precision: str = "f32") -> Predictor:
    """A surgery checkpoint or an exported ``.onnx`` file (run by ONNX Runtime, or OpenVINO at
    ``precision``) as a :class:`Predictor` (eval mode, the class names stored with it)."""
    model, ckpt = load_detector(Path(path), device, trust_code=trust_code, runtime=runtime, precision=precision)
    return Predictor(model, ckpt.class_names, str(path))


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The image files among ``inputs`` (folders are listed, sorted, not recursively)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image {p} does not exist")
    if not files:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return files


def _read(path: Path) -> Any:
    import torch


    arr = read_rgb(path)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def predict_files(
    predictor: Predictor,
    files: Sequence[Path],
    *,
    score_thresh: float = 0.3,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[ImagePrediction]:
    """Run the detector on ``files`` and keep the detections scoring at least ``score_thresh``."""
    import torch

    if not 0.0 <= score_thresh <= 1.0:
        raise DataError(f"--score-thresh {score_thresh}: expected a number in [0, 1]")
    out: list[ImagePrediction] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = [_read(f) for f in chunk]
        with torch.inference_mode():
            results = predictor.model(images)
        for f, img, res in zip(chunk, images, results, strict=True):
            keep = res["scores"] >= score_thresh
            dets = [
                Detection([round(float(v), 3) for v in box], round(float(s), 6), int(lab), predictor.name(int(lab)))
                for box, s, lab in zip(res["boxes"][keep].tolist(), res["scores"][keep].tolist(),
                                       res["labels"][keep].tolist(), strict=True)
            ]
            out.append(ImagePrediction(str(f), int(img.shape[2]), int(img.shape[1]), dets))
        if progress is not None:
            progress(len(out), len(files))
    return out


def draw_detections(image: Path, pred: ImagePrediction, path: Path) -> Path:
    """``image`` with each detection's box and ``name score`` label, written atomically to ``path``."""
    from PIL import Image, ImageDraw, ImageFont


    canvas = Image.fromarray(read_rgb(image))
    scale = max(1, round(320 / max(canvas.size)))  # small images are enlarged so labels stay readable
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for d in pred.detections:
        x1, y1, x2, y2 = (v * scale for v in d.box)
        colour = _COLOURS[d.label % len(_COLOURS)]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f"{d.name} {d.score:.2f}"
        ty = max(0, y1 - 11)
        draw.rectangle([x1, ty, x1 + 6 * len(text) + 2, ty + 10], fill=colour)
        draw.text((x1 + 1, ty - 1), text, fill=(255, 255, 255), font=font)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    with atomic_path(path) as tmp:
        canvas.save(tmp, format=fmt)
    return path


MARKER = ".surgery-predict"  # in every folder predict created: later runs may write there again


def write_predictions(preds: list[ImagePrediction], out_dir: Path, *, draw: bool = True,
                      into_existing: bool = False) -> Path:
    """Draw every image into ``out_dir`` (same name; ``name_1.png``... when two inputs share one)
    and write ``out_dir/detections.json``; returns the JSON's path. A folder that holds files and
    was not created by ``predict`` is refused unless ``into_existing`` (the CLI's ``--overwrite``): its
    ``detections.json`` or images could be the user's."""

    out_dir = Path(out_dir)
    if out_dir.is_dir() and not (out_dir / MARKER).exists() and any(out_dir.iterdir()) and not into_existing:
        raise OutputError(f"--out {out_dir} is a folder surgery predict did not create and it holds files "
                          "(detections.json or images there could be yours): choose a new folder, or pass "
                          "--overwrite to write into it")
    shared = [p.file for p in preds if out_dir.exists() and Path(p.file).parent.resolve() == out_dir.resolve()]
    if draw and shared:
        raise OutputError(f"--out {out_dir} holds the input image {shared[0]}: drawn images would replace inputs; "
                          "choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).touch()
    used: set[str] = set()
    for p in preds:
        src = Path(p.file)
        name, k = src.stem + (".png" if src.suffix.lower() == ".png" else ".jpg"), 0
        while name in used or name == "detections.json":
            k += 1
            name = f"{src.stem}_{k}{'.png' if src.suffix.lower() == '.png' else '.jpg'}"
        used.add(name)
        if draw:
            p.drawn = str(draw_detections(src, p, out_dir / name))
    path = out_dir / "detections.json"
    with atomic_open(path, "w") as f:
        json.dump([p.to_dict() for p in preds], f, indent=1)
    return path


__all__ = ["Detection", "ImagePrediction", "Predictor", "draw_detections", "image_files", "load_predictor",
           "predict_files", "write_predictions"]
