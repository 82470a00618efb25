"""Outputs and interrupts: run folders are claimed atomically, a resumed run
records each step once, and a full disk that "wrote nothing" leaves no metrics files."""

from __future__ import annotations

import csv
import errno
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from surgery.storage.safety import OutputError
from surgery.training.records import RecordHook, RunFiles, next_run_dir


def test_run_folders_are_claimed_so_two_runs_never_share_one(tmp_path: Path) -> None:
    first, second = next_run_dir(tmp_path / "runs"), next_run_dir(tmp_path / "runs")
    assert first.name == "exp" and second.name == "exp2" and first.is_dir() and second.is_dir()
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(next_run_dir(tmp_path / "many"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8


class _Trainer(SimpleNamespace):
    def mean_losses(self) -> dict[str, float]:
        return {"a": float(self.step)}


def _trainer(step: int, total: int = 20) -> _Trainer:
    return _Trainer(step=step, epoch=0, lr=0.1, history=[], dist=SimpleNamespace(is_main=True),
                    cfg=SimpleNamespace(log_every=5), total_steps=total, last_losses={"a": 0.0})  # fmt: skip


def _steps(files: RunFiles) -> tuple[list[int], list[int]]:
    rows = list(csv.DictReader(files.csv.open(newline="")))
    return [int(r["step"]) for r in rows], [json.loads(ln)["step"] for ln in files.jsonl.read_text().splitlines()]


def _run(hook: RecordHook, trainer: _Trainer, until: int) -> None:
    hook.before_train(trainer)
    while trainer.step < until:
        trainer.step += 1
        hook.after_step(trainer)


def test_resume_after_interrupt_records_each_step_once(tmp_path: Path) -> None:
    files = RunFiles.for_checkpoint(tmp_path / "last.pt")
    first = RecordHook(files)
    _run(first, _trainer(0), 12)  # logged 5 and 10; checkpoint at 10; Ctrl-C at 12 after...
    first._write({"step": 12, "epoch": 0, "lr": 0.1, "loss": 9.0})  # ...a row past the checkpoint
    assert _steps(files)[0] == [5, 10, 12]
    hook = RecordHook(files)
    trainer = _trainer(10)
    hook.before_train(trainer)
    hook._row(trainer, with_losses=True)  # the resumed run writing its checkpoint's step again
    while trainer.step < 20:
        trainer.step += 1
        hook.after_step(trainer)
    csv_steps, jsonl_steps = _steps(files)
    assert csv_steps == jsonl_steps == [5, 10, 15, 20]


def test_full_disk_in_a_new_run_leaves_no_metrics_files(tmp_path: Path) -> None:
    files = RunFiles.for_checkpoint(tmp_path / "last.pt")
    hook = RecordHook(files)
    trainer = _trainer(0)
    _run(hook, trainer, 5)
    assert files.csv.exists() and files.jsonl.exists()
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise OutputError("output last.pt: no space left on device; nothing was written") from e
    except OutputError:
        hook.on_abort(trainer)  # the trainer calls it inside its except block
    assert not files.csv.exists() and not files.jsonl.exists()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is not a full disk: the records stay
        hook2 = RecordHook(files)
        _run(hook2, _trainer(0), 5)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            hook2.on_abort(trainer)
            raise
    assert files.csv.exists()


def test_interrupted_sweep_says_what_was_kept_and_how_to_continue(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import surgery.sweep
    from cli.main import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(surgery.sweep, "run_sweep", interrupted)
    res = CliRunner().invoke(app, ["sweep", "quickstart", "--out", str(tmp_path / "sw")])
    assert res.exit_code == 130, res.output
    assert f"interrupted: the steps the sweep finished are kept in {tmp_path / 'sw'}" in res.output
    assert "run the same command again to continue" in res.output
