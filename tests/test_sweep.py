"""A tiny sweep runs end to end, writes every artefact, and a re-run resumes."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from surgery.config.recipe import recipe_from_dict
from surgery.measure.bench import BENCH_COLUMNS
from surgery.sweep import SWEEP_COLUMNS, run_sweep


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return recipe_from_dict({
        "model": {"name": "fcos_resnet18_slim", "kwargs": {"num_classes": 5, "min_size": 64, "max_size": 64}},
        "data": {"source": "synthetic", "images": 16, "size": 64, "root": str(root / "data")},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2},
        "retrain": {"steps": 2, "batch_size": 4, "warmup_steps": 0},
        "sweep": {"ratios": [0.5], "sparsities": [0.8], "out": str(root / "out"), "int8": "smallest", "calib_batches": 1,
                  "int8_form": "qdq-per-channel"},  # the form choice is test_int8_forms' subject
        "bench": {"input_size": 64, "batch_sizes": [1], "runs": 2, "warmup": 1},
    }), root / "out"


@pytest.fixture(scope="module")
def tiny_sweep(tiny_recipe):
    """The first run of the tiny sweep, shared by the tests below (each also passes when run alone)."""
    recipe, out = tiny_recipe
    return recipe, out, run_sweep(recipe)


def test_tiny_sweep_end_to_end_and_resume(tiny_sweep) -> None:
    recipe, out, res = tiny_sweep
    assert not res.skipped
    for name in ("results.csv", "results.md", "bench.csv", "state.json", "dense.pt", "control.pt"):
        assert (out / name).is_file(), name
    for key in ("map_vs_macs", "latency_vs_ratio", "layer_widths", "detections"):
        assert res.plots[key].is_file() and res.plots[key].stat().st_size > 1000, key

    with open(res.csv) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == SWEEP_COLUMNS
        rows = {r["variant"]: r for r in reader}
    # dense, structured at 0.5, masked matched to the structured parameter count, masked at 0.8
    assert len(rows) == 4 and {"dense", "l1-cut0.5", "masked-zero0.8"} <= set(rows)
    dense, l1 = rows["dense"], rows["l1-cut0.5"]
    masked = [r for v, r in rows.items() if v.startswith("masked")]
    assert int(l1["params"]) < 0.5 * int(dense["params"]) and float(l1["macs_ratio"]) < 0.5
    for m in masked:
        assert int(m["params"]) == int(dense["params"]) and int(m["params_nonzero"]) < int(dense["params"])
        assert float(m["macs_ratio"]) == pytest.approx(1.0)
    matched = min(masked, key=lambda r: abs(int(r["params_nonzero"]) - int(l1["params"])))
    assert abs(int(matched["params_nonzero"]) - int(l1["params"])) < 0.02 * int(dense["params"])
    for r in rows.values():
        for k in ("map_pruned", "map_retrained", "dense_control_map"):
            assert 0.0 <= float(r[k]) <= 1.0
    with open(res.bench_csv) as f:
        assert tuple(csv.DictReader(f).fieldnames) == BENCH_COLUMNS
    assert "| method |" in res.markdown.read_text()
    # the deployment table: dense control and the structured variant, FP32 and INT8 PTQ in ONNX Runtime
    with open(out / "deploy.csv") as f:
        deploy = list(csv.DictReader(f))
    assert [(r["checkpoint"], r["precision"]) for r in deploy] == [
        ("control", "fp32"), ("control", "int8-ptq"), ("l1-cut0.5", "fp32"), ("l1-cut0.5", "int8-ptq")]
    for fp, q in (deploy[:2], deploy[2:]):
        assert int(q["file_bytes"]) < 0.5 * int(fp["file_bytes"]) and int(q["quantized_nodes"]) > 10
        assert float(q["latency_ms"]) > 0 and float(fp["network_ms"]) > 0
    assert "## Deployment: FP32 vs INT8" in res.markdown.read_text()

    # a re-run skips every finished step and gives the same table
    res2 = run_sweep(recipe)
    assert {"dense", "control", "l1-cut0.5:prune", "l1-cut0.5:retrain"} <= set(res2.skipped)
    assert [r["map_retrained"] for r in res2.rows] == [r["map_retrained"] for r in res.rows]


def test_interrupted_sweep_redoes_only_missing_steps(tiny_sweep) -> None:
    recipe, out, _ = tiny_sweep
    state = json.loads((out / "state.json").read_text())
    # simulate a run killed during the structured retrain: its checkpoint and record are gone
    (out / "l1-cut0.5.pt").unlink()
    res = run_sweep(recipe)
    assert "l1-cut0.5:retrain" not in res.skipped and "l1-cut0.5:prune" in res.skipped
    assert "dense" in res.skipped and (out / "l1-cut0.5.pt").is_file()
    assert set(json.loads((out / "state.json").read_text())["steps"]) == set(state["steps"])


def test_sweep_techniques_at_a_macs_target(tmp_path) -> None:
    """l1, l1+distill and taylor+progressive at 50% of the dense MACs, one step budget for all."""
    from surgery.pruning.plan import plan_chain
    from surgery.storage.checkpoint import load, read_checkpoint

    recipe = recipe_from_dict({
        "model": {"name": "fcos_resnet18_slim", "kwargs": {"num_classes": 5, "min_size": 64, "max_size": 64}},
        "data": {"source": "synthetic", "images": 16, "size": 64, "root": str(tmp_path / "data")},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "retrain": {"steps": 3, "batch_size": 4, "warmup_steps": 0, "distill": {"type": "none", "weight": 2.0}},
        "prune": {"steps": 2, "calib_batches": 1, "min_channels": 4},
        "sweep": {"ratios": [], "target_macs": [0.5], "techniques": ["l1", "l1+distill", "taylor+progressive"],
                  "sparsities": [], "match_masked": False, "out": str(tmp_path / "out")},
        "bench": {"input_size": 64, "batch_sizes": [1], "runs": 2, "warmup": 1},
    })
    res = run_sweep(recipe)
    rows = {r["variant"]: r for r in res.rows}
    assert set(rows) == {"dense", "l1-keep-macs0.5", "l1+distill-keep-macs0.5", "taylor+progressive-keep-macs0.5"}
    for name in ("l1-keep-macs0.5", "l1+distill-keep-macs0.5"):
        assert abs(rows[name]["macs_ratio"] - 0.5) <= 0.02 * 0.5 + 0.005, rows[name]["macs_ratio"]
    assert abs(rows["taylor+progressive-keep-macs0.5"]["macs_ratio"] - 0.5) <= 0.05
    assert all(r["retrain_seconds"] > 0 for r in rows.values())
    out = res.out
    # distillation ran (its adaptation layers are in the training state, not in the model)
    distilled = read_checkpoint(out / "l1+distill-keep-macs0.5.pt")
    assert "FeatureImitation:0" in distilled.train_state["hooks"]
    assert set(distilled.state_dict) == set(read_checkpoint(out / "l1-keep-macs0.5.pt").state_dict)
    # progressive: two cuts, the 3-step budget split 1 + 2, a plan chain that reloads
    final = read_checkpoint(out / "taylor+progressive-keep-macs0.5.pt")
    chain = plan_chain(final.plan)
    assert [p.kind for p in chain] == ["structured", "structured"] and [p.method for p in chain] == ["taylor"] * 2
    assert chain[1].source.endswith("dense.pt") and chain[0].source.endswith(".r1.pt")
    assert read_checkpoint(out / "taylor+progressive-keep-macs0.5.r1.pt").train_state["step"] == 1
    assert final.train_state["step"] == 2
    model = load(out / "taylor+progressive-keep-macs0.5.pt")
    assert sum(p.numel() for p in model.parameters()) == chain[0].params_after


def test_a_sensitivity_recipe_spreads_the_sweeps_macs_targets_and_cuts_its_ratio_points_uniformly() -> None:
    """The table spreads a MACs budget; a sweep's ratio points of the same recipe are uniform cuts
    (a sensitivity budget without a MACs target could not be built)."""
    from types import SimpleNamespace

    from surgery.config.recipe import Technique
    from surgery.pruning.budget import CutRatio, Sensitivity, budget_of
    from surgery.sweep import _structured_round

    recipe = recipe_from_dict({"prune": {"target_macs": 0.25, "allocation": "sensitivity", "sensitivity": "label-free"}})
    run = SimpleNamespace(recipe=recipe)
    tech = Technique(text="l1", criterion="l1")
    kinds = {}
    for point in ({"ratio": 0.3}, {"target_macs": 0.5}):
        args = _structured_round(run, tech, point, 1, "v")(1)
        section = dataclasses.replace(recipe.prune, **args)
        section.validate()
        kinds[next(iter(point))] = type(budget_of(section, 128))
    assert kinds == {"ratio": CutRatio, "target_macs": Sensitivity}
