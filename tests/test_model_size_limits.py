"""Size before build: a model config, a builder argument, a file or an image that asks for more
memory than a 24 GB machine has is one clear line before anything is allocated.

Oracles: the cost estimate is checked against the parameter count of models Ultralytics really
builds (it must not under-count them), every payload of the issue is refused by the argument it
abuses, and peak memory stays far below what the payload would allocate."""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from surgery.data.images import read_rgb
from surgery.errors import DataError, RecipeError, UnknownModelError
from surgery.yolo.config_check import (
    BUILD_GB_ENV,
    check_config,
    estimate_cost,
    max_build_bytes,
    model_size_limit,
)
from tests.extras import require

ROOT = Path(__file__).resolve().parent.parent


def _tiny() -> dict:
    return yaml.safe_load((ROOT / "tests" / "data" / "yolo_tiny.yaml").read_text())


def _row(cfg: dict, part: str, i: int, row: list) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg[part][i] = row
    return cfg


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# each payload of the issue, with the argument the error must name
PAYLOADS = [
    ("backbone", 1, [-1, 1, "Conv", [64, 5000, 1]], "argument k = 5000"),  # 102 GB kernel bomb
    ("backbone", 1, [-1, 1, "Conv", [64, 1200, 1]], "argument k = 1200"),  # ~6 GB, really allocated before
    ("backbone", 1, [-1, 1, "Conv", [64, -3, 1]], "argument k = -3"),
    ("backbone", 1, [-1, 1, "Conv", [64, 3, 0]], "argument s = 0"),
    ("backbone", 1, [-1, 1, "Conv", [0, 3, 2]], "argument c2 = 0"),
    ("backbone", 1, [-1, 1, "Conv", [64, 3, 2, 5000]], "argument p = 5000"),
    ("backbone", 2, [-1, 3, "C2f", [128, True, 1, 2000]], "argument e = 2000"),  # 590 GB
    ("backbone", 1, [-1, 1, "HGBlock", [50000, 128, 3]], "argument cm = 50000"),
    ("backbone", 1, [-1, 1, "ResNetLayer", [16, 50000, 1, False, 1]], "argument c2 = 50000"),
    ("backbone", 1, [-1, 1, "nn.ConvTranspose2d", [64, 2000, 2]], "argument kernel_size = 2000"),
    ("backbone", 1, [-1, 1, "nn.ConvTranspose2d", [64, 2, 2, 0, 0, 1, True, 900]], "argument dilation = 900"),
    ("head", 0, [-1, 1, "nn.Upsample", [None, 100000, "nearest"]], "argument scale_factor = 100000"),  # 2.6 PB
    ("head", 0, [-1, 1, "nn.Upsample", [90000, None, "nearest"]], "argument size = 90000"),
    ("head", 0, [-1, 1, "nn.ZeroPad2d", [50000]], "argument padding = 50000"),
    ("backbone", 1, [-1, 1, "Conv", ["nc", 3, 2]], "argument c2 = 'nc' \\(nc = 50000\\)"),  # nc as a channel count
    ("backbone", 1, [-1, 1, "Conv", [64, 3, 2, None, 1, 1, True, 7]], "at most 7 argument"),
]


@pytest.mark.parametrize("part,i,row,match", PAYLOADS, ids=[p[3].split(" = ")[0] + str(n) for n, p in enumerate(PAYLOADS)])
def test_every_layer_argument_is_bounded_by_its_meaning(part: str, i: int, row: list, match: str) -> None:
    cfg = _row(_tiny(), part, i, row)
    cfg["nc"] = 50000
    with pytest.raises(UnknownModelError, match=match) as e:
        check_config(cfg, "bomb.yaml")
    assert "\n" not in str(e.value) and "bomb.yaml" in str(e.value)


def test_nc_override_used_as_a_channel_count_is_bounded() -> None:
    cfg = _row(_tiny(), "backbone", 1, [-1, 1, "Conv", ["nc", 3, 2]])
    check_config(cfg, "tiny", nc=16)  # a small class count is a fine width
    with pytest.raises(UnknownModelError, match="nc = 90000"):
        check_config(cfg, "tiny", nc=90000)  # -k nc=90000 on a yaml that uses nc as a width


def test_prelu_activation_with_a_huge_parameter_count_is_refused() -> None:
    for act in ("nn.PReLU(num_parameters=100000000)", "nn.PReLU(100000000)"):
        with pytest.raises(UnknownModelError, match="num_parameters must be 1"):
            check_config({**_tiny(), "activation": act}, "tiny")
    check_config({**_tiny(), "activation": "nn.PReLU()"}, "tiny")


