"""Hostile conditions for outputs: a full disk (writes patched to raise ENOSPC), concurrent runs on
one output, two outputs of one call on one path, read-only files (by mode bits, which root does
not bypass), stale temporaries of killed runs, a --out folder that is the user's, Ctrl-C."""

from __future__ import annotations

import builtins
import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from surgery.detectors.builders import ModelSpec, build_model
from surgery.storage.checkpoint import atomic_save, save_checkpoint
from surgery.storage.safety import OutputError, OutputLock, check_output, clean_stale_temporaries

SLIM = {"num_classes": 5, "min_size": 64, "max_size": 64, "fpn_channels": 64, "score_thresh": 0.0}


def run(*args: str) -> tuple[int, str]:
    """``surgery ARGS`` in process: a known error is exit 2 and its line, as ``main()`` maps it."""
    from surgery.errors import SurgeryError

    res = CliRunner().invoke(app, list(args))
    if isinstance(res.exception, SurgeryError):
        return 2, res.output + f"error: {res.exception}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.output


class _FullDisk:
    """``open()`` whose files under ``root`` accept ``room`` bytes, then raise ENOSPC (like a disk
    filling up mid-write)."""

    def __init__(self, root: Path, room: int = 100) -> None:
        self.root, self.room, self.real = str(root), room, builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        f = self.real(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(self.root) and any(c in mode for c in "wa+"):
            room = self.room
            write = f.write

            def limited(data):
                nonlocal room
                n = len(data)
                if n > room:
                    write(data[:room])
                    room = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                room -= n
                return write(data)

            f.write = limited
        return f


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("writer", ["json", "checkpoint", "image", "csv"])
def test_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch, writer: str) -> None:
    from surgery.storage.atomic import atomic_open

    target = tmp_path / {"json": "a.json", "checkpoint": "c.pt", "image": "i.png", "csv": "r.csv"}[writer]
    target.write_bytes(b"the previous file")
    monkeypatch.setattr(builtins, "open", _FullDisk(tmp_path))
    with pytest.raises(OutputError) as e:
        if writer == "json":
            with atomic_open(target, "w") as f:
                json.dump({"x": list(range(1000))}, f)
        elif writer == "checkpoint":
            atomic_save({"w": torch.zeros(1000)}, target)
        elif writer == "image":
            from PIL import Image

            from surgery.data.draw import draw_samples

            draw_samples([__import__("numpy").zeros((32, 32, 3), "uint8")], [[]], ["a"], target)
            Image.open(target)  # never reached
        else:
            from surgery.measure.bench import BENCH_COLUMNS, write_csv

            write_csv([{BENCH_COLUMNS[0]: "m" * 500}] * 10, target)
    monkeypatch.undo()
    msg = str(e.value)
    assert "no space left on device" in msg and str(target) in msg and "\n" not in msg
    assert target.read_bytes() == b"the previous file"
    assert _leftovers(tmp_path) == []


def test_full_disk_appends_no_half_row(tmp_path, monkeypatch) -> None:
    from surgery.storage.atomic import append_text

    log = tmp_path / "metrics.csv"
    append_text(log, "step,loss\n1,0.5\n")
    real = os.write

    def full(fd, data):
        real(fd, bytes(data[:3]))  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputError, match="no space left on device"):
        append_text(log, "2,0.25\n")
    with pytest.raises(OutputError, match="no space left on device"):
        append_text(tmp_path / "new.jsonl", "{}\n")
    monkeypatch.undo()
    assert log.read_text() == "step,loss\n1,0.5\n"
    assert not (tmp_path / "new.jsonl").exists()  # not left behind empty


def test_read_only_is_read_from_the_mode_bits(tmp_path) -> None:
    f = tmp_path / "keep.pt"
    f.write_bytes(b"x")
    check_output(f)
    f.chmod(0o444)
    try:
        with pytest.raises(OutputError, match="read-only"):
            check_output(f)  # root passes os.access(W_OK); the mode says read-only
    finally:
        f.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path) -> None:
    dead = 2**22 + 12345  # above pid_max on Linux by default: no such process
    pending = tmp_path / f".out.pt.{dead}.pending.tmp"
    nested = tmp_path / f"..out.pt.{dead}.pending.tmp.{dead}.k2j3.tmp"  # a pending checkpoint being written
    live = tmp_path / f".out.pt.{os.getppid()}.abcd.tmp"
    other = tmp_path / f".other.pt.{dead}.abcd.tmp"
    for p in (pending, nested, live, other):
        p.write_bytes(b"x" * 100)
    removed = clean_stale_temporaries(tmp_path, "out.pt")
    assert sorted(p.name for p in removed) == sorted([pending.name, nested.name])
    assert live.exists() and other.exists()


