"""Optional extras skip where they are optional and fail where CI installed them (CI=true)."""

from __future__ import annotations

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
