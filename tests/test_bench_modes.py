"""bench's GPU modes (CUDA graphs, torch.compile, half precision) where a CPU can test them: the
option plumbing, the refusals, and the network modules restored after each mode. The CUDA runs
themselves are in tests/test_gpu.py (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from surgery.config.recipe import RecipeError, recipe_from_dict
from surgery.detectors.builders import build_model
from surgery.errors import MeasureError
from surgery.measure.split import accelerated_network, record_calls

SIZE = 64


@pytest.fixture(scope="module")
def model_and_calls():
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=3, min_size=SIZE, max_size=SIZE).eval()
    return model, record_calls(model, [torch.rand(3, SIZE, SIZE)])


def test_cuda_graphs_refuse_cpu_tensors_in_one_line(model_and_calls) -> None:
    model, calls = model_and_calls
    with pytest.raises(MeasureError, match="not on a CUDA device"):
        with accelerated_network(calls, "cuda-graphs"):
            pass
    assert "forward" not in model.backbone.__dict__ and "forward" not in model.head.__dict__  # restored


def test_compile_modes_wrap_the_network_modules_and_restore_them(model_and_calls) -> None:
    model, calls = model_and_calls
    for mode in ("default", "reduce-overhead"):
        with accelerated_network(calls, mode):  # compiled lazily: nothing is compiled until a call
            assert "forward" in model.backbone.__dict__ and "forward" in model.head.__dict__
        assert "forward" not in model.backbone.__dict__ and "forward" not in model.head.__dict__
    with accelerated_network(calls, "none"):
        assert "forward" not in model.backbone.__dict__
    with pytest.raises(MeasureError, match="compile mode 'jit'"):
        with accelerated_network(calls, "jit"):
            pass


@pytest.mark.parametrize("options,key", [
    ({"compile": "cuda-graphs"}, "compile"),  # CPU: no CUDA graphs
    ({"compile": "reduce-overhead", "device": "cpu"}, "compile"),
    ({"precision": "f16"}, "precision"),  # torch on the CPU runs f32
    ({"compile": "default", "runtime": "onnxruntime"}, "compile"),
])
def test_bench_options_that_cannot_apply_are_refused(options: dict, key: str) -> None:
    with pytest.raises(RecipeError, match=key):
        recipe_from_dict({"bench": options}, "test")


def test_bench_options_for_a_gpu_validate() -> None:
    cfg = recipe_from_dict({"bench": {"device": "cuda", "compile": "cuda-graphs", "precision": "f16"}}, "test").bench
    assert (cfg.compile, cfg.precision) == ("cuda-graphs", "f16")


def test_bench_cli_passes_compile_and_precision(monkeypatch) -> None:
    import cli.bench_cmd as bench_cmd
    import surgery.measure.bench as bench

    seen = {}

    def fake(paths, cfg, **kw):
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(bench, "bench_checkpoints", fake)
    monkeypatch.setattr(bench_cmd, "_print_table", lambda rows, cfg: None)
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["bench", "x.pt", "--runtime", "openvino", "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    assert (seen["cfg"].runtime, seen["cfg"].precision, seen["cfg"].compile) == ("openvino", "bf16", "none")
