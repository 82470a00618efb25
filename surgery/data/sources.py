"""Data source strings: ``synthetic``, ``coco:ROOT``, ``voc:ROOT`` (prefixes in any case), an
annotation ``.json``, or a plain folder recognised by its layout (COCO: ``annotations/instances_*.json``
next to the image folders; VOC: ``Annotations/`` + ``JPEGImages/`` + ``ImageSets/``, also inside
``VOCdevkit/VOC*``). Imports nothing heavy: recipe validation uses it."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..registry import close_matches, did_you_mean

# the synthetic set's limits (recipes and surgery.data.synth check them)
MAX_SYNTH_IMAGES = 200_000
MAX_SYNTH_SIZE = 2048

KINDS = ("coco", "voc")
EXPECTED = "'synthetic', 'coco:ROOT', 'voc:ROOT', a COCO or VOC dataset folder, or a COCO annotation .json"


def _is_voc_dir(p: Path) -> bool:
    return all((p / d).is_dir() for d in ("Annotations", "JPEGImages", "ImageSets"))


def folder_kind(root: Path) -> str | None:
    """``"coco"`` or ``"voc"`` when ``root``'s layout is one of them, else ``None``."""
    if not root.is_dir():
        return None
    if any((root / "annotations").glob("instances_*.json")):
        return "coco"
    if _is_voc_dir(root) or any(_is_voc_dir(p) for base in (root, root / "VOCdevkit") for p in base.glob("VOC*")):
        return "voc"
    return None


def normalize_source(source: str) -> str:
    """The canonical form of a data source (``coco:ROOT``, ``voc:ROOT``, ``synthetic``, a .json),
    or one :class:`DataError` naming what is allowed, with a suggestion when one is close."""
    source = str(source).strip()
    if source.lower() == "synthetic":
        return "synthetic"
    kind, sep, rest = source.partition(":")
    if sep and kind.lower() in KINDS:
        return f"{kind.lower()}:{rest}"
    if source.lower().endswith(".json"):
        return source
    path = Path(source).expanduser()
    found = folder_kind(path)
    if found is not None:
        return f"{found}:{source}"
    if sep and len(kind) > 1:  # a prefix typo: "coc:/data", "pascal:/data"
        close = close_matches(kind.lower(), [*KINDS, "synthetic"], cutoff=0.5)
        if close:
            raise DataError(f"unknown data source {source!r}: did you mean '{close[0]}:{rest}'? Expected {EXPECTED}")
    if path.is_dir():
        raise DataError(
            f"data folder {source} is neither COCO (annotations/instances_<split>.json + image folders) nor VOC "
            "(Annotations/, JPEGImages/, ImageSets/Main/); pass 'coco:ROOT' or 'voc:ROOT' to say which it is"
        )
    hint = did_you_mean(source.lower(), ["synthetic"]) or (f" ({source} does not exist)" if "/" in source else "")
    raise DataError(f"unknown data source {source!r}{hint}: expected {EXPECTED}")