def test_one_writer_per_output_file(tmp_path) -> None:
    out = tmp_path / "same.pt"
    with OutputLock(out, "--out"):
        with pytest.raises(OutputError, match=f"being written by another surgery process \\(pid {os.getpid()}\\)"):
            with OutputLock(out, "--out"):
                pass
        # through the CLI: the second train refuses before building anything
        code, text = run("train", "--model", "fcos_resnet18_slim", "--steps", "1", "--out", str(out))
        assert code == 2 and "being written by another surgery process" in text
    assert not out.exists() and _leftovers(tmp_path) == []  # the lock file goes with its holder
    with OutputLock(out):
        pass


@pytest.mark.parametrize(
    "args",
    [
        ("quantize", "m.onnx", "--out", "k.onnx", "--keep-float", "k.onnx"),
        ("eval", "c.pt", "--json", "a.json", "--detections", "a.json"),
        ("eval", "c.pt", "--json", "a.json", "--detections", "./sub/../a.json"),
    ],
)
def test_two_outputs_of_one_call_on_one_path_are_refused(tmp_path, monkeypatch, args) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    code, text = run(*args)
    assert code == 2 and "are the same file" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_predict_refuses_a_folder_it_did_not_create(tmp_path) -> None:
    spec = ModelSpec("fcos_resnet18_slim", dict(SLIM))
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(spec), spec)
    from PIL import Image

    img = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(img)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "detections.json").write_text("my own notes")
    code, text = run("predict", str(ckpt), str(img), "--out", str(mine))
    assert code == 2 and "exists and is kept" in text and "--overwrite" in text, text
    assert (mine / "detections.json").read_text() == "my own notes"
    code, text = run("predict", str(ckpt), str(img), "--out", str(mine), "--overwrite")
    assert code == 0, text
    fresh = tmp_path / "fresh"
    code, text = run("predict", str(ckpt), str(img), "--out", str(fresh))
    assert code == 0, text
    code, text = run("predict", str(ckpt), str(img), "--out", str(fresh))  # one convention: refused again
    assert code == 2 and "--overwrite" in text, text
    code, text = run("predict", str(ckpt), str(img), "--out", str(fresh), "--overwrite")
    assert code == 0, text
    assert len(json.loads((fresh / "detections.json").read_text())) == 1


def test_interrupted_training_says_what_was_kept(tmp_path) -> None:
    from cli.train_options import _kept

    out = tmp_path / "run.pt"
    assert "no checkpoint was saved yet" in _kept(out)
    save_checkpoint(out, nn.Linear(1, 1), ModelSpec("fcos_resnet18_slim"), train_state={"step": 7})
    text = _kept(out)
    assert "holds step 7" in text and f"--resume --out {out}" in text


def test_a_writer_that_hides_enospc_on_a_full_disk_is_still_one_line(tmp_path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    from surgery.storage.atomic import atomic_path

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OutputError, match="no space left on device"):
        with atomic_path(tmp_path / "m.onnx"):
            raise RuntimeError("onnxscript: failed to serialize")  # what the exporter says instead
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="onnxscript"):  # with room left, the error is the writer's
        with atomic_path(tmp_path / "m.onnx"):
            raise RuntimeError("onnxscript: failed to serialize")
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_lock_leaves_no_empty_folder(tmp_path) -> None:
    from surgery.storage.safety import RunLock

    with RunLock(tmp_path / "sweep"):
        pass  # the run failed before writing anything
    assert not (tmp_path / "sweep").exists()
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir()  # not created by the lock: left alone
    with RunLock(tmp_path / "used"):
        (tmp_path / "used" / "results.csv").write_text("x")
    assert (tmp_path / "used" / "results.csv").exists()


def test_the_output_lock_works_on_a_full_disk(tmp_path, monkeypatch) -> None:
    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # the lock file is created (0 bytes), its pid not written
    with OutputLock(tmp_path / "e.json"):
        with pytest.raises(OutputError, match=r"pid \?"):
            with OutputLock(tmp_path / "e.json"):
                pass
    assert list(tmp_path.iterdir()) == []
