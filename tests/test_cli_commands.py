"""Behaviour an engineer meets first, through the real entry point: fast --help, --version,
full-width / json tables outside a terminal, data folders, predict vs eval, best.pt, info,
fine-tuning to other classes, user builders reloading from another directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from surgery.detectors.builders import ModelSpec, build_model
from surgery.storage.checkpoint import read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SLIM = {"num_classes": 5, "min_size": 64, "max_size": 64, "fpn_channels": 64, "score_thresh": 0.0}


@dataclass
class Ran:
    exit_code: int
    output: str
    stdout: str


def run(*args: str) -> Ran:
    """``surgery ARGS`` in process; a known error becomes exit 2 + its one line, as ``main()`` maps it."""
    from surgery.errors import SurgeryError

    res = CliRunner().invoke(app, list(args))
    if isinstance(res.exception, SurgeryError):
        return Ran(2, res.output + f"error: {res.exception}", res.stdout)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return Ran(res.exit_code, res.output, res.stdout)


@pytest.fixture
def shapes(synthetic_shapes) -> Path:
    return synthetic_shapes.root  # the session's synthetic set (conftest)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec("fcos_resnet18_slim", dict(SLIM))
    return save_checkpoint(tmp_path_factory.mktemp("c") / "dense.pt", build_model(spec), spec,
                           class_names=["__background__", "rectangle", "ellipse", "triangle", "cross"])


def test_help_and_version_import_no_torch() -> None:
    code = ("import sys\nfrom cli.main import app\nfor args in (['--help'], ['prune', '--help'], ['train', '--help'], "
            "['--version']):\n    try:\n        app(args, standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('OK')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
    assert "surgery 0." in out.stdout


def test_tables_in_an_80_column_pipe_keep_full_names() -> None:
    res = run("inspect", "--model", "fcos_resnet18_slim", "-k", "fpn_channels=64", "--macs-size", "64")
    assert res.exit_code == 0, res.output
    data = json.loads(run("inspect", "--model", "fcos_resnet18_slim", "-k", "fpn_channels=64", "--macs-size", "64",
                          "--format", "json").stdout)
    roots = [r["root"] for r in data["rows"]]
    assert any(len(r) > 30 for r in roots)
    assert all(r in res.output for r in roots)  # never "backbone.bo…"
    assert not [line for line in res.output.splitlines() if "│" in line and "…" in line]
    assert data["macs"] > 0 and data["macs_input_size"] == 64 and data["macs_network_input"] == [160, 160]
    # the slim FCOS resizes to its min_size (160) itself: the label says what the network ran at
    assert "network at 160x160: the model resizes its 64x64 input itself" in " ".join(res.output.split())


def test_data_folders_prefixes_and_suggestions(shapes: Path) -> None:
    from surgery.data import dataset_for

    plain = dataset_for(None, "val", train=False, source=str(shapes))  # COCO layout recognised
    upper = dataset_for(None, "val", train=False, source=f"COCO:{shapes}")
    assert len(plain) == len(upper) == 4
    res = run("train", "--model", "fcos_resnet18_slim", "--data", f"coc:{shapes}", "--steps", "1")
    assert res.exit_code == 2 and "did you mean 'coco:" in res.output


def test_predict_json_matches_eval_detections(dense: Path, shapes: Path, tmp_path: Path) -> None:
    det = tmp_path / "det.json"
    res = run("eval", str(dense), "--data", str(shapes), "--detections", str(det), "-b", "1", "--json",
              str(tmp_path / "m.json"))
    assert res.exit_code == 0, res.output
    assert "evaluating: 4/4" in res.output  # plain progress outside a terminal
    assert "mAP" in json.loads((tmp_path / "m.json").read_text())["metrics"]
    res = run("predict", str(dense), str(shapes / "val"), "--out", str(tmp_path / "pred"), "--score-thresh", "0")
    assert res.exit_code == 0, res.output
    preds = json.loads((tmp_path / "pred" / "detections.json").read_text())
    ids = {im["file_name"]: im["id"] for im in json.loads((shapes / "annotations/instances_val.json").read_text())["images"]}
    evals = json.loads(det.read_text())
    assert evals
    for p in preds:
        assert Path(p["drawn"]).is_file()
        mine = sorted([*d["box"][:2], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1], d["score"]]
                      for d in p["detections"] if d["label"] > 0)  # eval drops background-index labels
        theirs = sorted([*e["bbox"], e["score"]] for e in evals if e["image_id"] == ids[Path(p["file"]).name])
        assert len(mine) == len(theirs) > 0
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), atol=1e-2, rtol=1e-3)
        assert all(d["name"] in ("rectangle", "ellipse", "triangle", "cross") for d in p["detections"] if d["label"] > 0)


def test_train_records_best_and_refuses_overwrite(shapes: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "fcos_resnet18_slim", "--data", str(shapes), "-b", "4", "--steps", "3",
            "--eval-every", "1", *sum((["-k", f"{k}={v}"] for k, v in SLIM.items() if k != "num_classes"), [])]
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert "num_classes=5 from the data" in res.output
    run_dir = tmp_path / "runs/train/exp"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["val/mAP"], -r["step"]) for r in rows if "val/mAP" in r]
    assert len(evals) >= 3 and any("loss" in r for r in rows)
    best_step = -max(evals)[1]
    best = read_checkpoint(run_dir / "best.pt")
    assert best.train_state["step"] == best_step and read_checkpoint(run_dir / "last.pt").train_state["step"] == 3
    assert (run_dir / "metrics.csv").read_text().startswith("step,epoch,lr,loss")
    assert run(*args).exit_code == 0 and (tmp_path / "runs/train/exp2/last.pt").is_file()  # a new folder
    again = run(*args, "--out", str(run_dir / "last.pt"))
    assert again.exit_code == 2 and "--resume" in again.output


def test_info_provenance_and_saved_recipe_names_the_pruned_model(dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.pt"
    assert run("prune", "--model", str(dense), "--ratio", "0.5", "--macs-size", "64", "--out", str(out)).exit_code == 0
    ssd = tmp_path / "ssd.pt"
    res = run("prune", "--model", "ssdlite320_mobilenet_v3_large", "-k", "num_classes=3", "--ratio", "0.3",
              "--out", str(ssd))
    assert res.exit_code == 0 and "% kept" in res.output
    assert read_checkpoint(ssd).recipe["model"]["name"] == "ssdlite320_mobilenet_v3_large"
    assert read_checkpoint(ssd).recipe["model"]["kwargs"]["num_classes"] == 3
    info = json.loads(run("info", str(out), "--format", "json").stdout)
    assert info["chain"][0]["source"] == str(dense) and info["builder"] == "fcos_resnet18_slim"
    cut = {c["layer"]: (c["before"], c["after"]) for c in info["layers"]}
    assert cut["backbone.body.layer1.0.conv1"] == (64, 32)
    assert info["class_names"][1] == "rectangle" and info["metrics"]["params"] > 0
    text = run("info", str(out)).output
    assert "backbone.body.layer1" in text and "from " + str(dense) in text


def test_info_names_a_per_group_allocation_instead_of_calling_it_uniform() -> None:
    from surgery.pruning.plan import StructuredPlan
    from surgery.storage.info import _describe_plan

    assert "(uniform" in _describe_plan(StructuredPlan(ratio=0.5))
    assert "(global" in _describe_plan(StructuredPlan(ratio=0.5, global_ranking=True))
    allocated = _describe_plan(StructuredPlan(ratio=0.5, overrides={"backbone.body.layer1.0.conv1": 0.8}))
    assert "(per-group ratios" in allocated and "uniform" not in allocated


def test_weights_with_other_num_classes_keeps_all_but_class_outputs(tmp_path: Path, shapes: Path) -> None:
    from surgery.training.transfer import build_with_weights_file

    for name, kw in (("fcos_resnet18_slim", {"fpn_channels": 32}), ("ssdlite320_mobilenet_v3_large", {}),
                     ("fasterrcnn_mobilenet_v3_large_320_fpn", {})):
        src = build_model(ModelSpec(name, {**kw, "num_classes": 5}))
        torch.save(src.state_dict(), tmp_path / "w.pth")
        model, tr = build_with_weights_file(ModelSpec(name, {**kw, "num_classes": 3}), tmp_path / "w.pth")
        assert tr.reinitialised and tr.classes_before == 5
        mine, theirs = model.state_dict(), src.state_dict()
        for k, v in theirs.items():
            if any(k.startswith(layer + ".") for layer in tr.reinitialised):
                assert mine[k].shape != v.shape
            else:
                assert torch.equal(mine[k], v), (name, k)
    torch.save(build_model(ModelSpec("fcos_resnet18_slim", {"fpn_channels": 64})).state_dict(), tmp_path / "f.pth")
    res = run("train", "--model", "fcos_resnet18_slim", "--weights", str(tmp_path / "f.pth"), "-k", "num_classes=7",
              "-k", "fpn_channels=64", "-k", "min_size=64", "-k", "max_size=64", "--data", str(shapes), "--steps", "1",
              "-b", "4", "--no-eval", "--out", str(tmp_path / "ft.pt"))
    assert res.exit_code == 0, res.output
    assert "re-initialised the class outputs (91 classes before)" not in res.output
    assert "re-initialised the class outputs" in res.output and "head.classification_head.cls_logits" in res.output
    assert "the model has 7 classes" in res.output  # more outputs than the data's classes: said


def test_retrain_kwarg_num_classes_on_a_pruned_checkpoint(dense: Path, shapes: Path, tmp_path: Path) -> None:
    pruned = tmp_path / "p.pt"
    assert run("prune", "--model", str(dense), "--ratio", "0.5", "--out", str(pruned), "--macs-size", "64").exit_code == 0
    res = run("retrain", str(pruned), "--data", str(shapes), "-k", "num_classes=6", "--steps", "1", "-b", "4",
              "--no-eval", "--out", str(tmp_path / "r.pt"))
    assert res.exit_code == 0, res.output
    assert "re-initialised the class outputs (5 classes before)" in res.output
    import surgery

    model = surgery.load(tmp_path / "r.pt")
    assert not model.training  # load() gives eval mode
    assert model.head.classification_head.cls_logits.out_channels == 6
    out = model([torch.rand(3, 64, 64)])[0]
    assert torch.isfinite(out["boxes"]).all()


BUILDER = '''
from surgery.detectors.builders import build_model


def build(num_classes=5):
    return build_model("fcos_resnet18_slim", num_classes=num_classes, min_size=64, max_size=64, fpn_channels=64)
'''


def test_user_file_detector_reloads_from_another_directory(tmp_path: Path, monkeypatch) -> None:
    import surgery

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "mydet.py").write_text(BUILDER)
    monkeypatch.chdir(work)
    res = run("prune", "--model", "mydet.py:build", "--trust-code", "--ratio", "0.5", "--out", "ck.pt", "--macs-size", "64")
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(elsewhere)
    model = surgery.load(work / "ck.pt", trust_code=True)
    assert model([torch.rand(3, 64, 64)])[0]["boxes"].shape[1] == 4
    assert run("info", str(work / "ck.pt")).exit_code == 0
    (work / "mydet.py").write_text(BUILDER + "\n# edited\n")
    res = run("eval", str(work / "ck.pt"), "--trust-code", "--max-images", "1")
    assert res.exit_code == 2 and "changed since it was saved" in res.output
    (work / "mydet.py").unlink()
    res = run("eval", str(work / "ck.pt"), "--trust-code", "--max-images", "1")
    assert res.exit_code == 2 and "does not exist" in res.output and str(work / "mydet.py") in res.output
