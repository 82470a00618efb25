"""The pruning pipeline (surgery.pruning.prune, surgery.pruning.budget): budgets reach their allocator by type,
flag combinations apply or are refused, recovery runs inside the pipeline, the pipeline imports
nothing of ONNX/Ultralytics/datasets, and the Python API gives what the CLI gives."""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import surgery
import surgery.pruning.prune as pipeline
from cli.main import app
from surgery.config.recipe import PruneSection
from surgery.detectors.builders import ModelSpec, build_model
from surgery.errors import PruningError, SurgeryError
from surgery.pruning.allocate import Allocation
from surgery.pruning.budget import (
    CutRatio,
    KeepLatency,
    KeepMacs,
    KeepParams,
    Recovery,
    Sensitivity,
    from_config,
)
from surgery.pruning.prune import inspect_model, prune_model, prune_to
from surgery.pruning.sensitivity import COLUMNS
from surgery.storage.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
SLIM = {"num_classes": 5, "min_size": SIZE, "max_size": SIZE}


def _slim() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fcos_resnet18_slim", **SLIM)


def test_importing_the_pipeline_loads_no_onnx_ultralytics_or_datasets() -> None:
    code = ("import sys\nimport surgery.pruning.prune\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'onnx', 'ultralytics') or m in "
            "('surgery.deployment.export', 'surgery.deployment.onnx_io', 'surgery.deployment.quantize', 'surgery.deployment.runtime', 'surgery.pruning.latency_table', "
            "'surgery.measure.split', 'surgery.yolo.ultralytics_adapter', 'surgery.data', 'surgery.data.synth')]\n"
            "print('LOADED', bad)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("LOADED []"), out.stdout


@pytest.mark.parametrize("section,budget_type", [
    (PruneSection(ratio=0.3), CutRatio),
    (PruneSection(target_macs=0.5), KeepMacs),
    (PruneSection(target_params=0.5), KeepParams),
    (PruneSection(target_latency=0.5, runtime="torch"), KeepLatency),
    (PruneSection(allocation="sensitivity", target_macs=0.5, sensitivity="s.csv"), Sensitivity),
])
def test_prune_model_reaches_each_allocator_by_budget_type(monkeypatch: pytest.MonkeyPatch, section: PruneSection,
                                                           budget_type: type) -> None:
    section.validate()
    seen = []

    def spy(candidates, scores, budget, rounding):  # noqa: ANN001, ANN202 - an allocator
        seen.append(budget)
        return Allocation(plan={}, ratio=0.0)

    for t in pipeline.ALLOCATORS:  # every other allocator fails the test if it is reached
        monkeypatch.setitem(pipeline.ALLOCATORS, t, spy if t is budget_type else None)
    prune_model(_slim(), section, trace_size=SIZE, macs_input_size=SIZE)
    assert len(seen) == 1 and type(seen[0]) is budget_type


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    if isinstance(res.exception, SurgeryError):
        return 2, f"error: {res.exception}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.output


@pytest.mark.parametrize("flags,named", [
    (["--sparsity", "0.3"], "--sparsity"),
    (["--method", "magnitude", "--cut-ratio", "0.2"], "--cut-ratio"),
    (["--sensitivity", "s.csv"], "--sensitivity"),
    (["--method", "magnitude", "--global"], "--global"),
    (["--scope", "global"], "--scope"),
    (["--macs-size", "0"], "--macs-size"),
    (["-k", "num_classes=3"], "given twice"),
    (["--cut-ratio", "0.3", "--keep-macs", "0.5"], "--keep-macs"),
    (["--runtime", "torch"], "--runtime"),
    (["--keep-latency", "0.5", "--global"], "--global"),
    (["--calib-batches", "2"], "--calib-batches"),
    (["--allocation", "sensitivity", "--sensitivity", "s.csv", "--keep-macs", "0.5", "--override", "head*=0.2"],
     "--override"),
])
def test_ignored_flag_combinations_are_refused_with_one_line(tmp_path: Path, flags: list[str], named: str) -> None:
    code, out = _run("prune", "--model", "fcos_resnet18_slim", "-k", "num_classes=5", *flags,
                     "--out", str(tmp_path / "p.pt"))
    assert code == 2 and named in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "p.pt").exists()


