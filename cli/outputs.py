"""Outputs of a command, checked before any work: never a silent overwrite (``--overwrite``), never
an input, a link or a device, two outputs of one call never on one path, and one lock per output
file while the command runs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from surgery.storage.safety import OutputError, OutputLock, check_folder, check_output

# parameters naming output files (-> the flag shown in errors)
OUTPUT_PARAMS = {"out": "--out", "json_out": "--json", "csv": "--csv", "detections": "--detections",
                 "keep_float": "--keep-float", "plot": "--plot"}
FOLDER_OUTPUTS = ("sweep", "predict")  # their --out is a folder
# a sweep's --out is its run folder: re-running the sweep resumes it (steps keyed by their settings);
# so does compress's (its study; workers on one machine share it)
RESUMED_FOLDERS = ("sweep", "compress")
# output files a re-run continues: sensitivity's table keeps its rows (keyed by checkpoint and settings,
# so another run's table is refused by the library) and its plot is redrawn from that table;
# --overwrite starts the table again
RESUMED_FILES = {("sensitivity", "--csv"), ("sensitivity", "--plot")}

OVERWRITE_HELP = "Replace outputs that already exist (without it an existing output is refused before any work)."
_OVERWRITE: ContextVar[bool] = ContextVar("surgery_overwrite", default=False)


@contextlib.contextmanager
def overwriting(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`refuse_existing` lets existing outputs be replaced (``--overwrite``)."""
    token = _OVERWRITE.set(bool(enabled))
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def overwrite_allowed() -> bool:
    return _OVERWRITE.get()


def refuse_existing(path: str | Path, flag: str, *, folder: bool = False, hint: str = "") -> None:
    """Never a silent overwrite: the one check every command that writes runs before any work. An
    existing output file (or a non-empty output folder) is refused in one line unless the command
    runs with ``--overwrite``. Links, devices and inputs are refused by :func:`surgery.storage.safety.check_output`
    whatever the flag says."""
    p = Path(path)
    present = (p.is_dir() and any(p.iterdir())) if folder else (p.exists() or p.is_symlink())
    if present and not _OVERWRITE.get():
        what = "folder" if folder else "file"
        raise OutputError(f"{flag} {p}: the {what} exists and is kept; pass --overwrite to replace it{hint}")


def check_outputs(command: str, bound: dict[str, Any], inputs: list[Any]) -> None:
    """Every output of this call: writable, not an input, not existing unless ``--overwrite``
    (``--resume`` continues a training run), and no two on one path."""
    outputs = {flag: bound.get(name) for name, flag in OUTPUT_PARAMS.items() if bound.get(name) is not None}
    if command == "export" and bound.get("out") is None and bound.get("checkpoint") is not None:
        outputs["--out (default)"] = Path(bound["checkpoint"]).with_suffix(".onnx")
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if command in FOLDER_OUTPUTS and flag == "--out":
            check_folder(path, what="--out")
            if command not in RESUMED_FOLDERS:
                refuse_existing(path, flag, folder=True, hint=", or another folder")
        else:
            check_output(path, inputs=inputs, what=flag)
            if not bound.get("resume") and (command, flag) not in RESUMED_FILES:  # --resume: train/retrain continue
                hint = ", --resume to continue that run" if "resume" in bound else ""
                refuse_existing(path, flag, hint=f"{hint}, or another {flag.split()[0]}")
        key = os.path.realpath(os.path.abspath(os.fspath(path)))
        if key in seen:  # e.g. quantize --out k.onnx --keep-float k.onnx: one would replace the other
            raise OutputError(f"{flag} {path} and {seen[key]} are the same file; give each output its own path")
        seen[key] = f"{flag} {path}"


def file_outputs(command: str, bound: dict[str, Any]) -> list[tuple[str, Path]]:
    """The output files this call writes (the folders of sweep/predict are locked by those commands)."""
    out = [(flag, Path(bound[name])) for name, flag in OUTPUT_PARAMS.items() if bound.get(name) is not None]
    if command == "export" and bound.get("out") is None and bound.get("checkpoint") is not None:
        out.append(("--out", Path(bound["checkpoint"]).with_suffix(".onnx")))
    return [(f, p) for f, p in out if not (command in FOLDER_OUTPUTS and f == "--out")]


def output_locks(command: str, bound: dict[str, Any]) -> contextlib.ExitStack:
    """One lock per output file for the whole call: a second process writing the same file refuses
    (two ``train --out same.pt`` would interleave their metrics and keep one run's weights). Under
    torchrun only rank 0 writes, so only it locks."""

    stack = contextlib.ExitStack()
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return stack
    try:
        for flag, path in file_outputs(command, bound):
            stack.enter_context(OutputLock(path, what=flag))
    except BaseException:
        stack.close()
        raise
    return stack
