"""INT8 forms (surgery.deployment.quantize.FORMS): each writes the operators it names, and ``auto`` keeps
the fastest of what it measured (no wall-clock assertion: the choice is checked against the
timings it returns)."""

from __future__ import annotations

import onnx
import pytest
import torch

from surgery.deployment.export import export_onnx
from surgery.deployment.quantize import FORMS, choose_form, quantize_onnx
from surgery.detectors.builders import build_model
from tests.extras import require

require("onnxruntime")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=3, min_size=64, max_size=64).eval()
    path = tmp_path_factory.mktemp("int8") / "float.onnx"
    export_onnx(model, path, 64, verify=False)
    calib = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return model, path, calib


def _ops(path) -> dict[str, int]:  # noqa: ANN001
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("form", FORMS)
def test_each_form_writes_its_operators(small, tmp_path, form: str) -> None:  # noqa: ANN001
    model, path, calib = small
    res = quantize_onnx(path, tmp_path / "q.onnx", model, calib, input_size=64, form=form)
    ops = _ops(res.path)
    assert res.form == form and res.quantized_nodes > 0
    if form.startswith("qoperator"):
        assert ops.get("QLinearConv", 0) > 0  # int8 convolutions as operators
    else:
        assert ops.get("QLinearConv", 0) == 0 and ops.get("DequantizeLinear", 0) > 0
    # per-tensor weights: every weight scale is a scalar; per-channel: at least one vector
    proto = onnx.load(str(res.path))
    inits = {i.name: i for i in proto.graph.initializer}
    scales = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "QLinearConv"]
    scales += [inits[n.input[1]] for n in proto.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dims
               and len(inits[n.input[0]].dims) == 4]
    if form.startswith("qoperator"):
        scales = [inits[n.input[4]] for n in proto.graph.node if n.op_type == "QLinearConv"]
    assert scales
    vector = any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)
    assert vector == form.endswith("per-channel")


def test_unknown_form_is_one_clear_error(small, tmp_path) -> None:  # noqa: ANN001
    from surgery.deployment.quantize import QuantizeError

    model, path, calib = small
    with pytest.raises(QuantizeError, match="unknown INT8 form"):
        quantize_onnx(path, tmp_path / "q.onnx", model, calib, input_size=64, form="qdq-per-row")
    assert not (tmp_path / "q.onnx").exists()


def test_auto_keeps_the_fastest_measured_form(small) -> None:  # noqa: ANN001
    model, path, calib = small
    best, ms, agree = choose_form(path, model, calib, input_size=64, candidates=FORMS[:2] + FORMS[2:3], rounds=1,
                                  runs=2, verify_images=calib[:1])
    assert set(ms) == set(FORMS[:3])
    eligible = [f for f in ms if agree[f] >= max(agree.values()) - 0.02]
    assert best == min(eligible, key=lambda f: ms[f])


def _written_form(path) -> str:  # noqa: ANN001
    """The INT8 form of a written file, read from its operators and weight scales alone."""
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    qlinear = [n for n in proto.graph.node if n.op_type == "QLinearConv"]
    if qlinear:
        scales = [inits[n.input[4]] for n in qlinear]
    else:
        scales = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] in inits and len(inits[n.input[0]].dims) == 4]
    assert scales, "no INT8 weight in the file"
    vector = any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)
    return f"{'qoperator' if qlinear else 'qdq'}-{'per-channel' if vector else 'per-tensor'}"


@pytest.mark.parametrize("chosen", ["qoperator-per-tensor", "qdq-per-tensor"])
def test_quantize_auto_writes_the_form_it_chose(tmp_path, monkeypatch, chosen: str) -> None:  # noqa: ANN001
    """``surgery quantize --form auto`` writes the form its measurement picked (the timing is
    replaced by a fixed verdict, so the check does not depend on this machine's speed): the file's
    own operators say which form it is."""
    from typer.testing import CliRunner

    import surgery.deployment.quantize as quantize
    from cli.main import app
    from surgery.detectors.builders import ModelSpec
    from surgery.storage.checkpoint import save_checkpoint

    picked: list[str] = []

    def verdict(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        picked.append(chosen)
        return chosen, {f: 1.0 if f == chosen else 2.0 for f in FORMS}, dict.fromkeys(FORMS, 1.0)

    monkeypatch.setattr(quantize, "choose_form", verdict)
    kwargs = {"num_classes": 3, "min_size": 64, "max_size": 64}
    spec = ModelSpec("fcos_resnet18_slim", kwargs)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(spec), spec,
                           recipe={"data": {"root": str(tmp_path / "synth"), "images": 4, "size": 64}})
    out = tmp_path / "m.int8.onnx"
    res = CliRunner().invoke(app, ["quantize", str(ckpt), "--out", str(out), "--form", "auto", "--calib-batches", "1",
                                   "-b", "2", "--verify-images", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert picked == [chosen] and _written_form(out) == chosen
    assert chosen in res.output


def test_the_recipe_lists_the_same_forms() -> None:
    """``sweep.int8_form`` is validated without importing torch, against a copy of the forms."""
    from surgery.config.recipe import INT8_FORMS

    assert INT8_FORMS == ("auto", *FORMS)
