"""Helpers shared by the CLI commands: recipe loading with flag overrides, ``key=value`` parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from surgery.errors import RecipeError
from surgery.recipe import Recipe, apply_overrides, load_recipe


def parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["num_classes=5", "min_size=320"]`` -> ``{"num_classes": 5, "min_size": 320}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"{what} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise RecipeError(f"{what} {item!r}: bad value ({e})") from e
    return out


def resolve_recipe(recipe: Path | None, overrides: dict[str, Any]) -> Recipe:
    """The recipe file (or defaults) with CLI flags applied on top (``None`` flags are ignored)."""
    base = load_recipe(recipe) if recipe is not None else Recipe(source="<defaults>")
    return apply_overrides(base, overrides)
