"""Through the real entry point (``python -m surgery``): bad option values are one ``error:`` line
(not Typer's boxed panel), Ctrl-C during training says what was kept and how to resume, and a
full disk during prune is one line with nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLIM = ["-k", "min_size=64", "-k", "max_size=64", "-k", "fpn_channels=64"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.parametrize(
    "args,flag",
    [(["quantize", "m.onnx", "--calib-batches", "0"], "--calib-batches"),
     (["predict", "m.pt", "x.png", "--batch-size", "0"], "--batch-size"),
     (["prune", "--bogus"], "--bogus")],
)  # fmt: skip
def test_bad_option_values_are_one_error_line(tmp_path, args, flag) -> None:
    r = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], r.stderr
    assert "╭" not in r.stderr + r.stdout


def _deliverable_sigint() -> None:
    """In the child before exec: SIGINT unblocked and at its default disposition. A blocked signal
    mask and SIG_IGN are inherited through exec, and earlier tests in the same pytest process (thread
    pools, multiprocessing) can leave them set: the child then never sees the Ctrl-C this test sends."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _clean_env() -> dict[str, str]:
    """Only what the child needs: nothing an earlier test left in os.environ (a RANK/WORLD_SIZE, a
    SURGERY_* setting, pytest's own variables) reaches it."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OMP_WAIT_POLICY", "YOLO_CONFIG_DIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


# In the default suite again. It used to hang only in full-suite runs, never alone (45 SIGINTs by
# hand all exited in 3 s). What the child inherited from pytest's process is now cut off: it runs in
# its own session (no shared process group or controlling terminal), with a clean environment,
# SIGINT unblocked and at its default action, output to files (no pipe the test must drain while
# it waits: a full pipe blocks the child's writes), and Ctrl-C is sent the way a terminal sends it,
# to the child's whole process group. Every wait is bounded.
def test_ctrl_c_during_training_says_what_was_kept(tmp_path) -> None:
    from surgery.data import synthesize

    shapes = synthesize(tmp_path / "shapes", images=8, size=64, seed=3, val_images=4).root
    out = tmp_path / "run.pt"
    cmd = [sys.executable, "-m", "surgery", "train", "--model", "fcos_resnet18_slim", "--data", str(shapes), "-b", "2",
           "--steps", "100000", "--checkpoint-every", "1", "--no-eval", "--workers", "0", "--out", str(out), *SLIM]  # fmt: skip
    log_out, log_err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with log_out.open("w") as fo, log_err.open("w") as fe:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=_clean_env(), cwd=tmp_path,
                             start_new_session=True, preexec_fn=_deliverable_sigint)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not out.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert out.exists(), log_err.read_text() if p.poll() is not None else "no checkpoint in time"
            os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
            p.wait(timeout=120)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    err = log_err.read_text()
    assert p.returncode == 130, err
    line = next(ln for ln in err.splitlines() if ln.startswith("interrupted:"))
    assert f"{out} holds step" in line and f"--resume --out {out}" in line
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".")) == []  # no temporary, no lock


def test_full_disk_during_prune_is_one_line(tmp_path) -> None:
    """``open`` patched (in the child, before the CLI runs) to fail with ENOSPC under ``tmp_path``."""
    code = (
        "import builtins, errno, os, sys\n"
        f"root = {str(tmp_path)!r}\n"
        "real = builtins.open\n"
        "def full(file, mode='r', *a, **k):\n"
        "    if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(root) and 'w' in mode:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', os.fspath(file))\n"
        "    return real(file, mode, *a, **k)\n"
        "builtins.open = full\n"
        "sys.argv = ['surgery', *sys.argv[1:]]\n"
        "from cli.main import main\n"
        "main()\n"
    )
    out = tmp_path / "p.pt"
    r = subprocess.run([sys.executable, "-c", code, "prune", "--model", "fcos_resnet18_slim", "--ratio", "0.25",
                        "--method", "l1", "--out", str(out), *SLIM], capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=600)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0] and str(out) in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == []
