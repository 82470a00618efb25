"""Hostile ONNX files, built in a few lines with ``onnx.helper``: a declared input of 200000 x 200000
pixels, ``surgery.*`` metadata of the wrong type or range, a parameter count that lies, and an ONNX
file handed to what takes checkpoints. Each is one clear error or the right number."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.extras import require

onnx = require("onnx")
from onnx import TensorProto, helper  # noqa: E402

from surgery.deployment.runtime import OnnxDetector, RuntimeUnavailable  # noqa: E402
from surgery.errors import CheckpointError, SurgeryError  # noqa: E402


def tiny_detector(path: Path, *, shape=(3, "H", "W"), meta: dict[str, str] | None = None, weights=(10, 100)) -> Path:
    """A 'detector' of one box whose score is the image mean (+ 0 x the sum of a weights tensor of
    shape ``weights``, so the file holds prod(weights) parameters)."""
    import numpy as np

    w = helper.make_tensor("w", TensorProto.FLOAT, list(weights), np.zeros(weights, np.float32).ravel().tolist())
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], keepdims=0),
        helper.make_node("ReduceSum", ["w"], ["ws"], keepdims=0),
        helper.make_node("Add", ["m", "ws"], ["s0"]),
        helper.make_node("Unsqueeze", ["s0", "axis0"], ["scores"]),
        helper.make_node("Constant", [], ["boxes"], value=helper.make_tensor("b", TensorProto.FLOAT, [1, 4], [1, 2, 10, 12])),
        helper.make_node("Constant", [], ["labels"], value=helper.make_tensor("l", TensorProto.INT64, [1], [1])),
    ]
    axis0 = helper.make_tensor("axis0", TensorProto.INT64, [1], [0])
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, [1])],
        initializer=[w, axis0],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=f"surgery.{k}", value=v)
    onnx.save(model, str(path))
    return path


def test_the_tiny_file_runs(tmp_path) -> None:
    import torch

    det = OnnxDetector(tiny_detector(tmp_path / "ok.onnx", meta={"params": "1001", "model": "tiny"}))
    out = det([torch.full((3, 20, 30), 0.25)])[0]
    assert out["boxes"].tolist() == [[1, 2, 10, 12]] and abs(float(out["scores"][0]) - 0.25) < 1e-6


@pytest.mark.parametrize("shape", [(3, 200000, 200000), (3, 0, 64), (4, 64, 64)])
def test_absurd_input_shapes_are_refused_before_any_image(tmp_path, shape) -> None:
    path = tiny_detector(tmp_path / "big.onnx", shape=shape)
    with pytest.raises(RuntimeUnavailable) as e:
        OnnxDetector(path)
    assert str(list(shape)) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "key,value",
    [("recipe", "{not json"), ("recipe", "[1, 2]"), ("class_names", '{"a": 1}'), ("class_names", "[1, 2]"),
     ("params_nonzero", "nan"), ("params", "-7"), ("macs", "-7"), ("macs", "1e30"), ("ratio", "1.5"),
     ("ratio", "nan"), ("num_classes", "0"), ("num_classes", "x"), ("input_size", "200000")],
)  # fmt: skip
def test_bad_metadata_is_one_line(tmp_path, key, value) -> None:
    path = tiny_detector(tmp_path / "lie.onnx", meta={key: value})
    with pytest.raises(CheckpointError, match=f"surgery.{key}") as e:
        OnnxDetector(path)
    assert "\n" not in str(e.value)


def test_params_are_read_from_the_initializers(tmp_path) -> None:
    from surgery.config.recipe import BenchSection
    from surgery.deployment.export import onnx_parameter_count
    from surgery.measure.bench import _load_subject

    path = tiny_detector(tmp_path / "lie.onnx", meta={"params": "1", "params_nonzero": "1", "macs": "5"}, weights=(7, 11))
    assert onnx_parameter_count(path) == 7 * 11 + 1  # the weights and the Unsqueeze axis
    subject = _load_subject(path, BenchSection(), None, tmp_path)
    assert subject.info["params"] == 78 and subject.info["params_nonzero"] == 78
    assert any("metadata says 1 parameters" in n for n in subject.info["notes"])


def test_an_onnx_file_where_a_checkpoint_is_expected_says_so(tmp_path) -> None:
    import surgery

    path = tiny_detector(tmp_path / "model.onnx")
    with pytest.raises(SurgeryError, match="is an ONNX export, not a surgery checkpoint"):
        surgery.load(path)
