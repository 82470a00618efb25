"""benchmarks/recovery_families.py: the merge of a finished sweep, of a sweep stopped before its
report (rebuilt from its state.json: the same numbers as the report would give), and the table."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from surgery.config.recipe import recipe_from_dict
from surgery.sweep import run_sweep

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("recovery_families", ROOT / "benchmarks" / "recovery_families.py")
rf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rf)

NUMERIC = ("achieved_macs_ratio", "map_pruned", "map_recovered", "map_sparse", "map_retrained", "dense_control_map",
           "retained_map", "retrain_steps", "sparse_steps")


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recovery_families")
    recipe = recipe_from_dict({
        "model": {"name": "fcos_resnet18_slim", "kwargs": {"num_classes": 5, "min_size": 64, "max_size": 64}},
        "data": {"source": "synthetic", "images": 16, "size": 64, "root": str(root / "data")},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "retrain": {"steps": 3, "batch_size": 4, "warmup_steps": 0},
        "prune": {"recover": 1, "min_channels": 4, "sparsify": {"steps": 1, "warmup_steps": 0}},
        "sweep": {"ratios": [], "target_macs": [0.5], "techniques": ["l1", "l1+sparse"], "sparsities": [],
                  "match_masked": False, "out": str(root / "fcos")},
        "bench": {"input_size": 64, "batch_sizes": [1], "runs": 2, "warmup": 1},
    })
    return run_sweep(recipe).out


def _same(a: dict[str, str], b: dict[str, str]) -> None:
    for k in NUMERIC:
        assert (a[k] == "") == (b[k] == ""), (k, a[k], b[k])
        if a[k]:
            assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-3), (k, a[k], b[k])
    assert a["target_met"] == b["target_met"] and a["technique"] == b["technique"]


def test_a_stopped_sweep_is_merged_from_its_state_with_the_reports_numbers(swept: Path) -> None:
    full, complete = rf.collect("fcos", swept, "cpu")
    assert complete and [r["technique"] for r in full] == ["l1", "l1+sparse"]
    assert all(r["map_recovered"] != "" for r in full)
    assert full[1]["sparse_steps"] == "1" and full[1]["map_sparse"] != ""
    # the report is older than the state: the sweep ran on after it (and stopped): rebuilt from the state
    later = swept.stat().st_mtime + 10
    os.utime(swept / "state.json", (later, later))
    rebuilt, complete = rf.collect("fcos", swept, "cpu")
    assert not complete
    for a, b in zip(full, rebuilt, strict=True):
        _same(a, b)
    # the last variant's retraining did not finish: that variant is left out, the others kept
    state = json.loads((swept / "state.json").read_text())
    state["steps"]["l1+sparse-keep-macs0.5:retrain"]["started"] = True
    (swept / "state.json").write_text(json.dumps(state))
    rows, complete = rf.collect("fcos", swept, "cpu")
    assert not complete and [r["technique"] for r in rows] == ["l1"]
    _same(rows[0], full[0])
    md = rf.markdown(rows, frozenset({"fcos"}))
    assert "| fcos (partial) | l1 |" in md and "Partial (fcos)" in md


def _row(technique: str, target: str, retained: str, met: str = "True", achieved: str = "") -> dict[str, str]:
    return {"family": "f", "technique": technique, "target_macs": target, "achieved_macs_ratio": achieved,
            "target_met": met, "map_pruned": "0.0", "map_recovered": "0.3", "map_retrained": "0.6",
            "dense_control_map": "0.7", "retained_map": retained}


def test_table_marks_a_missed_target_and_names_the_best_technique_that_met_it() -> None:
    rows = [_row("l1", "0.5", "0.95"), _row("fisher", "0.5", "0.97"), _row("l1", "0.25", "0.90"),
            _row("fisher", "0.25", "0.99", met="False", achieved="0.3")]
    assert rf.best_techniques(rows) == {"f": {0.5: "fisher", 0.25: "l1"}}
    md = rf.markdown(rows)
    assert "| f | fisher | 0.000 | 0.300 | 0.600 | 97.0% | 0.000 | 0.300 | 0.600 | 99.0% (MACs 0.300) |" in md
    assert "f 50% cut fisher, 75% cut l1" in md


def test_a_reused_dense_model_changes_only_the_recipes_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "dense.pt"
    derived = rf.family_recipe("recipes/recovery_retinanet.yaml", tmp_path / "runs" / "retinanet", str(ckpt))
    assert derived.parent == tmp_path / "runs"
    shipped = yaml.safe_load((ROOT / "recipes/recovery_retinanet.yaml").read_text())
    shipped["model"]["weights"] = str(ckpt)
    assert yaml.safe_load(derived.read_text()) == shipped
    assert rf.family_recipe("recipes/recovery_retinanet.yaml", tmp_path / "x", None) == ROOT / "recipes/recovery_retinanet.yaml"


def test_the_model_name_is_read_whole_from_the_sweeps_report(tmp_path: Path) -> None:
    (tmp_path / "results.md").write_text("# ultralytics:yolov8n.yaml: structured vs masked pruning\n\nbody\n")
    assert rf._model_name(tmp_path) == "ultralytics:yolov8n.yaml"
    (tmp_path / "results.md").write_text("# fcos_resnet18_slim: structured vs masked pruning\n")
    assert rf._model_name(tmp_path) == "fcos_resnet18_slim"


def test_rows_of_two_data_seeds_share_a_cell_with_their_mean_and_range() -> None:
    recovered, retained = {"0": 0.6112, "1": 0.5731}, {"0": 0.9487, "1": 0.9104}
    rows = [{**_row("l1", "0.25", f"{retained[s]:.4f}"), "data_seed": s, "map_recovered": f"{recovered[s]:.4f}",
             "map_retrained": f"{0.5 + int(s) / 10:.4f}"} for s in ("0", "1")]
    md = rf.markdown(rows)
    rec, ret = sorted(recovered.values()), sorted(retained.values())
    want_rec = f"{sum(rec) / 2:.3f} ({rec[0]:.3f}-{rec[1]:.3f}, 2 seeds)"
    want_ret = f"{100 * sum(ret) / 2:.1f}% ({100 * ret[0]:.1f}-{100 * ret[1]:.1f}, 2 seeds)"
    assert f"| f | l1 | - | - | - | - | 0.000 | {want_rec} | {(0.5 + 0.6) / 2:.3f} | {want_ret} |" in md
    assert "Over data seeds 0, 1" in md
    # one seed reads as before: the bare values
    assert f"| 0.000 | {recovered['0']:.3f} | 0.500 | {100 * retained['0']:.1f}% |" in rf.markdown(rows[:1])


def test_each_data_seed_sweeps_a_recipe_copy_that_changes_only_its_seed(tmp_path: Path) -> None:
    recipe = "recipes/recovery_retinanet.yaml"
    shipped = yaml.safe_load((ROOT / recipe).read_text())
    own, other = shipped["data"]["seed"], shipped["data"]["seed"] + 1
    ckpt, runs = tmp_path / "dense.pt", tmp_path / "runs"
    # the recipe's own seed alone: the shipped recipe, today's folder (earlier runs resume)
    for seeds in (None, [own]):
        assert rf.seed_runs("retinanet", runs, seeds, None) == [(own, ROOT / recipe, runs / "retinanet")]
    got = rf.seed_runs("retinanet", runs, [own, other], str(ckpt))
    assert [(s, out) for s, _, out in got] == [(own, runs / "retinanet" / f"seed{own}"),
                                              (other, runs / "retinanet" / f"seed{other}")]
    # the dense checkpoint was trained on the recipe's own data: only that seed loads it
    assert yaml.safe_load(got[0][1].read_text()) == {**shipped, "model": {**shipped["model"], "weights": str(ckpt)}}
    assert yaml.safe_load(got[1][1].read_text()) == {**shipped, "data": {**shipped["data"], "seed": other}}
    assert got[1][1] != got[0][1] and got[1][1].parent == runs / "retinanet"
