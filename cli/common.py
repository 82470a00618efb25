"""Helpers shared by the CLI commands: recipe loading with flag overrides, ``key=value`` parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.config.recipe import Recipe, apply_overrides, load_recipe
from surgery.errors import RecipeError

from .outputs import overwrite_allowed


def parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["num_classes=5", "min_size=320"]`` -> ``{"num_classes": 5, "min_size": 320}`` (YAML values)."""
    import yaml

    from surgery.storage.trust import safe_yaml_load

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"{what} {item!r}: expected KEY=VALUE")
        if key.strip() in out:  # the last one would silently win
            raise RecipeError(f"{what} {key.strip()!r} is given twice: give it once")
        try:
            out[key.strip()] = safe_yaml_load(value, f"{what} {item!r}")
        except yaml.YAMLError as e:
            raise RecipeError(f"{what} {item!r}: bad value ({str(e).splitlines()[0]})") from e
    return out


def parse_ratios(items: list[str] | None, what: str) -> dict[str, float] | None:
    """``--override GLOB=RATIO`` values as floats (a clear error for anything else)."""
    out = {}
    for key, value in parse_kv(items, what).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{what} {key}={value!r}: the ratio must be a number in [0, 1)")
        out[key] = float(value)
    return out or None


def resolve_recipe(recipe: Path | None, overrides: dict[str, Any]) -> Recipe:
    """The recipe file (or defaults) with CLI flags applied on top (``None`` flags are ignored).

    A bad value set by a flag is blamed on the flag, a bad value in the file on the file."""
    from surgery.config.recipe import check_flag_overrides

    check_flag_overrides(overrides)
    base = load_recipe(recipe) if recipe is not None else Recipe(source="<defaults>")
    return apply_overrides(base, overrides)


def run_out(out: Path | None, root: str, resume: bool) -> Path:
    """``--out``, or ``root/expN/last.pt`` in a new run folder (``--resume``: the latest one).
    An existing checkpoint is never silently overwritten."""
    from surgery.storage.safety import OutputError
    from surgery.training.records import latest_run_dir, next_run_dir

    if out is None:
        latest = latest_run_dir(root) if resume else None
        return (latest or next_run_dir(root)) / "last.pt"
    if out.exists() and not resume and not overwrite_allowed():
        raise OutputError(f"--out {out} exists: pass --resume to continue that run, --overwrite to replace it, "
                          "or another --out (without --out every run gets a new folder)")
    return out