def test_cost_estimate_never_undercounts_real_models() -> None:
    """The estimate is an upper bound (within 5x) of what Ultralytics builds, so the limit means something."""
    require("ultralytics")
    from surgery.yolo.ultralytics_adapter import _ultralytics

    u = _ultralytics()
    for cfg in (_tiny(), u.tasks.yaml_model_load("yolov8n.yaml"), u.tasks.yaml_model_load("yolo11n.yaml")):
        real = sum(p.numel() for p in u.tasks.DetectionModel(copy.deepcopy(cfg), verbose=False).parameters())
        est = estimate_cost(cfg, 640).params
        assert real <= est <= 5 * real, (cfg.get("yaml_file"), real, est)


def test_a_config_that_fits_every_row_bound_is_refused_by_its_cost(monkeypatch) -> None:
    wide = [[-1, 1, "Conv", [8192, 31, 1]]] * 6  # each row legal, together ~2 TB of weights
    cfg = {**_tiny(), "scales": {"n": [1.0, 1.0, 8192]}, "backbone": wide, "head": [[[-1], 1, "Detect", ["nc"]]]}
    with pytest.raises(UnknownModelError, match=f"GiB limit \\(pass --max-model-gb or set {BUILD_GB_ENV}"):
        check_config(cfg, "wide")
    check_config(_tiny(), "tiny", size=640)
    with pytest.raises(UnknownModelError, match="GiB limit"):
        check_config(_tiny(), "tiny", size=4096 * 8)  # activations grow with the trace size
    monkeypatch.setenv(BUILD_GB_ENV, "0.001")  # the limit is a setting: lowered, the tiny model is refused
    with pytest.raises(UnknownModelError, match="0.001 GiB limit"):
        check_config(_tiny(), "tiny")
    monkeypatch.setenv(BUILD_GB_ENV, "100000")  # raised on purpose, the big config passes the check
    check_config(cfg, "wide")


def test_size_limit_context_holds_for_its_block_only(monkeypatch) -> None:
    monkeypatch.delenv(BUILD_GB_ENV, raising=False)
    with model_size_limit(0.001), pytest.raises(UnknownModelError, match="0.001 GiB limit"):
        check_config(_tiny(), "tiny")
    assert max_build_bytes() == 12 * 2**30  # nothing leaks out of the block
    monkeypatch.setenv(BUILD_GB_ENV, "0.001")
    with model_size_limit(100):  # the explicit setting wins over the environment's default
        check_config(_tiny(), "tiny")
    with model_size_limit(None), pytest.raises(UnknownModelError, match="0.001 GiB limit"):
        check_config(_tiny(), "tiny")


def _cli(*args: str):
    from typer.testing import CliRunner

    from cli.main import app

    return CliRunner().invoke(app, list(args))


def test_max_model_gb_flag_sets_the_limit_for_that_call(monkeypatch) -> None:
    """Lowered, the flag refuses a model the default lets through, naming itself; raised, it lets a
    config the default refuses reach the build (stubbed here: 25 GiB are never allocated)."""
    require("ultralytics")
    from surgery.yolo import ultralytics_adapter

    monkeypatch.delenv(BUILD_GB_ENV, raising=False)
    tiny, before = f"ultralytics:{ROOT / 'tests' / 'data' / 'yolo_tiny.yaml'}", _peak_mb()
    res = _cli("inspect", "--model", tiny, "--max-model-gb", "0.001")
    assert isinstance(res.exception, UnknownModelError), res.output
    assert "more than the 0.001 GiB limit (pass --max-model-gb" in str(res.exception)
    assert max_build_bytes() == 12 * 2**30  # the call's limit did not leak into the process

    def built(tasks):
        raise UnknownModelError("stub: the size check passed")

    monkeypatch.setattr(ultralytics_adapter, "_restricted", built)
    big = ("inspect", "--model", tiny, "-k", "size=4096")  # ~25 GiB of activations at 4096 px
    res = _cli(*big)
    assert "more than the 12 GiB limit (pass --max-model-gb" in str(res.exception), res.output
    res = _cli(*big, "--max-model-gb", "100")
    assert "stub: the size check passed" in str(res.exception), res.output
    assert _peak_mb() - before < 500  # the process's peak: earlier tests in the session may have set it