def test_masked_sparsity_flag_applies(tmp_path: Path) -> None:
    code, out = _run("prune", "--model", "fcos_resnet18_slim", "-k", "num_classes=5", "--method", "magnitude",
                     "--sparsity", "0.3", "--out", str(tmp_path / "m.pt"))
    assert code == 0, out
    _, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.plan.sparsity == pytest.approx(0.3)
    zeros = sum(int((m == 0).sum()) for m in ckpt.masks.values())
    assert zeros / sum(m.numel() for m in ckpt.masks.values()) == pytest.approx(0.3, abs=0.01)


def test_from_config_refuses_a_sensitivity_table_without_its_allocation() -> None:
    with pytest.raises(PruningError, match="prune.sensitivity"):
        from_config(PruneSection(sensitivity="s.csv", target_macs=0.5), macs_input_size=SIZE)


def _sensitivity_csv(path: Path, roots: list[str]) -> Path:
    """A table where the first groups lose little mAP per MAC and the last lose much."""
    lines = [",".join(COLUMNS), f"k,dense,0.0,0,0,{10**6},1.0,0.5,0.8,0"]
    for i, root in enumerate(roots):
        for r in (0.25, 0.5, 0.75):
            macs = int(10**6 * (1 - 0.05 * r))
            lines.append(f"k,{root},{r},64,0,{macs},{macs / 10**6},{0.5 - (0.01 + 0.1 * i) * r},0.8,0")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sensitivity_plan_is_the_same_through_the_api_and_the_cli(tmp_path: Path) -> None:
    spec = ModelSpec("fcos_resnet18_slim", dict(SLIM))
    dense = save_checkpoint(tmp_path / "dense.pt", _slim(), spec)
    roots = [g.root for g in inspect_model(surgery.load(dense), trace_size=SIZE).groups if g.prunable][:6]
    table = _sensitivity_csv(tmp_path / "s.csv", roots)
    code, out = _run("prune", "--model", str(dense), "--allocation", "sensitivity", "--sensitivity", str(table),
                     "--keep-macs", "0.9", "--macs-size", str(SIZE), "--out", str(tmp_path / "p.pt"))
    assert code == 0, out
    _, ckpt = load_checkpoint(tmp_path / "p.pt")
    result = prune_to(surgery.load(dense), Sensitivity(str(table), keep_macs=0.9, input_size=SIZE))
    cli_plan = {g["root"]: g["pruned"] for g in ckpt.plan.groups}
    api_plan = {g["root"]: g["pruned"] for g in result.plan.groups}
    assert api_plan == cli_plan and any(api_plan.values())
    assert ckpt.plan.extra["allocation"]["kind"] == "sensitivity"


def test_recovery_runs_inside_the_pipeline_by_method_name(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [[torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)] for _ in range(2)]
    res = prune_to(_slim(), CutRatio(0.5), data=batches, recovery=Recovery(2), trace_size=SIZE)
    assert res.recovery.batches == 2 and res.recovery.refit
    assert res.plan.extra["recovery"]["layers_refit"] == len(res.recovery.refit)
    calls = []
    monkeypatch.setitem(pipeline.RECOVERY_METHODS, "spy",
                        lambda dense, pruned, kept, data, recovery: calls.append((kept, recovery.batches)))
    prune_to(_slim(), CutRatio(0.5), data=batches, recovery=Recovery(1, method="spy"), trace_size=SIZE)
    assert len(calls) == 1 and calls[0][0] and calls[0][1] == 1
    with pytest.raises(PruningError, match="unknown recovery method"):
        prune_to(_slim(), CutRatio(0.5), data=batches, recovery=Recovery(1, method="nope"), trace_size=SIZE)
    with pytest.raises(PruningError, match="calibration batches"):
        prune_to(_slim(), CutRatio(0.5), recovery=Recovery(1), trace_size=SIZE)


def test_budgets_refuse_impossible_values() -> None:
    for bad in (lambda: KeepMacs(1.5, 320), lambda: KeepMacs(0.5, 0), lambda: CutRatio(0.0),
                lambda: KeepLatency(0.5, runtime="tflite"), lambda: Recovery(0)):
        with pytest.raises(PruningError):
            bad()


def test_python_api_docs_example_runs() -> None:
    text = (ROOT / "docs" / "reference" / "python-api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/reference/python-api.md", "exec"), {})  # noqa: S102 - the documented example
    failed, tried = doctest.testmod(pipeline, verbose=False)[:2]
    assert tried > 0 and failed == 0
