"""The latency table's cache is data from a file: validated, keyed by the machine, size-checked
before it is read, and a cache folder that cannot be written is one error before anything is timed."""

from __future__ import annotations

import json
import math

import pytest
import torch

import surgery.pruning.latency_table as lt
from surgery.detectors.builders import build_model
from surgery.errors import PruningError

SIZE = 64
N = len(lt.FRACTIONS)


def _fake_timer(calls: list[int]):
    """A stand-in for the runtime timer (what is tested is the cache, not the clock): a cost
    bilinear in the width fractions, different per layer."""

    def timer(layers, threads, runs):
        calls.append(1)
        return {name: [[0.01 * (k + 1) * (0.1 + fi * fo) for fo in lt.FRACTIONS] for fi in lt.FRACTIONS]
                for k, name in enumerate(layers)}

    return timer


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    calls: list[int] = []
    monkeypatch.setattr(lt, "_time_torch", _fake_timer(calls))
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=3, min_size=SIZE, max_size=SIZE).eval()
    return model, calls


def _measure(model):
    return lt.measure_table(model, "torch", SIZE, threads=1, runs=1)


def test_a_valid_entry_is_used_and_an_edited_one_measured_again(setup) -> None:
    model, calls = setup
    first = _measure(model)
    assert _measure(model).ms == first.ms and len(calls) == 1  # the cached table, not timed again
    path = lt.cache_dir() / f"{first.key}.json"
    d = json.loads(path.read_text())
    name = next(iter(d["ms"]))
    d["ms"][name][0][0] = float("nan")
    path.write_text(json.dumps(d))
    again = _measure(model)
    assert len(calls) == 2 and all(math.isfinite(v) for g in again.ms.values() for r in g for v in r)
    assert any("not a valid table" in n and "nan" in n for n in again.notes)
    assert lt.check_table(json.loads(path.read_text()), again.ms, again.key) is None  # the entry was replaced


def _edit(d: dict, how: str) -> dict:
    name = next(iter(d["ms"]))
    if how == "nested":
        d["ms"][name] = [[[1.0] * N] * N] * N
    elif how == "empty":
        d["ms"] = {}
    elif how == "1x1":
        d["ms"] = {k: [[1.0]] for k in d["ms"]}
    elif how == "zeros":
        d["ms"] = {k: [[0.0] * N for _ in range(N)] for k in d["ms"]}
    elif how == "constant":
        d["ms"] = {k: [[3.0] * N for _ in range(N)] for k in d["ms"]}
    elif how in ("inf", "negative", "text"):
        d["ms"][name][1][2] = {"inf": float("inf"), "negative": -1.0, "text": "fast"}[how]
    elif how == "other-key":
        d["key"] = "0" * 16
    return d


@pytest.mark.parametrize("how", ["nested", "empty", "1x1", "zeros", "constant", "inf", "negative", "text", "other-key"])
def test_a_cache_entry_that_is_not_a_table_is_measured_again(setup, how: str) -> None:
    model, calls = setup
    first = _measure(model)
    path = lt.cache_dir() / f"{first.key}.json"
    path.write_text(json.dumps(_edit(json.loads(path.read_text()), how)))
    assert lt.check_table(json.loads(path.read_text()), first.ms, first.key) is not None
    again = _measure(model)  # no ZeroDivisionError, no NaN estimate: measured again
    assert len(calls) == 2 and again.ms == first.ms
    assert any(str(path) in n for n in again.notes)


def test_an_oversized_entry_is_not_read(setup, monkeypatch) -> None:
    model, calls = setup
    first = _measure(model)
    path = lt.cache_dir() / f"{first.key}.json"
    with open(path, "r+b") as f:
        f.truncate(2 * 2**30)  # 2 GB, sparse: costs nothing on disk
    read = []
    real = type(path).read_text
    monkeypatch.setattr(type(path), "read_text", lambda self, *a, **k: read.append(self) or real(self, *a, **k))
    again = _measure(model)
    assert path not in read and len(calls) == 2
    assert any("bytes" in n for n in again.notes)


def test_the_key_holds_the_machine(setup, monkeypatch) -> None:
    model, calls = setup
    here = _measure(model)
    ident = lt.machine_identity()
    assert ident["cores"] and ident["host"] and ident["cpu"]
    monkeypatch.setattr(lt, "machine_identity", lambda: {**ident, "host": "another-host"})
    there = _measure(model)
    assert there.key != here.key and len(calls) == 2  # another machine's table is never used
    monkeypatch.setattr(lt, "machine_identity", lambda: {**ident, "cpu": "another CPU"})
    assert _measure(model).key not in (here.key, there.key)


def test_a_cache_that_is_a_file_is_one_error_before_measuring(tmp_path, monkeypatch) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "file"))
    monkeypatch.setattr(lt, "_conv_inputs", lambda *a, **k: pytest.fail("measured before the cache was checked"))
    with pytest.raises(PruningError, match=r"latency cache .*is not a folder.*SURGERY_CACHE") as e:
        lt.measure_table(torch.nn.Conv2d(3, 3, 1), "torch", SIZE)
    assert "output" not in str(e.value)


def test_a_cache_that_cannot_be_written_is_one_error_before_measuring(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "ro"))
    monkeypatch.setattr(lt, "_conv_inputs", lambda *a, **k: pytest.fail("measured before the cache was checked"))

    def read_only(*a, **k):  # root writes into a chmod 555 folder: the refusal is simulated
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lt.tempfile, "mkstemp", read_only)
    with pytest.raises(PruningError, match=r"latency cache .*cannot be written.*Permission denied"):
        lt.measure_table(torch.nn.Conv2d(3, 3, 1), "torch", SIZE)
