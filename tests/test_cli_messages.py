"""What a newcomer meets in the first hour: honest MACs labels and flag names, logs without
progress-bar remnants or 80-column wrapping, switches shown as switches, defaults in help, a warning
when the warm-up outlasts the run, one error style, one-line refusals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def _bar_lines(text: str) -> list[str]:
    """Lines a rich progress bar leaves (``train ━━━━╸━━ 2/2 0:00:05``); tables' rules start with a
    box corner and do not count."""
    return [line for line in text.split("\n") if "\r" in line or (re.search("[━╸╺]", line) and line[:1] not in "┏┡└┃│")]


def _flat(text: str) -> str:
    """Help text with rich's box characters removed and whitespace collapsed (wrapping undone)."""
    return " ".join(re.sub(r"[│╭╮╰╯─┃]", " ", text).split())


def _commands() -> list[list[str]]:
    cmd = get_command(app)
    out = []
    for name, sub in cmd.commands.items():  # type: ignore[attr-defined]
        subs = getattr(sub, "commands", None)
        out += [[name, s] for s in subs] if subs else [[name]]
    return out


def test_switches_show_as_switches_in_every_help():
    for args in _commands():
        res = CliRunner().invoke(app, [*args, "--help"])
        assert res.exit_code == 0, (args, res.output)
        assert "<bool>" not in res.output, args
    assert "--trust-code" in CliRunner().invoke(app, ["prune", "--help"]).output


def test_train_help_shows_the_defaults(monkeypatch):
    from surgery.config.recipe import Recipe

    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 300)  # one help line per option

    train = CliRunner().invoke(app, ["train", "--help"]).output
    retrain = CliRunner().invoke(app, ["retrain", "--help"]).output
    t, r = Recipe().train, Recipe().retrain
    for key in ("steps", "batch_size", "lr", "warmup_steps"):
        flag = "--" + key.replace("_", "-")
        assert re.search(rf"{flag} .*\(default: the recipe's, else {getattr(t, key):g}\)", train), key
        assert re.search(rf"{flag} .*\(default: the recipe's, else {getattr(r, key):g}\)", retrain), key


def test_flags_say_whether_a_fraction_is_cut_or_kept():
    prune = get_command(app).commands["prune"]  # type: ignore[attr-defined]
    opts = {p.name: p.opts for p in prune.params}
    assert opts["ratio"] == ["--cut-ratio", "--ratio"]  # the old name still works
    assert opts["target_macs"] == ["--keep-macs", "--target-macs"]
    assert opts["target_params"] == ["--keep-params", "--target-params"]
    text = _flat(CliRunner().invoke(app, ["prune", "--help"]).output)
    assert "Fraction of channels CUT" in text and "Fraction of the dense MACs KEPT" in text and "ZEROED" in text


def test_macs_label_says_the_resolution_the_network_ran_at():
    """fcos_resnet18_slim with min_size=max_size=64 resizes a 128x128 image to 64x64 itself: the
    MACs counted 'at 128' are the MACs of a 64x64 network (oracle: count_macs at 64)."""
    import json

    from surgery.detectors.builders import build_model
    from surgery.measure import count_macs

    res = CliRunner().invoke(app, ["inspect", "--model", "fcos_resnet18_slim", "-k", "min_size=64", "-k", "max_size=64",
                                   "-k", "fpn_channels=64", "--macs-size", "128", "--format", "json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    model = build_model("fcos_resnet18_slim", min_size=64, max_size=64, fpn_channels=64)
    assert data["macs"] == count_macs(model, 64).total
    assert data["macs_network_input"] == [64, 64]
    table = CliRunner().invoke(app, ["inspect", "--model", "fcos_resnet18_slim", "-k", "min_size=64", "-k",
                                     "max_size=64", "-k", "fpn_channels=64", "--macs-size", "128"])  # fmt: skip
    assert "network at 64x64: the model resizes its 128x128 input itself" in _flat(table.output)
    same = CliRunner().invoke(app, ["inspect", "--model", "fcos_resnet18_slim", "-k", "min_size=64", "-k",
                                    "max_size=64", "-k", "fpn_channels=64", "--macs-size", "64"])  # fmt: skip
    assert "one 64x64 image" in _flat(same.output) and "resizes" not in same.output


def test_train_log_outside_a_terminal_has_no_bar_and_warns_about_a_warmup_longer_than_the_run(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: fcos_resnet18_slim, kwargs: {{min_size: 64, max_size: 64, fpn_channels: 64}}}}\n"
                      f"data: {{root: {tmp_path / 'synth'}, images: 8, size: 64}}\n"
                      "train: {steps: 2, batch_size: 2, log_every: 1, checkpoint_every: 0}\n")  # fmt: skip
    res = CliRunner().invoke(app, ["train", "-r", str(recipe), "--no-eval", "--out", str(tmp_path / "d.pt")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert _bar_lines(res.output) == [], res.output  # no dead bar, no carriage returns
    warning = [line for line in lines if line.startswith("warning: warm-up (100 steps) >= the run (2 steps)")]
    assert len(warning) == 1 and len(warning[0]) > 80, lines  # one line, not wrapped at 80 columns
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/2", "2/2"]

    ok = CliRunner().invoke(app, ["train", "-r", str(recipe), "--no-eval", "--warmup-steps", "1",
                                  "--out", str(tmp_path / "e.pt")])  # fmt: skip
    assert ok.exit_code == 0 and "warm-up" not in ok.output, ok.output


def _main(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("SURGERY_DEBUG", None)
    return subprocess.run([sys.executable, "-c", "from cli.main import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize("args", [["prune", "--bogus"], ["nosuch"], ["prune", "--ratio", "abc"], ["quantize", "x.pt"],
                                  ["sweep", "no_such_recipe"]])  # fmt: skip
def test_one_error_style_for_usage_and_known_errors(args):
    res = _main(*args)
    assert res.returncode == 2, res
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr
    assert not any(c in res.stderr for c in "╭╰│"), res.stderr  # no boxed panel


def test_a_builders_refusal_is_one_line_without_its_config(monkeypatch):
    from surgery.detectors import builders as models
    from surgery.errors import UnknownModelError

    cfg = {"backbone": [[-1, 1, "Conv", [64, 3, 2]]] * 50, "head": [[-1, 1, "v10Detect", [80]]]}

    def refusing(**kwargs):
        raise UnknownModelError("head v10Detect is not supported")

    def failing(**kwargs):
        raise ValueError("bad layer")

    from surgery.detectors import specs

    monkeypatch.setitem(specs._SCHEMES, "fake", lambda spec: refusing)
    monkeypatch.setattr("surgery.detectors.builders.check_builder_kwargs", lambda *a: None)
    with pytest.raises(UnknownModelError) as e:
        models.build_model(models.ModelSpec("fake:x.yaml", {"cfg": cfg, "nc": 4}))
    assert str(e.value) == "head v10Detect is not supported"  # the builder's own line, unwrapped
    monkeypatch.setitem(specs._SCHEMES, "fake", lambda spec: failing)
    with pytest.raises(UnknownModelError) as e:
        models.build_model(models.ModelSpec("fake:x.yaml", {"cfg": cfg, "nc": 4}))
    assert str(e.value) == "model 'fake:x.yaml' rejected its arguments cfg=<dict>, nc=4: bad layer"
