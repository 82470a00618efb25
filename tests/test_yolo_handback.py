"""Handing a pruned YOLO back to Ultralytics cannot silently lose the pruning: Ultralytics' own
trainer (through the shipped width-keeping trainer) trains the pruned network, names / imgsz / nc
survive, and every surgery command handed the file names it an Ultralytics pickle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli.main import app
from surgery.data import synthesize
from surgery.detectors.builders import ModelSpec, build_model
from surgery.errors import CheckpointError
from surgery.measure import count_params
from surgery.storage.checkpoint import read_checkpoint, save_checkpoint

SIZE = 64
NAMES = ["ring", "brick", "wedge", "dot"]  # not the synthetic set's names: they must come from the yaml


@pytest.fixture(scope="module")
def yolo_data(tmp_path_factory) -> Path:
    """A YOLO-format set written by `surgery data convert`, its class names renamed."""
    root = tmp_path_factory.mktemp("yolo_data")
    synthesize(root / "coco", images=8, size=SIZE, seed=0, val_images=4)
    res = CliRunner().invoke(app, ["data", "convert", f"coco:{root / 'coco'}", "--to", "yolo", "--out", str(root / "y")])
    assert res.exit_code == 0, res.output
    spec = yaml.safe_load((root / "y/data.yaml").read_text())
    spec["names"] = dict(enumerate(NAMES))
    (root / "y/data.yaml").write_text(yaml.safe_dump(spec))
    return root / "y/data.yaml"


def _prune_and_hand_back(tmp_path: Path, data: Path, yaml_name: str = "yolov8n.yaml") -> tuple[Path, Path]:
    pruned, handed = tmp_path / "pruned.pt", tmp_path / "back.pt"
    runner = CliRunner()
    res = runner.invoke(app, ["prune", "--model", f"ultralytics:{yaml_name}", "-k", "nc=4", "-k", f"size={SIZE}",
                              "--ratio", "0.5", "--macs-size", str(SIZE), "--data", f"yolo:{data}", "--out", str(pruned)])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(pruned), "--format", "ultralytics", "--out", str(handed)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "trainer=PrunedDetectionTrainer" in out and "--engine ultralytics" in out  # the one line that keeps widths
    return pruned, handed


def test_ultralytics_trainer_keeps_pruned_widths_names_and_imgsz(ultralytics, yolo_data, tmp_path) -> None:
    from ultralytics import YOLO

    from surgery.yolo.ultralytics_trainer import PrunedDetectionTrainer

    pruned, handed = _prune_and_hand_back(tmp_path, yolo_data)
    n = count_params(__import__("surgery.storage.checkpoint", fromlist=["load"]).load(pruned).net).total
    ckpt = torch.load(handed, map_location="cpu", weights_only=False)  # our own file, just written
    assert ckpt["train_args"]["imgsz"] == SIZE and ckpt["model"].model[-1].nc == 4 == ckpt["model"].yaml["nc"]
    assert list(ckpt["model"].names.values()) == NAMES  # from the dataset the recipe names, not '0'..'3'
    model = YOLO(str(handed))
    assert sum(p.numel() for p in model.model.parameters()) == n
    model.train(data=str(yolo_data), trainer=PrunedDetectionTrainer, epochs=1, imgsz=SIZE, batch=4, workers=0,
                plots=False, device="cpu", amp=False, verbose=False, val=False, project=str(tmp_path / "runs"),
                name="t")  # fmt: skip
    assert sum(p.numel() for p in model.model.parameters()) == n
    best = torch.load(model.trainer.last, map_location="cpu", weights_only=False)["model"]
    assert sum(p.numel() for p in best.parameters()) == n and list(best.names.values()) == NAMES
    # the oracle for why the trainer exists: Ultralytics' own trainer rebuilds the full widths
    plain = YOLO(str(handed))
    plain.train(data=str(yolo_data), epochs=1, imgsz=SIZE, batch=4, workers=0, plots=False, device="cpu",
                amp=False, verbose=False, val=False, project=str(tmp_path / "runs"), name="plain")  # fmt: skip
    assert sum(p.numel() for p in plain.model.parameters()) > 1.5 * n


def test_commands_name_the_handed_back_file_an_ultralytics_pickle(ultralytics, yolo_data, tmp_path) -> None:
    _, handed = _prune_and_hand_back(tmp_path, yolo_data)
    with pytest.raises(CheckpointError, match=rf"Ultralytics checkpoint.*--model ultralytics:{handed} --trust-code"):
        read_checkpoint(handed)
    for args in (["info", str(handed)], ["eval", str(handed), "--data", f"yolo:{yolo_data}"]):
        res = CliRunner().invoke(app, args)
        assert "Ultralytics checkpoint" in str(res.exception) and "corrupt" not in str(res.exception), args


def test_export_ultralytics_refuses_onnx_only_flags_and_onnx_names(ultralytics, yolo_data, tmp_path) -> None:
    pruned, _ = _prune_and_hand_back(tmp_path, yolo_data)
    for extra, why in ((["--out", str(tmp_path / "y.onnx")], "name it .pt"), (["--opset", "13"], "--opset")):
        res = CliRunner().invoke(app, ["export", str(pruned), "--format", "ultralytics", *extra])
        assert res.exception is not None and why in str(res.exception)
        assert not (tmp_path / "y.onnx").exists()


def test_retrain_engine_ultralytics_trains_the_pruned_widths_and_writes_both_files(ultralytics, yolo_data, tmp_path) -> None:
    """`surgery retrain --engine ultralytics` runs Ultralytics' loop (1 epoch, 64 px, CPU) on the pruned
    network: the surgery checkpoint reloads weights_only at the pruned count with new weights, and the
    Ultralytics file next to it holds the same network (same outputs) with the dataset's names."""
    from ultralytics import YOLO

    from surgery.storage.checkpoint import load

    pruned, _ = _prune_and_hand_back(tmp_path, yolo_data)
    before = load(pruned)
    out = tmp_path / "re.pt"
    res = CliRunner().invoke(app, ["retrain", str(pruned), "--engine", "ultralytics", "--data", f"yolo:{yolo_data}",
                                   "--epochs", "1", "--batch-size", "4", "--no-eval", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)
    after = load(out)
    n = count_params(before.net).total
    assert count_params(after.net).total == n
    assert any(not torch.equal(a, b) for a, b in zip(before.net.state_dict().values(), after.net.state_dict().values()))
    assert read_checkpoint(out).class_names == ["__background__", *NAMES]
    theirs = YOLO(str(out.with_suffix(".ultralytics.pt")))
    assert sum(p.numel() for p in theirs.model.parameters()) == n and list(theirs.model.names.values()) == NAMES
    batch = torch.rand(1, 3, SIZE, SIZE)
    after._sync_widths()
    with torch.no_grad():
        after.net.model[-1].__dict__.pop("_end2end", None)
        torch.testing.assert_close(theirs.model.float().eval()(batch)[0], after.net.eval()(batch)[0])
    res = CliRunner().invoke(app, ["retrain", str(pruned), "--engine", "ultralytics", "--data", f"yolo:{yolo_data}",
                                   "--epochs", "1", "--steps", "5", "--out", str(tmp_path / "x.pt")])  # fmt: skip
    assert res.exception is not None and "--steps" in str(res.exception) and not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_users_best_pt_keeps_names_imgsz_and_train_args_through_prune_and_hand_back(ultralytics, yolo_data, tmp_path) -> None:
    """A best.pt trained by Ultralytics itself (1 epoch, 64 px): `ultralytics:best.pt --trust-code`
    is pruned (and recovered) with its class names, its imgsz as the letterbox size and its training
    arguments recorded in the (weights_only) checkpoint, and they come back in the hand-back file."""
    from ultralytics import YOLO

    user = YOLO("yolov8n.yaml")
    user.train(data=str(yolo_data), epochs=1, imgsz=SIZE, batch=4, workers=0, plots=False, device="cpu", amp=False,
               verbose=False, val=False, project=str(tmp_path / "runs"), name="user", fliplr=0.25)  # fmt: skip
    best = Path(user.trainer.last)
    pruned, handed = tmp_path / "pruned.pt", tmp_path / "back.pt"
    runner = CliRunner()
    res = runner.invoke(app, ["prune", "--model", f"ultralytics:{best}", "--trust-code", "--ratio", "0.5", "--recover",
                              "2", "--data", f"yolo:{yolo_data}", "--macs-size", str(SIZE), "--out", str(pruned)])  # fmt: skip
    assert res.exit_code == 0, res.output
    spec = read_checkpoint(pruned).spec
    assert spec.kwargs["names"] == NAMES and spec.kwargs["size"] == SIZE and spec.kwargs["train_args"]["fliplr"] == 0.25
    res = runner.invoke(app, ["export", str(pruned), "--format", "ultralytics", "--out", str(handed)])
    assert res.exit_code == 0, res.output
    ckpt = torch.load(handed, map_location="cpu", weights_only=False)  # our own file, just written
    assert list(ckpt["model"].names.values()) == NAMES
    assert ckpt["train_args"]["imgsz"] == SIZE and ckpt["train_args"]["fliplr"] == 0.25
    assert ckpt["train_args"]["data"] == str(yolo_data)


def test_handed_back_model_names_each_class_as_surgery_does(tmp_path: Path, ultralytics) -> None:
    """Surgery's label 0 is the background, Ultralytics' class 0 the first object class: the same
    name on both sides (fails with the names shifted by one)."""
    from ultralytics import YOLO

    names = ["__background__", "cat", "dog", "bird"]
    spec = ModelSpec("ultralytics:yolov8n.yaml", {"nc": 3, "size": 96})
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(spec), spec, class_names=names)
    out = tmp_path / "back.pt"
    res = CliRunner().invoke(app, ["export", str(ckpt), "--format", "ultralytics", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert YOLO(str(out)).names == {i - 1: names[i] for i in range(1, len(names))}
