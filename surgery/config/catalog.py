"""The recipes shipped with surgery, found by name from any folder.

In a checkout they are the repository's ``recipes/`` folder; installed (wheel or editable) they are
the package data of ``surgery_recipes``. A path to an existing file always wins over a name, so
``--recipe recipes/x.yaml`` and ``--recipe my.yaml`` mean exactly those files. Imports nothing of
surgery but its errors (``surgery recipes`` and ``--help`` stay torch-free)."""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError

SUFFIX = ".yaml"


@dataclass(frozen=True)
class RecipeEntry:
    name: str  # what --recipe NAME takes
    path: Path
    summary: str  # the file's first comment line, if any


def recipes_dir() -> Path | None:
    """The folder of shipped recipes: the checkout's ``recipes/`` beside this package when this
    package is a checkout, else the installed ``surgery_recipes`` package; None if neither exists."""
    root = Path(__file__).resolve().parent.parent.parent
    if (root / "pyproject.toml").is_file() and (root / "recipes").is_dir():
        return root / "recipes"
    spec = importlib.util.find_spec("surgery_recipes")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(location).is_dir():
            return Path(location)
    return None


def _summary(path: Path) -> str:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.startswith("#"):
                    break
                text = line.lstrip("#").strip()
                if text and not text.startswith("surgery recipe"):  # the per-builder files' first line
                    return text
    except (OSError, UnicodeDecodeError):
        pass
    return ""


def list_recipes() -> list[RecipeEntry]:
    """Every shipped recipe, sorted by name."""
    folder = recipes_dir()
    if folder is None:
        return []
    return [RecipeEntry(p.stem, p, _summary(p)) for p in sorted(folder.glob(f"*{SUFFIX}"))]


def looks_like_name(value: str | Path) -> bool:
    """A bare recipe name (``quickstart``, ``quickstart.yaml``), not a path with folders."""
    text = str(value)
    return bool(text) and "/" not in text and "\\" not in text and not text.startswith(".")


def find_recipe(value: str | Path) -> Path:
    """``value`` as a path if such a file exists, else the shipped recipe of that name. An unknown
    name is one error listing the names."""
    path = Path(value)
    # ``recipes/NAME.yaml`` as the README and the Makefile write it also finds the shipped recipe
    # outside a checkout (a pip install): only when no such file exists here
    shipped_path = path.parent.as_posix() == "recipes"
    if (path.exists() and not path.is_dir()) or not (looks_like_name(value) or shipped_path):  # a FIFO is named as one
        return path
    name = path.name.removesuffix(SUFFIX)
    entries = list_recipes()
    for entry in entries:
        if entry.name == name:
            return entry.path
    names = [e.name for e in entries]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise RecipeError(f"recipe {value} does not exist: no such file, and no shipped recipe of that name{hint}; "
                      f"`surgery recipes` lists them: {', '.join(names) or 'none installed'}")
