"""Optional extras in tests: skip where they are optional, fail where CI promised them."""

from __future__ import annotations

import importlib
import os
import types

import pytest

# CI installs the `dev` and `yolo` extras (Makefile: `.[dev,yolo]`): there a missing one is a broken
# environment, not an optional feature, so `require` fails instead of skipping.
CI_EXTRAS = frozenset({"onnx", "onnxruntime", "openvino", "ultralytics", "hypothesis", "optuna", "sqlalchemy", "psycopg"})


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require(module: str) -> types.ModuleType:
    """pytest's import-or-skip for optional extras, except that under ``CI=true`` a missing extra
    that CI installs is a failure (a silent skip would hide that a whole feature went untested).
    Works at module level (collection) and inside a test."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if in_ci() and module.split(".")[0] in CI_EXTRAS:
            pytest.fail(f"{module} is missing, but CI installs it ('.[dev,yolo]'): {e}", pytrace=False)
        pytest.skip(f"{module} is not installed: {e}", allow_module_level=True)