def test_every_command_that_builds_a_model_takes_max_model_gb() -> None:
    from cli.guard import SIZED_COMMANDS

    for command in SIZED_COMMANDS:
        res = _cli(command, "--help")
        assert res.exit_code == 0 and "--max-model-gb" in res.output, command


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "big"])
def test_max_model_gb_bad_values_are_one_error_line(value: str, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "surgery", "inspect", "--model", "fcos_resnet18_slim", "--max-model-gb", value],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "--max-model-gb" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_checkpoint_config_payload_is_refused_before_allocation(tmp_path) -> None:
    require("ultralytics")
    from torch import nn

    from surgery.detectors.builders import ModelSpec
    from surgery.storage.checkpoint import load, save_checkpoint

    cfg = _row(_tiny(), "backbone", 1, [-1, 1, "Conv", [64, 1200, 1]])  # ~6 GB of weights if built
    ckpt = tmp_path / "k.pt"
    save_checkpoint(ckpt, nn.Linear(1, 1), ModelSpec("ultralytics:yolov8n.yaml", {"cfg": cfg, "size": 64}))
    before = _peak_mb()
    with pytest.raises(UnknownModelError, match="argument k = 1200"):
        load(ckpt)
    assert _peak_mb() - before < 500


@pytest.mark.parametrize("size", [100000, -5, 0, 16, "big"])
def test_builder_size_argument_is_bounded_before_build(size) -> None:
    require("ultralytics")
    from surgery.detectors.builders import ModelSpec, build_model

    with pytest.raises(UnknownModelError, match="size"):
        build_model(ModelSpec("ultralytics:yolov8n.yaml", {"nc": 4, "size": size}))
    with pytest.raises(UnknownModelError, match="size"):
        build_model(ModelSpec("fcos_resnet18_slim", {"min_size": 100000}))


def test_cli_size_flags_are_bounded(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for args in (["inspect", "--model", "fcos_resnet18_slim", "--macs-size", "100000"],
                 ["prune", "--model", "fcos_resnet18_slim", "--macs-size", "100000", "--out", "p.pt"],
                 ["quantize", "x.pt", "--input-size", "100000", "--out", "q.onnx"]):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=120)  # fmt: skip
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and "100000" in errors[0], (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_yaml_files_are_sized_before_they_are_read(tmp_path) -> None:
    from surgery.config.recipe import load_recipe
    from surgery.detectors.builders import ModelSpec, build_model

    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # 3 GB, sparse: reading it would take 3 GB of memory and seconds
    before, t0 = _peak_mb(), time.monotonic()
    with pytest.raises(RecipeError, match="3221225472 bytes.*refused before reading"):
        load_recipe(big)
    with pytest.raises(UnknownModelError, match="3221225472 bytes.*refused before reading"):
        build_model(ModelSpec(f"ultralytics:{big}"))
    assert time.monotonic() - t0 < 10 and _peak_mb() - before < 200


def test_fifo_recipe_is_named_not_missing(tmp_path) -> None:
    from surgery.config.recipe import load_recipe

    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(RecipeError, match="is a FIFO, not a regular file"):
        load_recipe(fifo)  # never opened: opening a FIFO would block until a writer comes


def test_huge_integers_in_yaml_are_one_line() -> None:
    from cli.common import parse_kv
    from surgery.storage.trust import safe_yaml_load

    with pytest.raises(RecipeError, match="digits"):
        safe_yaml_load("prune:\n  ratio: " + "9" * 5000, "r.yaml")
    with pytest.raises(RecipeError, match="digits"):
        parse_kv(["nc=" + "9" * 5000], "--kwarg")


def test_image_header_larger_than_the_limit_is_refused_before_decoding(tmp_path) -> None:
    png = tmp_path / "black.png"
    Image.new("1", (12000, 12000)).save(png)  # ~140 KB on disk, 1.7 GB as a float image
    assert png.stat().st_size < 1 << 20
    before = _peak_mb()
    with pytest.raises(DataError, match="12000x12000 pixels.*refused before decoding"):
        read_rgb(png)
    assert _peak_mb() - before < 100  # decoding alone would be 144 MB as 8-bit grey, 432 MB as RGB


def test_dataset_images_are_checked_by_header(tmp_path, monkeypatch) -> None:
    from surgery.data import images
    from surgery.data.loader import build_dataset
    from surgery.data.synth import synthesize

    synthesize(tmp_path / "d", images=2, size=64, val_images=1)
    ds = build_dataset(str(tmp_path / "d"), "train", train=False)
    assert ds.load_image(0).shape[-1] == 64
    monkeypatch.setattr(images, "MAX_PIXELS", 100)  # the header says 64x64: more than 100 pixels
    with pytest.raises(DataError, match="64x64 pixels.*refused before decoding"):
        ds.load_image(0)
