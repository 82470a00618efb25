"""ONNX files are first-class: the INT8 file keeps the float export's metadata and adds its own,
`surgery info` reads .onnx files, and export and quantize trace at the same (the model's own) size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from surgery.detectors.builders import ModelSpec, build_model
from surgery.storage.checkpoint import save_checkpoint
from tests.extras import require

onnx = require("onnx")
require("onnxruntime")

SIZE = 96
CLASSES = ["__background__", "square", "disc", "triangle", "cross"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An untrained slim FCOS at 96 px with class names, exported and quantized through the CLI."""
    tmp = tmp_path_factory.mktemp("onnxfiles")
    kwargs = {"min_size": SIZE, "max_size": SIZE, "fpn_channels": 64, "num_classes": 5}
    model = build_model("fcos_resnet18_slim", **kwargs)
    recipe = {"data": {"root": str(tmp / "synth"), "images": 8, "size": SIZE}}
    ckpt = save_checkpoint(tmp / "m.pt", model, ModelSpec("fcos_resnet18_slim", kwargs), recipe=recipe,
                           class_names=CLASSES)  # fmt: skip
    runner = CliRunner()
    out = {"ckpt": ckpt, "float": tmp / "m.onnx", "int8": tmp / "m.int8.onnx", "kept": tmp / "kept.onnx"}
    r = runner.invoke(app, ["export", str(ckpt), "--out", str(out["float"]), "--no-verify"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["quantize", str(ckpt), "--out", str(out["int8"]), "--calib-batches", "1", "-b", "2",
                            "--verify-images", "0", "--keep-float", str(out["kept"]), "--form", "qdq-per-channel"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return out


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_int8_file_carries_float_metadata_plus_its_own(files):
    fl, q = _meta(files["kept"]), _meta(files["int8"])
    for key in ("model", "kind", "params", "macs", "class_names", "num_classes", "recipe"):
        assert q[f"surgery.{key}"] == fl[f"surgery.{key}"], key
    assert json.loads(q["surgery.class_names"]) == CLASSES
    assert fl["surgery.precision"] == "float32" and q["surgery.precision"] == "int8"
    assert q["surgery.calibration"] == "minmax on 2 training images"
    assert q["surgery.float_source"] == files["kept"].name


def test_export_and_quantize_trace_at_the_models_own_size(files):
    for key in ("float", "int8"):
        shape = [d.dim_value for d in onnx.load(str(files[key])).graph.input[0].type.tensor_type.shape.dim]
        assert shape == [3, SIZE, SIZE], (key, shape)
        assert _meta(files[key])["surgery.input_size"] == str(SIZE)


def test_info_reads_onnx_files(files):
    r = CliRunner().invoke(app, ["info", str(files["int8"])])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "fcos_resnet18_slim" in text and "int8" in text and "square, disc, triangle, cross" in text
    data = json.loads(CliRunner().invoke(app, ["info", str(files["int8"]), "--format", "json"]).output)
    assert data["precision"] == "int8" and data["class_names"] == CLASSES and data["params"] > 0
    assert data["input_shape"] == [3, SIZE, SIZE]


def test_bench_sees_float_and_int8_as_the_same_model(files):
    r = CliRunner().invoke(app, ["bench", str(files["float"]), str(files["int8"]), "-b", "1", "--runs", "1",
                                 "--warmup", "0", "--format", "json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    start = r.output.index("{") if r.output.lstrip().startswith("{") else r.output.index("[")
    data = json.loads(r.output[start:])
    rows = data["rows"] if isinstance(data, dict) else data
    assert len(rows) == 2 and {row["model"] for row in rows} == {"fcos_resnet18_slim"}
    assert rows[0]["params"] == rows[1]["params"] > 0 and rows[0]["macs"] == rows[1]["macs"] > 0
    assert "different models" not in r.output


def test_bench_table_in_a_log_has_one_value_per_cell(files):
    """Outside a terminal each value has its own column (a terminal stacks pairs in one cell)."""
    r = CliRunner().invoke(app, ["bench", str(files["float"]), str(files["int8"]), "-b", "1", "--runs", "1",
                                 "--warmup", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["model", "kind"])
    for name in ("params", "nonzero", "MACs", "p90", "network ms", "mAP" if "mAP" in header else "MACs x", "e2e x"):
        assert name in header, name
    rows = [line.split() for line in lines if line.split()[:1] in (["m.onnx"], ["m.int8.onnx"])]
    assert len(rows) == 2 and all(len(row) == len(rows[0]) for row in rows), lines  # no second line per row
    assert not any(line.strip() and line.split()[0] in ("onnx", "dense") for line in lines), lines
