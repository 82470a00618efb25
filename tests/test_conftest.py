"""The suite's own machinery: an expensive session artefact is built once per run, also when
pytest-xdist workers ask for it at the same time (tests/conftest.py's ``shared_artefact``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import tests.conftest as conftest


def _factory(base: Path) -> SimpleNamespace:
    """What ``shared_artefact`` uses of a worker's tmp_path_factory (a worker's base folder sits in the run's)."""
    worker = base / "popen-gw0"
    worker.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(getbasetemp=lambda: worker, mktemp=lambda name: pytest.fail("alone-mode path under xdist"))


def test_shared_artefact_is_built_once_for_concurrent_workers(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(conftest, "XDIST_WORKER", "gw0")
    built: list[Path] = []
    gate = threading.Barrier(4)

    def build(folder: Path) -> Path:
        built.append(folder)
        time.sleep(0.3)  # a build takes a while: the other workers ask meanwhile
        (folder / "model.pt").write_text("weights")
        return folder / "model.pt"

    results: list[Path] = []

    def worker() -> None:
        gate.wait()
        results.append(conftest.shared_artefact(_factory(tmp_path), "model", build))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(built) == 1 and results == [tmp_path / "shared-model" / "model.pt"] * 4


def test_a_failed_shared_build_is_retried(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(conftest, "XDIST_WORKER", "gw1")
    calls = []

    def build(folder: Path) -> Path:
        calls.append(folder)
        (folder / "half").write_text("x")
        if len(calls) == 1:
            raise RuntimeError("killed half-way")
        return folder / "half"

    with pytest.raises(RuntimeError):
        conftest.shared_artefact(_factory(tmp_path), "model", build)
    assert conftest.shared_artefact(_factory(tmp_path), "model", build).read_text() == "x" and len(calls) == 2


def test_alone_the_artefact_goes_to_a_fresh_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(conftest, "XDIST_WORKER", None)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    factory = SimpleNamespace(mktemp=lambda name: fresh, getbasetemp=lambda: pytest.fail("shared path alone"))
    assert conftest.shared_artefact(factory, "model", lambda folder: folder / "m.pt") == fresh / "m.pt"
