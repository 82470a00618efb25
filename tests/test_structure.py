"""The typed plan, checkpoints written before it, and the workflows the CLI and the sweep share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import surgery
from surgery.config.recipe import Recipe, recipe_from_dict
from surgery.errors import CheckpointError
from surgery.pruning.plan import MaskedPlan, StructuredPlan, plan_chain, plan_from_dict
from surgery.storage.checkpoint import read_checkpoint
from surgery.training.hooks import HookBase
from surgery.workflows import prune_and_save, recipe_for_checkpoint, retrain_checkpoint, train_from_recipe

DATA = Path(__file__).parent / "data"


def test_checkpoint_written_by_0_1_still_loads_with_the_same_outputs():
    ckpt = read_checkpoint(DATA / "v1_structured.ckpt")
    assert isinstance(ckpt.plan, StructuredPlan) and ckpt.plan.pruned_channels > 0
    assert "history" not in ckpt.plan.to_dict()  # never replayed: dropped on read
    model = surgery.load(DATA / "v1_structured.ckpt").eval()
    expected = torch.load(DATA / "v1_structured.expected.ckpt", weights_only=True)
    with torch.no_grad():
        feats = model.backbone(expected["image"])
    assert list(feats) == list(expected["features"])
    for k, v in expected["features"].items():
        torch.testing.assert_close(feats[k], v, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == ckpt.plan.params_after


def test_plan_round_trip_chain_and_bad_plans():
    masked = MaskedPlan(sparsity=0.5, scope="global", source="dense.pt")
    plan = StructuredPlan(ratio=0.3, groups=[{"index": 0, "pruned": [1, 2]}], widths_after={"a": 4},
                          extra={"future_key": 1}, previous=masked)
    back = plan_from_dict(plan.to_dict())
    assert back == plan and back.pruned_channels == 2
    assert [p.kind for p in plan_chain(back)] == ["structured", "masked"]
    assert plan_from_dict({"method": "magnitude", "sparsity": 0.8}).kind == "masked"  # a 0.1 masked plan
    with pytest.raises(CheckpointError, match="plan"):
        plan_from_dict([1, 2])
    with pytest.raises(CheckpointError, match="groups"):
        plan_from_dict({"method": "l1", "groups": "x"})


def _recipe(tmp_path: Path) -> Recipe:
    return recipe_from_dict({
        "model": {"name": "fcos_resnet18_slim", "kwargs": {"min_size": 64, "max_size": 64}},
        "data": {"source": "synthetic", "root": str(tmp_path / "synth"), "images": 16, "size": 64},
        "prune": {"ratio": 0.5, "min_channels": 4},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
        "retrain": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
    }, "test")


def test_workflows_train_prune_retrain_chain(tmp_path: Path):
    rec = _recipe(tmp_path)
    steps, notes = [], []

    class LossTerm(HookBase):  # a hook adds a loss term and a module the optimizer trains
        def __init__(self) -> None:
            self.scale = torch.nn.Linear(1, 1, bias=False)

        def modules(self):
            return [self.scale]

        def loss_terms(self, trainer, images, targets):
            return {"extra": self.scale.weight.square().sum() * 0.1}

    term = LossTerm()
    before = term.scale.weight.detach().clone()
    cb = surgery.workflows.Callbacks(on_step=steps.append, on_note=notes.append)
    dense = train_from_recipe(rec, tmp_path / "dense.pt", evaluate=False, callbacks=cb, hooks=[term])
    assert dense.result.steps == 2 and "extra" in dense.result.losses and len(steps) == 2
    assert not torch.equal(term.scale.weight, before)  # the hook's module was optimized
    ck = read_checkpoint(dense.out)
    assert ck.spec.kwargs["num_classes"] == 5 and not any(k.startswith("scale") for k in ck.state_dict)

    pruned = prune_and_save(str(dense.out), rec, tmp_path / "p.pt")
    plan = read_checkpoint(pruned.path).plan
    assert plan.source == str(dense.out) and plan.previous is None
    assert plan.params_after < plan.params_before

    rec2 = recipe_for_checkpoint(read_checkpoint(pruned.path), None, {"retrain.steps": 3})
    assert rec2.retrain.steps == 3 and rec2.model.name == "fcos_resnet18_slim"
    out = retrain_checkpoint(pruned.path, rec2, tmp_path / "rt.pt", evaluate=False, callbacks=cb)
    assert out.result.steps == 3 and out.result.kind == "structured"
    assert any("retraining" in n for n in notes)
    model, ck = surgery.load_checkpoint(out.out)
    assert ck.plan.params_after == sum(p.numel() for p in model.parameters())

    masked = prune_and_save(str(out.out), recipe_from_dict({**rec.to_dict(), "prune": {"method": "magnitude",
                                                                                        "sparsity": 0.6}}, "t"),
                            tmp_path / "m.pt")
    chain = plan_chain(read_checkpoint(masked.path).plan)
    assert [p.kind for p in chain] == ["masked", "structured"]


def test_cli_train_logs_plain_step_lines_outside_a_terminal(tmp_path: Path):
    """Piped output (CI, nohup, a log file) gets periodic plain step lines, not an empty bar."""
    import os
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: fcos_resnet18_slim, kwargs: {min_size: 64, max_size: 64}}\n"
        f"data: {{root: {tmp_path / 'synth'}, images: 16, size: 64}}\n"
        "train: {steps: 4, batch_size: 4, warmup_steps: 1, log_every: 2}\n"
    )
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "surgery", "train", "-r", str(recipe), "--no-eval",
                           "--out", str(tmp_path / "m.pt")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/4", "4/4"]
    assert all("loss" in ln and "lr" in ln and "img/s" in ln and "eta" in ln for ln in lines)
