"""Training records in a run folder: where the files of one run go (:class:`RunFiles`), run
folders that never overwrite each other (:func:`next_run_dir`: ``runs/train/exp``, ``exp2``...),
and :class:`RecordHook`, which appends every logged step and every evaluation to ``metrics.csv``
and ``metrics.jsonl`` (and to TensorBoard when the ``tensorboard`` package is installed).

The best checkpoint by validation mAP is written by :class:`surgery.training.hooks.CheckpointHook`."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..storage.atomic import append_text, atomic_open
from ..storage.safety import no_space
from .hooks import HookBase

if TYPE_CHECKING:
    from .train import Trainer

EVAL_COLUMNS = ("mAP", "mAP50", "mAP75")


@dataclass
class RunFiles:
    """The files of one run. A checkpoint named ``last.pt`` lives in a run folder: ``best.pt``,
    ``metrics.csv``, ``metrics.jsonl`` and ``tensorboard/`` beside it; any other name ``X.pt``
    gets ``X.best.pt``, ``X.metrics.csv``... so two runs in one folder never share files."""

    last: Path
    best: Path
    csv: Path
    jsonl: Path
    tensorboard: Path

    @classmethod
    def for_checkpoint(cls, out: str | Path) -> RunFiles:
        out = Path(out)
        prefix = "" if out.name == "last.pt" else f"{out.stem}."
        d = out.parent
        return cls(out, d / f"{prefix}best.pt", d / f"{prefix}metrics.csv", d / f"{prefix}metrics.jsonl",
                   d / f"{prefix}tensorboard")


def _jsonl_step(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _csv_step(line: str) -> int | None:
    head = line.split(",", 1)[0]
    return int(head) if head.strip().isdigit() else None


def next_run_dir(root: str | Path, name: str = "exp") -> Path:
    """``root/name``, or ``root/name2``, ``name3``... the first that does not exist yet, claimed
    by creating it (``mkdir`` is atomic: two runs started together never share a folder)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        run = root / (name if n == 1 else f"{name}{n}")
        try:
            run.mkdir()
            return run
        except FileExistsError:
            n += 1


def latest_run_dir(root: str | Path, name: str = "exp") -> Path | None:
    """The highest-numbered ``root/nameN`` that exists (what ``--resume`` without ``--out`` continues)."""
    root = Path(root)
    pattern = re.compile(rf"^{re.escape(name)}(\d*)$")
    runs = [(int(m.group(1) or 1), p) for p in root.glob(f"{name}*") if (m := pattern.match(p.name)) and p.is_dir()]
    return max(runs)[1] if runs else None


class RecordHook(HookBase):
    """Append each logged step (every ``cfg.log_every`` steps: losses, lr, img/s) and each new
    evaluation to the run's CSV and JSONL (rank 0; a resumed run appends). Columns of the CSV are
    fixed by its first row (step, epoch, lr, losses, seconds, val/mAP, val/mAP50, val/mAP75); the
    JSONL has every evaluated metric."""

    def __init__(self, files: RunFiles) -> None:
        self.files = files
        self._columns: list[str] | None = None
        self._evals_seen = 0
        self._tb: Any = None
        self._t0 = 0.0
        self._resumed_at: int | None = None  # a resumed run: rows up to this step are already recorded
        self._new_run = False

    def before_train(self, trainer: Trainer) -> None:
        import time

        self._t0 = time.perf_counter()
        self._evals_seen = len(trainer.history)
        if not trainer.dist.is_main:
            return
        self._new_run = trainer.step == 0
        if trainer.step == 0:  # a new run: start the records afresh
            for p in (self.files.csv, self.files.jsonl):
                p.unlink(missing_ok=True)
        else:
            self._resumed_at = trainer.step
            self._drop_rows_after(trainer.step)
            if self.files.csv.exists():
                with open(self.files.csv, newline="") as f:
                    self._columns = next(csv.reader(f), None)
        try:  # optional: TensorBoard only when its package is installed
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.files.tensorboard))
        except ImportError:
            self._tb = None

    def _drop_rows_after(self, step: int) -> None:
        """Rows past the checkpoint a run resumes from (written before it was interrupted) are
        removed: the resumed run writes those steps again, so each step is recorded once."""
        for path, parse in ((self.files.jsonl, _jsonl_step), (self.files.csv, _csv_step)):
            if not path.exists():
                continue
            lines = path.read_text().splitlines(keepends=True)
            kept = [ln for i, ln in enumerate(lines) if (path is self.files.csv and i == 0) or (parse(ln) or 0) <= step]
            if len(kept) != len(lines):
                with atomic_open(path, "w") as f:
                    f.writelines(kept)

    def on_abort(self, trainer: Trainer) -> None:
        """A new run stopped by a full disk before its first checkpoint leaves no metrics files
        (the error says nothing was written)."""
        error = sys.exc_info()[1]
        if self._new_run and error is not None and no_space(error, self.files.csv) is not None and not self.files.last.exists():
            for p in (self.files.csv, self.files.jsonl):
                p.unlink(missing_ok=True)

    def _write(self, row: dict[str, Any]) -> None:
        if self._resumed_at is not None and row["step"] <= self._resumed_at:
            return  # recorded before the interruption (the checkpoint's own step)
        self.files.jsonl.parent.mkdir(parents=True, exist_ok=True)
        # each row is appended whole or not at all (a full disk leaves no half line)
        append_text(self.files.jsonl, json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
        new = self._columns is None
        if new:  # fixed by the first row: step, epoch, lr, losses, seconds and EVAL_COLUMNS
            self._columns = [k for k in row if not k.startswith("val/") or k[4:] in EVAL_COLUMNS]
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=self._columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        append_text(self.files.csv, text.getvalue())
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def after_step(self, trainer: Trainer) -> None:
        every = trainer.cfg.log_every or 1
        if trainer.step % every == 0 or trainer.step == trainer.total_steps:
            self._row(trainer, with_losses=True)
        elif len(trainer.history) > self._evals_seen:
            self._row(trainer, with_losses=False)

    def _row(self, trainer: Trainer, with_losses: bool) -> None:
        import time

        evals = trainer.history[self._evals_seen:]
        self._evals_seen = len(trainer.history)
        if not trainer.dist.is_main:
            return
        losses = trainer.mean_losses() if with_losses else {}
        row: dict[str, Any] = {"step": trainer.step, "epoch": trainer.epoch, "lr": trainer.lr if with_losses else None,
                               "loss": sum(losses.values()) if losses else None,
                               **{f"loss/{k}": losses.get(k) for k in trainer.last_losses},
                               "seconds": round(time.perf_counter() - self._t0, 3)}  # fmt: skip
        last = evals[-1] if evals else {}
        row.update({f"val/{k}": last.get(k) for k in EVAL_COLUMNS})  # always present: fixed CSV columns
        row.update({f"val/{k}": v for k, v in last.items() if k != "step" and isinstance(v, (int, float))})
        self._write(row)

    def after_train(self, trainer: Trainer) -> None:
        if len(trainer.history) > self._evals_seen:  # the final evaluation
            self._row(trainer, with_losses=False)
        if self._tb is not None:
            self._tb.close()


__all__ = ["RecordHook", "RunFiles", "latest_run_dir", "next_run_dir"]
