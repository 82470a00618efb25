"""Recipes validate into dataclasses with clear errors; the prune/inspect CLI maps bad input to one
line and writes checkpoints that reload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import surgery
from cli.main import app
from surgery.config.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from surgery.detectors.builders import list_models
from surgery.errors import RecipeError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
runner = CliRunner()


@pytest.mark.parametrize("name", list_models())
def test_every_builder_has_a_valid_recipe(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.model.name == name
    assert 0 < recipe.prune.ratio < 1


def test_recipe_errors_name_file_key_and_allowed(tmp_path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("version: 1\nprune:\n  ratoi: 0.5\n")
    with pytest.raises(RecipeError, match=r"r.yaml.*'prune.ratoi'.*did you mean 'ratio'"):
        load_recipe(bad)
    bad.write_text("prune:\n  ratio: 1.5\n")
    with pytest.raises(RecipeError, match=r"'prune.ratio' \(got 1.5\): expected a number strictly between 0 and 1"):
        load_recipe(bad)
    bad.write_text("train:\n  steps: many\n")
    with pytest.raises(RecipeError, match="'train.steps'.*an integer"):
        load_recipe(bad)
    bad.write_text("version: 7\n")
    with pytest.raises(RecipeError, match="version 7"):
        load_recipe(bad)
    bad.write_text("prune: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_and_roundtrip() -> None:
    r = apply_overrides(Recipe(), {"prune.ratio": 0.3, "prune.anchors": {"keep_sizes": [0]}, "train.lr": None})
    assert r.prune.ratio == 0.3 and r.prune.anchors.keep_sizes == [0]
    assert recipe_from_dict(r.to_dict()).to_dict() == r.to_dict()


def test_an_amount_flag_replaces_the_recipes_amount_and_a_recipes_sensitivity_allocation_yields_to_it() -> None:
    """``--ratio`` on a recipe with ``prune.target_macs`` cuts by the ratio (it used to be ignored: the
    recipe's MACs target won); a recipe's sensitivity allocation, which spreads MACs budgets only,
    leaves a ratio, parameter or latency flag to the uniform allocation, and spreads ``--keep-macs``."""
    from surgery.pruning.budget import CutRatio, KeepLatency, KeepMacs, KeepParams, Sensitivity, budget_of

    plain = recipe_from_dict({"prune": {"target_macs": 0.5}})
    sens = recipe_from_dict({"prune": {"target_macs": 0.25, "allocation": "sensitivity", "sensitivity": "label-free"}})
    cases = [
        (plain, {"prune.ratio": 0.3}, CutRatio),
        (plain, {"prune.target_params": 0.4}, KeepParams),
        (plain, {"prune.target_macs": 0.4}, KeepMacs),
        (sens, {"prune.ratio": 0.3}, CutRatio),
        (sens, {"prune.target_latency": 0.5}, KeepLatency),
        (sens, {"prune.target_macs": 0.4}, Sensitivity),
        (sens, {}, Sensitivity),
    ]
    for recipe, flags, kind in cases:
        budget = budget_of(apply_overrides(recipe, flags).prune, 128)
        assert type(budget) is kind, (flags, budget)
    assert budget_of(apply_overrides(plain, {"prune.ratio": 0.3}).prune, 128).ratio == 0.3
    assert budget_of(apply_overrides(sens, {"prune.target_macs": 0.4}).prune, 128).keep_macs == 0.4
    with pytest.raises(RecipeError, match="target_macs"):  # naming the allocation keeps it, and its need of a MACs budget
        apply_overrides(sens, {"prune.ratio": 0.3, "prune.allocation": "sensitivity"})


def _one_clear_line(code: int, output: str) -> str:
    assert code == 2, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert lines[0].startswith("error:"), output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["prune", "--model", "retinanet_resnet50_fpx"], "unknown model 'retinanet_resnet50_fpx'. Did you mean"),
        (["prune", "--model", "fcos_resnet18_slim", "--ratio", "1.5"], "expected a number strictly between 0 and 1"),
        (["prune", "--model", "missing/ckpt.pt"], "does not exist"),
        (["prune", "--model", "fcos_resnet18_slim", "--skip", "backbone.nope"], "matches no layer"),
        (["prune", "--model", "fcos_resnet18_slim", "--method", "l7"], "method"),
        (["prune", "--model", "nosuchpkg.mod:fn"], "--trust-code"),
        (["prune", "--model", "nosuchpkg.mod:fn", "--trust-code"], "cannot import"),
        (["prune", "--model", "fcos_resnet18_slim", "--recipe", "nowhere.yaml"], "does not exist"),
    ],
)
def test_bad_input_gives_one_clear_line(args: list[str], expected: str, tmp_path) -> None:
    # through the real entry point, which maps known errors to one line
    proc = subprocess.run(
        [sys.executable, "-m", "surgery", *args, "--out", str(tmp_path / "o.pt")],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"}, cwd=tmp_path,
    )
    line = _one_clear_line(proc.returncode, proc.stderr + proc.stdout)
    assert expected in line, line
    assert not (tmp_path / "o.pt").exists()


def test_corrupt_checkpoint_is_one_clear_line(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(surgery.SurgeryError, match="corrupt"):
        surgery.load(bad)
    torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(surgery.SurgeryError, match="not a surgery checkpoint"):
        surgery.load(tmp_path / "plain.pt")


def test_cli_prune_inspect_and_reprune(tmp_path) -> None:
    out = tmp_path / "p.pt"
    res = runner.invoke(app, ["prune", "--model", "fcos_resnet18_slim", "-k", "min_size=128", "-k", "max_size=128",
                              "--ratio", "0.5", "--round-to", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "params" in res.output and out.exists()
    model = surgery.load(out)
    ckpt = surgery.storage.checkpoint.read_checkpoint(out)
    assert ckpt.kind == "structured" and ckpt.plan.ratio == 0.5
    assert ckpt.plan.pruned_channels > 0 and ckpt.recipe["prune"]["round_to"] == 8
    assert sum(p.numel() for p in model.parameters()) == ckpt.plan.params_after
    # a checkpoint is accepted wherever a model is: prune it again, and inspect it
    out2 = tmp_path / "p2.pt"
    res = runner.invoke(app, ["prune", "--model", str(out), "--ratio", "0.5", "--out", str(out2)])
    assert res.exit_code == 0, res.output
    again = surgery.load(out2)
    assert sum(p.numel() for p in again.parameters()) < ckpt.plan.params_after * 0.5
    res = runner.invoke(app, ["inspect", "--model", str(out2)])
    assert res.exit_code == 0 and "output layers" in res.output
    # masked pruning through the same command
    out3 = tmp_path / "m.pt"
    res = runner.invoke(app, ["prune", "--model", "fcos_resnet18_slim", "--method", "magnitude", "--sparsity", "0.8", "--out", str(out3)])
    assert res.exit_code == 0, res.output
    ck = surgery.storage.checkpoint.read_checkpoint(out3)
    assert ck.kind == "masked" and ck.masks
    m = surgery.load(out3)
    w = m.backbone.body.layer1[0].conv1.weight
    assert abs((w == 0).float().mean().item() - 0.8) < 0.01
