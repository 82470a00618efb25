"""Nothing from a file reaches the terminal unescaped: a name holding escape
sequences (clear screen, window title), a newline that forges an ``error:`` line and Rich markup
shows as those characters, in every command that prints it, and long values are shortened."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from cli.console import SafeConsole, plain, shown
from surgery.detectors.builders import ModelSpec
from surgery.storage.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
EVIL = "cat\x1b[2J\x1b]0;owned\x07[bold red]big[/bold red]\u202e\nerror: fake"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)  # fmt: skip


def _assert_escaped(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, repr(text)
    assert "\\x1b[2J" in text and "\\x1b]0;owned\\x07" in text and "\\u202e" in text, text
    assert "[bold red]big[/bold red]" in text, text  # markup shown, not interpreted
    assert not any(line.startswith("error: fake") for line in text.splitlines()), text


def test_shown_escapes_controls_markup_and_shortens() -> None:
    out = shown(EVIL)
    assert "\n" not in out and "\x1b" not in out and out.count("\\[") == 2
    assert plain("x" * 1000, 50) == "x" * 49 + "…"
    buf = io.StringIO()
    SafeConsole(file=buf, width=300).print(f"note: {shown(EVIL)}")
    _assert_escaped(buf.getvalue())


def test_console_escapes_control_characters_a_caller_forgot() -> None:
    from rich.table import Table

    buf = io.StringIO()
    con = SafeConsole(file=buf, width=300)
    table = Table()
    table.add_column("name")
    table.add_row("a\x1b[2Jb")
    con.print(table)
    con.print("raw \x1b]0;title\x07 line")
    assert "\x1b" not in buf.getvalue() and "\\x1b[2J" in buf.getvalue() and "\\x1b]0;title\\x07" in buf.getvalue()


def test_info_shows_class_names_and_kwargs_escaped(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, nn.Linear(1, 1), ModelSpec("fcos_resnet18_slim", {"num_classes": 2, "note": EVIL}),
                    class_names=["__background__", EVIL], metrics={"mAP": 0.5, EVIL: EVIL})  # fmt: skip
    r = _run("info", str(ckpt), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _assert_escaped(r.stdout)
    for start in ("  classes:", str(ckpt), "│ cat"):  # each place it is printed: classes, builder arguments, metrics
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(start))
        _assert_escaped(line)
    r = _run("info", str(ckpt), "--format", "csv", cwd=tmp_path)
    assert "\x1b" not in r.stdout


def test_info_with_deeply_nested_metrics_is_one_summary(tmp_path: Path) -> None:
    from surgery.storage.info import _scalars

    def nested(depth: int) -> dict:
        deep: dict = {"x": 1}
        for _ in range(depth):
            deep = {"d": deep}
        return deep

    flat = _scalars({"deep": nested(5000), "mAP": 0.5})  # a RecursionError before
    assert flat["mAP"] == 0.5 and flat["deep" + ".d" * 8] == "<1 more nested keys, not shown>"
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, nn.Linear(1, 1), ModelSpec("fcos_resnet18_slim", {"num_classes": 2}),
                    metrics={"deep": nested(400)})  # fmt: skip
    r = _run("info", str(ckpt), cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "more nested keys, not shown" in r.stdout, r.stdout


def test_error_line_escapes_a_checkpoint_config_name(tmp_path: Path) -> None:
    import yaml

    cfg = yaml.safe_load((ROOT / "tests" / "data" / "yolo_tiny.yaml").read_text())
    cfg["backbone"][1] = [-1, 1, "Conv", [64, 5000, 1]]
    cfg["yaml_file"] = EVIL + "x" * 4000  # long too: shortened
    ckpt = tmp_path / "y.pt"
    save_checkpoint(ckpt, nn.Linear(1, 1), ModelSpec("ultralytics:yolov8n.yaml", {"cfg": cfg, "size": 64}))
    r = _run("eval", str(ckpt), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "argument k = 5000" in lines[0], r.stderr
    _assert_escaped(r.stderr)
    assert len(lines[0]) < 1000


def test_train_note_with_dataset_category_names_is_escaped(monkeypatch) -> None:
    from cli.display import TrainDisplay

    buf = io.StringIO()
    display = TrainDisplay("train", enabled=True)
    monkeypatch.setattr(display.progress.console, "_file", buf)  # the display's own console; "_file": undo restores None (follow sys.stdout), not the stream of the moment
    display.on_note(f"num_classes=2 from the data ({EVIL} + background)")
    display.on_warning(EVIL)
    _assert_escaped(buf.getvalue())


@pytest.mark.parametrize("name", ["a\nb", "\x9b31m", "\u2066x\u2069"])
def test_shown_escapes_every_line_breaking_or_reordering_character(name: str) -> None:
    out = shown(name)
    assert all(ch not in out for ch in "\n\x9b\u2066\u2069"), out
