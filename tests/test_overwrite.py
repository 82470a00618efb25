"""Never a silent overwrite: every command that writes refuses an existing output before any work
(one line, exit 2, the file untouched) unless it runs with --overwrite; train/retrain also take
--resume; a sweep's folder is resumed by design."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from cli.outputs import OUTPUT_PARAMS, RESUMED_FOLDERS
from surgery.storage.safety import OutputError

ROOT = Path(__file__).resolve().parents[1]
SLIM = ["--model", "fcos_resnet18_slim", "-k", "min_size=64", "-k", "max_size=64", "-k", "fpn_channels=64",
        "--ratio", "0.25", "--macs-size", "64"]  # fmt: skip


def _surgery(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("SURGERY_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "surgery", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_second_prune_on_the_same_out_exits_2_in_one_line_and_keeps_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = CliRunner().invoke(app, ["prune", *SLIM, "--out", "p.pt"])
    assert first.exit_code == 0, first.output
    before = (tmp_path / "p.pt").read_bytes()
    again = _surgery("prune", *SLIM, "--ratio", "0.5", "--out", "p.pt", cwd=tmp_path)  # the real entry point
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.splitlines() == [
        "error: --out p.pt: the file exists and is kept; pass --overwrite to replace it, or another --out"
    ]
    assert (tmp_path / "p.pt").read_bytes() == before

    replaced = CliRunner().invoke(app, ["prune", *SLIM, "--ratio", "0.5", "--out", "p.pt", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert (tmp_path / "p.pt").read_bytes() != before
    Path("pruned.pt").write_bytes(b"earlier")  # the default --out
    default = CliRunner().invoke(app, ["prune", *SLIM])
    assert isinstance(default.exception, OutputError) and "--out pruned.pt" in str(default.exception)
    assert Path("pruned.pt").read_bytes() == b"earlier"


# (command line, the output that exists); inputs need not exist: the refusal comes before any work
CASES = [
    (["export", "x.pt", "--out", "OUT"], "file"),
    (["export", "OUT.pt"], "default"),  # its default --out is the checkpoint's name with .onnx
    (["quantize", "x.pt", "--out", "OUT"], "file"),
    (["quantize", "x.pt", "--out", "new.onnx", "--keep-float", "OUT"], "file"),
    (["eval", "x.pt", "--json", "OUT"], "file"),
    (["eval", "x.pt", "--detections", "OUT"], "file"),
    (["bench", "x.pt", "--csv", "OUT"], "file"),
    (["train", "--model", "fcos_resnet18_slim", "--out", "OUT"], "file"),
    (["retrain", "x.pt", "--out", "OUT"], "file"),
    (["predict", "x.pt", "img.png", "--out", "OUT"], "folder"),
    (["data", "synth", "--out", "OUT"], "folder"),
]


@pytest.mark.parametrize(("args", "kind"), CASES, ids=[" ".join(a[:2]) + f" {k}" for a, k in CASES])
def test_every_writing_command_refuses_an_existing_output(args, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if kind == "default":
        out = Path("OUT.onnx")
    else:
        out = Path("OUT")
    if kind == "folder":
        out.mkdir()
        (out / "earlier.jpg").write_bytes(b"kept")
    else:
        out.write_bytes(b"kept")
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, OutputError), (res.exception, res.output)
    assert "exists and is kept; pass --overwrite to replace it" in str(res.exception)
    assert "\n" not in str(res.exception)
    assert (out / "earlier.jpg" if kind == "folder" else out).read_bytes() == b"kept"
    if args[0] in ("train", "retrain"):
        assert "--resume to continue that run" in str(res.exception)


def test_every_command_with_an_output_has_overwrite():
    """A new command that writes gets the convention too (the guard adds it), except the sweep,
    whose folder is resumed."""
    writers = []
    for info in app.registered_commands:
        params = inspect.signature(info.callback).parameters
        if any(name in params for name in OUTPUT_PARAMS):
            writers.append(info.name)
            assert ("overwrite" in params) == (info.name not in RESUMED_FOLDERS), info.name
    assert {"prune", "export", "quantize", "eval", "bench", "train", "retrain", "predict"} <= set(writers)


def test_predict_without_out_gets_a_new_run_folder(tmp_path, monkeypatch):
    from cli import predict_cmd

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr("surgery.deployment.predict.image_files", lambda images: seen.append("files") or [])
    monkeypatch.setattr("surgery.deployment.predict.load_predictor", lambda *a, **kw: type("P", (), {"class_names": None})())
    monkeypatch.setattr("surgery.deployment.predict.predict_files", lambda *a, **k: [])
    monkeypatch.setattr("surgery.deployment.predict.write_predictions", lambda preds, out, draw, **kw: seen.append(out) or out / "d.json")
    Path("runs/predict/exp").mkdir(parents=True)
    predict_cmd.predict(Path("x.pt"), [Path("a.png")], None, 0.3, 1, "cpu", True)
    assert seen[-1] == Path("runs/predict/exp2")


def test_recover_refuses_to_write_over_its_teacher(tmp_path) -> None:
    """--teacher is an input: even with --overwrite, the recovered model never replaces the dense
    model it imitates (the file is untouched)."""
    teacher = tmp_path / "dense.pt"
    teacher.write_bytes(b"dense weights")
    res = CliRunner().invoke(app, ["recover", str(tmp_path / "pruned.pt"), "--images", str(tmp_path),
                                   "--teacher", str(teacher), "--out", str(teacher), "--overwrite"])
    assert isinstance(res.exception, OutputError) and "is also an input" in str(res.exception), res.output
    assert teacher.read_bytes() == b"dense weights"
