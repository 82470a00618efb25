"""The README's Usage chain, run as written through the real entry point, with smaller step
counts and image sizes and a named INT8 form (the only substitutions)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

README = Path(__file__).resolve().parent.parent / "README.md"
SMALL = {"--steps": "2", "--images": "12", "--size": "64"}  # flag -> value for the test
# appended to a command for the test: the INT8 form choice (tests/test_int8_forms.py) is not what this tests
PINNED = {"quantize": ["--form", "qdq-per-channel"]}


def chain_commands() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"<!-- usage-chain -->\s*```bash\n(.*?)```\s*<!-- /usage-chain -->", text, re.S)
    assert block, "README.md has no usage-chain block"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split("  #")[0].strip()
        if not line:
            continue
        args = shlex.split(line)
        assert args[0] == "surgery", line
        args = args[1:]
        for i, a in enumerate(args[:-1]):
            if a in SMALL:
                args[i + 1] = SMALL[a]
        commands.append(args + PINNED.get(args[0], []))
    return commands


def test_readme_usage_chain_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    outputs = {}
    commands = chain_commands()
    assert [c[0] for c in commands] == ["data", "train", "prune", "retrain", "eval", "bench", "export", "quantize",
                                        "bench", "eval", "predict", "info"]
    for args in commands:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, f"surgery {' '.join(args)}\n{res.output}"
        assert "Traceback" not in res.output
        outputs[args[0]] = res.output
    # not a terminal: plain step lines, no cut names
    assert re.search(r"step 2/2 +loss", outputs["train"]), outputs["train"]
    assert Path("dense.pt").is_file() and Path("dense.best.pt").is_file() and Path("dense.metrics.csv").is_file()
    assert "kept" in outputs["prune"] and "one 128x128 image" in outputs["prune"]
    metrics = json.loads(Path("metrics.json").read_text())
    assert "mAP" in metrics["metrics"]
    dets = json.loads(Path("predictions/detections.json").read_text())
    assert len(dets) == len(list(Path("shapes/val").iterdir())) and all(Path(d["drawn"]).is_file() for d in dets)
    assert "retrained from pruned.pt" in outputs["info"] and "structured l1 ratio 0.5" in outputs["info"]
    assert "from dense.pt" in outputs["info"] and "rectangle, ellipse, triangle, cross" in outputs["info"]
    assert Path("retrained.onnx").stat().st_size > 0
    # the INT8 file is smaller, benches and evaluates like a checkpoint, and predict draws from it
    assert 0 < Path("retrained.int8.onnx").stat().st_size < 0.5 * Path("retrained.onnx").stat().st_size
    assert "onnxruntime" in outputs["bench"] and "mAP" in outputs["eval"]
