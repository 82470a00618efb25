"""Files that feed a number are validated as data: a sensitivity CSV, a VOC box
and ``sparsify --ratio`` give either the right result or one clear line, never a silently wrong cut."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from surgery.errors import DataError, RecipeError
from surgery.pruning.sensitivity import (
    COLUMNS,
    DENSE,
    SensitivityRow,
    _write_table,
    allocate_by_sensitivity,
    read_table,
)
from surgery.pruning.sparsify import check_target_ratio


def _rows() -> list[SensitivityRow]:
    rows = [SensitivityRow(DENSE, 0.0, 0, 0, 1000, 1.0, 0.5, 0.8)]
    for ratio in (0.25, 0.5):
        rows.append(SensitivityRow("a", ratio, 64, int(64 * (1 - ratio)), 900, 0.9, 0.45, 0.7))
    return rows


def _csv(tmp_path: Path, edit=None, bom: bool = False) -> Path:
    path = tmp_path / "s.csv"
    _write_table(path, "k1", _rows())
    lines = list(csv.reader(path.open(newline="")))
    if edit is not None:
        edit(lines)
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        csv.writer(f).writerows(lines)
    return path


def _set(row: int, column: str, value: str):
    def edit(lines: list[list[str]]) -> None:
        lines[row][COLUMNS.index(column)] = value

    return edit


def test_a_written_table_reads_back_and_a_bom_is_accepted(tmp_path: Path) -> None:
    key, rows = read_table(_csv(tmp_path))
    assert key == "k1" and [(r.group, r.ratio) for r in rows] == [(DENSE, 0.0), ("a", 0.25), ("a", 0.5)]
    assert read_table(_csv(tmp_path, bom=True)) == (key, rows)  # Excel's "CSV UTF-8" prefixes a BOM


@pytest.mark.parametrize(
    "edit,match",
    [
        (_set(2, "ratio", "1.5"), "ratio = '1.5'"),
        (_set(2, "ratio", "-0.2"), "ratio = '-0.2'"),
        (_set(2, "ratio", "0"), "a group's cut ratio must be in \\(0, 1\\]"),
        (_set(2, "map", "nan"), "map = 'nan'"),
        (_set(2, "map", "1.5"), "map = '1.5'"),
        (_set(2, "map50", "inf"), "map50 = 'inf'"),
        (_set(2, "macs", "-5"), "macs = '-5'"),
        (_set(2, "kept", "65"), "kept = 65 is more than channels = 64"),
        (_set(2, "channels", "9" * 5000), "channels = '9999"),
        (lambda lines: lines.append(list(lines[2])), "line 5: group 'a' at ratio 0.25 is in the table twice"),
        (_set(2, "group", "x" * 200_000), "field larger than field limit"),  # was a traceback
        (lambda lines: lines[2].pop(), "expected 10 fields"),
    ],
)
def test_bad_tables_are_refused_with_the_line_and_field(tmp_path: Path, edit, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as e:
        read_table(_csv(tmp_path, edit))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_oversized_table_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(RecipeError, match="refused before reading"):
        read_table(path)


def test_missing_groups_get_a_hint_that_names_them() -> None:
    rows = _rows()  # only group "a" was measured; the model also has "b" and "c"
    alloc = allocate_by_sensitivity(["a", "b", "c"], rows, 0.5, measure=lambda ratios: 0.95)
    assert not alloc.met
    note = " ".join(alloc.notes)
    assert "2 of the model's 3 groups have no rows in the table (b, c)" in note, note
    alloc = allocate_by_sensitivity(["a"], rows, 0.5, measure=lambda ratios: 0.95)
    assert "have no rows" not in " ".join(alloc.notes) and "larger --ratios" in " ".join(alloc.notes)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_voc_non_finite_coordinates_are_refused_with_file_and_field(tmp_path: Path, value: str) -> None:
    from surgery.data.loader import build_dataset
    from tests.test_data import _voc_folder

    devkit = _voc_folder(tmp_path / "v", objects={"000009": [("dog", 0, value, 10, 40, 30)]})
    with pytest.raises(DataError, match=r"000009\.xml: object 0 \(dog\) has <xmin>"):
        build_dataset(f"voc:{devkit}", "val", train=False)


@pytest.mark.parametrize("ratio", [2, 0, -1, 1, math.nan, math.inf, True])
def test_sparsify_target_ratio_outside_0_1_is_refused(ratio) -> None:
    with pytest.raises(RecipeError, match="strictly between 0 and 1"):
        check_target_ratio(ratio)
    check_target_ratio(0.5)
    check_target_ratio(None)


def test_sparsify_cli_ratio_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for value in ("2", "inf", "nan"):
        r = subprocess.run([sys.executable, "-m", "surgery", "sparsify", "missing.pt", "--ratio", value],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)  # fmt: skip
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and "--ratio" in errors[0], r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()
