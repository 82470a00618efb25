"""Hostile Ultralytics model configs: a checkpoint's recorded config (``model.kwargs.cfg``) or a
user's yaml is data. Nothing in it runs, whether or not ``ultralytics`` was imported before surgery
(its restricted mode is read at its own import), through the Python API and the CLI alike.

The crafted payloads are proven live: the same process then hands them to Ultralytics' own
``parse_model`` directly and the marker file appears, so these tests fail if the check goes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from surgery.errors import RecipeError, UnknownModelError
from surgery.yolo.config_check import check_config
from tests.extras import require

ROOT = Path(__file__).resolve().parent.parent


def _shipped(name: str = "yolov8n.yaml") -> dict:
    from surgery.yolo import ultralytics_adapter

    return ultralytics_adapter._ultralytics().tasks.yaml_model_load(name)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "ULTRALYTICS_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["YOLO_CONFIG_DIR"] = str(Path.home() / ".cache" / "surgery" / "ultralytics")  # no settings file in $HOME
    return env


# One fresh process: ultralytics imported FIRST (restricted mode off), then surgery. Each payload
# goes through surgery.load (a checkpoint) or build_model (a user yaml); then, as the control, the
# same activation/row through Ultralytics' own parse_model, which must create its marker.
_SCRIPT = textwrap.dedent(
    r"""
    import copy, json, os, pickle, sys
    import ultralytics  # first, as a user's notebook might
    from ultralytics.nn import tasks
    import torch, yaml
    from torch import nn
    import surgery
    from surgery.storage.checkpoint import save_checkpoint
    from surgery.detectors.builders import ModelSpec, build_model

    tmp = sys.argv[1]
    out = {"safe_load_at_import": bool(tasks.SAFE_LOAD)}
    base = tasks.yaml_model_load("yolov8n.yaml")

    class Boom:  # a pickle that touches a marker when loaded
        def __init__(self, path): self.path = path
        def __reduce__(self): return (os.system, (f"touch {self.path}",))

    def act_cfg(marker):
        cfg = copy.deepcopy(base)
        cfg["activation"] = f'__import__("os").system("touch {marker}") or nn.SiLU()'
        return cfg

    def pickle_cfg(marker):
        pkl = os.path.join(tmp, os.path.basename(marker) + "_w.pt")
        with open(pkl, "wb") as f:
            pickle.dump(Boom(marker), f)
        cfg = copy.deepcopy(base)
        # a bare relative name (the process runs in tmp): Ultralytics passes it on as a string
        cfg["backbone"] = [[-1, 1, "torch_safe_load", [os.path.basename(pkl)]]] + cfg["backbone"]
        return cfg

    def attempt(key, fn):
        marker = os.path.join(tmp, key)
        try:
            fn(marker)
            result = "built"
        except Exception as e:
            result = f"{type(e).__name__}: {e}"
        out[key] = {"result": result, "marker": os.path.exists(marker)}

    def via_checkpoint(make):
        def run(marker):
            path = os.path.join(tmp, os.path.basename(marker) + ".pt")
            save_checkpoint(path, nn.Linear(1, 1), ModelSpec("ultralytics:yolov8n.yaml", {"cfg": make(marker), "size": 64}))
            surgery.load(path)
        return run

    def via_yaml(make):
        def run(marker):
            path = os.path.join(tmp, os.path.basename(marker) + ".yaml")
            cfg = make(marker)
            cfg.pop("yaml_file", None)
            with open(path, "w") as f:
                yaml.safe_dump(cfg, f)
            build_model(ModelSpec(f"ultralytics:{path}", {"size": 64}))
        return run

    attempt("ckpt_activation", via_checkpoint(act_cfg))
    attempt("ckpt_torch_safe_load", via_checkpoint(pickle_cfg))
    attempt("yaml_activation", via_yaml(act_cfg))
    attempt("yaml_torch_safe_load", via_yaml(pickle_cfg))

    def control_act(marker):
        tasks.parse_model(act_cfg(marker), ch=3, verbose=False)
    def control_pickle(marker):
        tasks.parse_model(pickle_cfg(marker), ch=3, verbose=False)
    attempt("control_activation", control_act)
    attempt("control_torch_safe_load", control_pickle)
    print(json.dumps(out))
    """
)


def test_crafted_configs_run_nothing_with_ultralytics_imported_first(tmp_path) -> None:
    require("ultralytics")
    script = tmp_path / "probe.py"
    script.write_text(_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["safe_load_at_import"] is False  # the situation of the issue: restricted mode off
    for key in ("ckpt_activation", "ckpt_torch_safe_load", "yaml_activation", "yaml_torch_safe_load"):
        assert out[key]["marker"] is False, (key, out[key])
        assert out[key]["result"].startswith("UnknownModelError"), (key, out[key])
        assert "refused" in out[key]["result"] and "\n" not in out[key]["result"]
    assert "activation" in out["ckpt_activation"]["result"]
    assert "torch_safe_load" in out["ckpt_torch_safe_load"]["result"]
    # controls: the payloads are live when Ultralytics itself evaluates them in this process
    assert out["control_activation"]["marker"] is True, out["control_activation"]
    assert out["control_torch_safe_load"]["marker"] is True, out["control_torch_safe_load"]


def test_crafted_checkpoint_through_the_cli_is_one_line(tmp_path) -> None:
    require("ultralytics")
    import torch
    from torch import nn

    from surgery.detectors.builders import ModelSpec
    from surgery.storage.checkpoint import save_checkpoint

    marker = tmp_path / "marker"
    cfg = _shipped()
    cfg["activation"] = f'__import__("os").system("touch {marker}") or nn.SiLU()'
    ckpt = tmp_path / "evil.pt"
    save_checkpoint(ckpt, nn.Linear(1, 1), ModelSpec("ultralytics:yolov8n.yaml", {"cfg": cfg, "size": 64}))
    before = ckpt.read_bytes()
    r = subprocess.run([sys.executable, "-m", "surgery", "eval", str(ckpt)], capture_output=True, text=True,
                       env=_env(), cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "activation" in lines[0] and "refused" in lines[0], r.stderr
    assert not marker.exists() and ckpt.read_bytes() == before
    assert torch.load(ckpt, weights_only=True)["model"]["kwargs"]["cfg"]["activation"] == cfg["activation"]


def test_every_shipped_detection_yaml_passes_the_check() -> None:
    require("ultralytics")
    for name in ("yolov3-tiny.yaml", "yolov5n.yaml", "yolov6n.yaml", "yolov8n.yaml", "yolov9t.yaml",
                 "yolov10n.yaml", "yolo11n.yaml", "yolo12n.yaml", "yolo26n.yaml", "yolov8x.yaml",
                 "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolo11n-obb.yaml", "yolo26n-seg.yaml", "yolo26n-pose.yaml"):  # fmt: skip
        check_config(_shipped(name), name)
    for name in ("yolo11n-cls.yaml", "yolov8s-worldv2.yaml", "yoloe-26n-seg.yaml"):
        with pytest.raises(UnknownModelError, match="refused"):
            check_config(_shipped(name), name)


def _with(cfg: dict, path: str, value) -> dict:
    import copy

    cfg = copy.deepcopy(cfg)
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    "path,value,match",
    [
        ("nc", -1, "nc"),
        ("nc", 10**9, "nc"),
        ("nc", True, "nc"),
        ("scales.n", [math.nan, 0.25, 1024], "scales.n"),
        ("scales.n", [0.33, 1000, 1024], "scales.n"),
        ("scales.n", [100000, 0.25, 1024], "scales.n"),
        ("scales.n", [0.33, -0.25, 1024], "scales.n"),
        ("activation", "nn.Module()", "activation"),
        ("activation", "nn.SiLU(__import__('os'))", "activation"),
        ("activation", "torch.load('x.pt')", "activation"),
        ("backbone.0.2", "torch_safe_load", "torch_safe_load"),
        ("backbone.0.2", "TorchVision", "TorchVision"),
        ("backbone.0.2", "nn.Module", "nn.Module"),
        ("backbone.0.1", 10**6, "repeats"),
        ("backbone.0.0", 5, "from"),
        ("backbone.0.3", ["__import__('os')"], "string argument"),
        ("backbone.0.3", [10**9, 3, 2], "out of range"),
        ("backbone.0.3", [[[[1]]]], "argument"),
        ("text_model", "clip:ViT-B/32", "unknown key"),
        # head rows go through the same allow-list as backbone rows
        ("head.0.2", "torch_safe_load", r"head\[0\]: module 'torch_safe_load'"),
        ("head.2.2", "nn.Module", r"head\[2\]: module 'nn.Module'"),
        ("head.1.1", 10**6, r"head\[1\]: repeats"),
        ("head.1.0", [-1, 9], r"head\[1\]: 'from'"),
        ("head.0.3", ["__import__('os')"], r"head\[0\]: string argument"),
        ("head.2.3", [10**9], r"head\[2\]: argument"),
        ("head", [], "head"),
    ],
)
def test_bad_configs_are_one_line(path: str, value, match: str) -> None:
    base = yaml.safe_load((ROOT / "tests" / "data" / "yolo_tiny.yaml").read_text())
    check_config(base, "tiny")  # the base is fine
    with pytest.raises(UnknownModelError, match=match) as e:
        check_config(_with(base, path, value), "tiny")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_width_and_depth_multiples_bound_the_size() -> None:
    base = yaml.safe_load((ROOT / "tests" / "data" / "yolo_tiny.yaml").read_text())
    base.pop("scales")
    for key, value in (("width_multiple", 1000), ("depth_multiple", 100000), ("width_multiple", math.nan),
                       ("depth_multiple", 0), ("width_multiple", "1")):  # fmt: skip
        with pytest.raises(UnknownModelError, match=key):
            check_config({**base, key: value}, "tiny")
    with pytest.raises(UnknownModelError, match="channels"):
        check_config({**base, "width_multiple": 3.9, "backbone": [[-1, 1, "Conv", [4096, 3, 2]]] + base["backbone"][1:]}, "tiny")


def test_user_yaml_with_python_tag_or_duplicate_keys_is_one_line(tmp_path) -> None:
    require("ultralytics")
    from surgery.detectors.builders import ModelSpec, build_model

    marker = tmp_path / "marker"
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(f"nc: 1\nactivation: !!python/object/apply:os.system ['touch {marker}']\nbackbone: []\nhead: []\n")
    with pytest.raises(UnknownModelError, match="not valid YAML") as e:
        build_model(ModelSpec(f"ultralytics:{tagged}"))
    assert "\n" not in str(e.value) and not marker.exists()
    dup = tmp_path / "dup.yaml"
    dup.write_text((ROOT / "tests" / "data" / "yolo_tiny.yaml").read_text() + "nc: 1000\n")
    with pytest.raises(RecipeError, match="duplicate key 'nc'"):
        build_model(ModelSpec(f"ultralytics:{dup}"))
