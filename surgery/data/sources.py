"""Data source strings: ``synthetic``, ``coco:ROOT``, ``voc:ROOT`` (prefixes in any case), an
annotation ``.json``, or a plain folder recognised by its layout (COCO: ``annotations/instances_*.json``
next to the image folders; VOC: ``Annotations/`` + ``JPEGImages/`` + ``ImageSets/``, also inside
``VOCdevkit/VOC*``; YOLO: a ``data.yaml`` in it, see :mod:`.yolo_format`), ``yolo:DATA_YAML`` (or the
dataset yaml itself). Imports nothing heavy: recipe validation uses it."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import DataError
from ..registry import close_matches, did_you_mean

# the synthetic set's limits (recipes and surgery.data.synth check them)
MAX_SYNTH_IMAGES = 200_000
MAX_SYNTH_SIZE = 2048
MAX_YAML_BYTES = 1 << 20  # a dataset yaml is a few lines: a bigger file is not parsed

KINDS = ("coco", "voc", "yolo")
EXPECTED = ("'synthetic', 'coco:ROOT', 'voc:ROOT', 'yolo:DATA_YAML', a COCO, VOC or YOLO dataset folder, "
            "a COCO annotation .json or a YOLO dataset .yaml")


def is_data_yaml(path: Path) -> bool:
    """Whether ``path`` is a yaml file that looks like a YOLO dataset yaml (``train`` or ``val``
    with ``names`` or ``nc``); never raises."""
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            return False
        spec = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(spec, dict) and ("train" in spec or "val" in spec) and ("names" in spec or "nc" in spec)


def data_yaml_in(folder: Path) -> Path | None:
    """The dataset yaml of a folder (``data.yaml``, ``dataset.yaml``, or its only dataset yaml)."""
    if not folder.is_dir():
        return None
    for name in ("data.yaml", "dataset.yaml", "data.yml"):
        if is_data_yaml(folder / name):
            return folder / name
    found = [p for p in sorted(folder.glob("*.y*ml")) if is_data_yaml(p)]
    return found[0] if len(found) == 1 else None


def _is_voc_dir(p: Path) -> bool:
    return all((p / d).is_dir() for d in ("Annotations", "JPEGImages", "ImageSets"))


def folder_kind(root: Path) -> str | None:
    """``"coco"``, ``"voc"`` or ``"yolo"`` when ``root``'s layout is one of them, else ``None``."""
    if is_data_yaml(root):
        return "yolo"
    if not root.is_dir():
        return None
    if any((root / "annotations").glob("instances_*.json")):
        return "coco"
    if _is_voc_dir(root) or any(_is_voc_dir(p) for base in (root, root / "VOCdevkit") for p in base.glob("VOC*")):
        return "voc"
    if data_yaml_in(root) is not None:
        return "yolo"
    return None


def yolo_data_yaml(rest: str) -> str:
    """The dataset yaml a ``yolo:`` source names (the yaml itself, or the folder holding it)."""
    path = Path(rest).expanduser()
    if path.is_dir():
        found = data_yaml_in(path)
        if found is None:
            hint = " (it has images/ and labels/: add the data.yaml that names the splits and classes)" \
                if (path / "images").is_dir() else ""  # fmt: skip
            raise DataError(f"YOLO dataset folder {rest} has no dataset yaml (data.yaml with train/val and names){hint}")
        return str(found)
    return rest


def normalize_source(source: str) -> str:
    """The canonical form of a data source (``coco:ROOT``, ``voc:ROOT``, ``synthetic``, a .json),
    or one :class:`DataError` naming what is allowed, with a suggestion when one is close."""
    source = str(source).strip()
    if source.lower() == "synthetic":
        return "synthetic"
    kind, sep, rest = source.partition(":")
    if sep and kind.lower() == "yolo":
        return f"yolo:{yolo_data_yaml(rest)}"
    if sep and kind.lower() in KINDS:
        return f"{kind.lower()}:{rest}"
    if source.lower().endswith(".json"):
        return source
    path = Path(source).expanduser()
    found = folder_kind(path)
    if found == "yolo":
        return f"yolo:{yolo_data_yaml(source)}"
    if found is not None:
        return f"{found}:{source}"
    if sep and len(kind) > 1:  # a prefix typo: "coc:/data", "pascal:/data"
        close = close_matches(kind.lower(), [*KINDS, "synthetic"], cutoff=0.5)
        if close:
            raise DataError(f"unknown data source {source!r}: did you mean '{close[0]}:{rest}'? Expected {EXPECTED}")
    if path.is_dir():
        raise DataError(
            f"data folder {source} is neither COCO (annotations/instances_<split>.json + image folders), VOC "
            "(Annotations/, JPEGImages/, ImageSets/Main/) nor YOLO (data.yaml + images/ + labels/); pass "
            "'coco:ROOT', 'voc:ROOT' or 'yolo:DATA_YAML' to say which it is"
        )
    hint = did_you_mean(source.lower(), ["synthetic"]) or (f" ({source} does not exist)" if "/" in source else "")
    raise DataError(f"unknown data source {source!r}{hint}: expected {EXPECTED}")
