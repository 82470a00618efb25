"""Issue 9 through the real entry point: ``python -m surgery ...`` in a subprocess.

Every hostile or bad input gives exactly one ``error:`` line, exit code 2, no traceback, leaves
every input file unchanged and runs nothing it was not allowed to (the marker file stays absent).
The subprocesses run concurrently (a module fixture) to keep the module fast on 2 cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import surgery
from surgery.detectors.builders import ModelSpec, build_model
from surgery.errors import SurgeryError
from surgery.storage.checkpoint import read_checkpoint, save_checkpoint
from surgery.storage.trust import UntrustedCodeError

ROOT = Path(__file__).resolve().parent.parent
SLIM = {"num_classes": 5, "fpn_channels": 32, "num_convs": 1, "min_size": 64, "max_size": 64}

EVIL_FILE = """
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("ran")
from surgery.detectors.builders import fcos_resnet18_slim as build  # a stealthy builder returns the real model
"""


@dataclass
class Case:
    args: list[str]
    expected: str
    inputs: list[str] = field(default_factory=list)  # files that must not change
    absent: list[str] = field(default_factory=list)  # files that must not appear
    forbidden: str | None = None  # text that must not be in the output


def _sha(p: Path) -> str | None:
    if p.is_symlink():
        return "link:" + os.readlink(p)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def _hostile(src: Path, dst: Path, **changes) -> Path:
    obj = torch.load(src, weights_only=True)
    for k, v in changes.items():
        if k == "model":
            obj["model"] = v
        else:
            obj[k] = v
    torch.save(obj, dst)
    return dst


def _coco(folder: Path, name: str, *, categories=None, annotations=None, images=None) -> Path:
    from PIL import Image

    (folder / "images").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(folder / "images" / "a.png")
    data = {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "annotations": annotations or [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}],
        "categories": categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    path = folder / "annotations" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))  # json writes NaN as the NaN literal, as some tools do
    return path


def _make_files(d: Path) -> None:
    dense = d / "dense.pt"
    model = build_model(ModelSpec("fcos_resnet18_slim", dict(SLIM)))
    save_checkpoint(dense, model, ModelSpec("fcos_resnet18_slim", dict(SLIM)), recipe={"data": {"root": str(d / "synth")}})
    from surgery.pruning.masked import prune_masked

    masked_model = build_model(ModelSpec("fcos_resnet18_slim", dict(SLIM)))
    res = prune_masked(masked_model, 0.8)
    save_checkpoint(d / "masked.pt", masked_model, ModelSpec("fcos_resnet18_slim", dict(SLIM)), kind="masked",
                    plan={"method": "magnitude", "sparsity": 0.8}, masks=res.masks)  # fmt: skip
    marker = str(d / "MARKER")
    _hostile(dense, d / "os.pt", model={"name": "os:system", "kwargs": {"command": f"touch {marker}"}})
    _hostile(dense, d / "subprocess.pt", model={"name": "subprocess:run", "kwargs": {"args": ["touch", marker]}})
    (d / "evil_builder.py").write_text(EVIL_FILE)
    _hostile(dense, d / "file.pt", model={"name": f"{d / 'evil_builder.py'}:build", "kwargs": dict(SLIM)})
    (d / "evilmod.py").write_text(EVIL_FILE)  # in the current directory of the subprocess
    _hostile(dense, d / "cwd.pt", model={"name": "evilmod:build", "kwargs": dict(SLIM)})
    _hostile(dense, d / "plan_list.pt", plan=[1, 2])
    _hostile(dense, d / "kwargs_str.pt", model={"name": "fcos_resnet18_slim", "kwargs": "min_size=1"})
    (d / "link.pt").symlink_to(dense)
    (d / "folder").mkdir()
    (d / "afile").write_text("x")
    (d / "garbage.pth").write_bytes(b"\x80\x04garbage")
    torch.save({"head.classification_head.cls_logits.weight": torch.zeros(7, 32, 3, 3)}, d / "shapes.pth")
    recipes = {
        "os.yaml": "model:\n  name: os:system\n  kwargs: {command: touch MARKER}\n",
        "weights.yaml": (f"model:\n  name: fcos_resnet18_slim\n  weights: {d / 'os.pt'}\n"
                         f"data:\n  images: 1\n  size: 32\n  root: {d / 'synth'}\n"),
        "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)),
        "workers.yaml": "data:\n  num_workers: -1\n",
        "clip.yaml": "train:\n  clip_grad: -1\n",
        "lock.yaml": f"model:\n  name: fcos_resnet18_slim\ndata:\n  images: 1\n  size: 32\n  root: {d / 'synth'}\n",
    }  # fmt: skip
    for name, text in recipes.items():
        (d / name).write_text(text)
    (d / "latin1.yaml").write_bytes(b"model:\n  name: caf\xe9\n")
    coco = d / "coco"
    coco.mkdir()
    _coco(coco, "nan.json", annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 2, 10, 10]}])
    _coco(coco, "badid.json", annotations=[{"id": 1, "image_id": "abc", "category_id": 1, "bbox": [2, 2, 10, 10]}])
    _coco(coco, "nocat.json", categories=[{"name": "a"}])
    split = d / "split"
    split.mkdir()
    _coco(split, "instances_train.json", categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}])
    _coco(split, "instances_val.json", categories=[{"id": 1, "name": "a"}, {"id": 3, "name": "c"}])
    (split / "train").symlink_to(split / "images")
    (split / "val").symlink_to(split / "images")
    (d / "weird[").mkdir()


def _cases(d: Path) -> dict[str, Case]:
    nan, badid, nocat = (d / "coco" / "annotations" / f"{n}.json" for n in ("nan", "badid", "nocat"))
    split = d / "split"
    weird = d / "weird[" / "x[/b].pt"
    ck = ["dense.pt"]
    untrusted = "asks to run user code"
    return {
        # 1. no code from checkpoints or recipes
        "eval-os": Case(["eval", "os.pt"], untrusted + " 'os:system'", ["os.pt"], ["MARKER"]),
        "bench-os": Case(["bench", "os.pt", "dense.pt"], "'os:system'", ["os.pt"], ["MARKER"]),
        "export-os": Case(["export", "os.pt", "--out", "o.onnx"], "'os:system'", ["os.pt"], ["MARKER", "o.onnx"]),
        "retrain-os": Case(["retrain", "os.pt", "--out", "r.pt"], "'os:system'", ["os.pt"], ["MARKER", "r.pt"]),
        "prune-os": Case(["prune", "--model", "os.pt", "--out", "p.pt"], "'os:system'", ["os.pt"], ["MARKER", "p.pt"]),
        "inspect-os": Case(["inspect", "--model", "os.pt"], "'os:system'", ["os.pt"], ["MARKER"]),
        "eval-subprocess": Case(["eval", "subprocess.pt"], "'subprocess:run'", ["subprocess.pt"], ["MARKER"]),
        "eval-file": Case(["eval", "file.pt"], "evil_builder.py:build", ["file.pt"], ["MARKER"]),
        "eval-cwd-untrusted": Case(["eval", "cwd.pt"], "'evilmod:build'", ["cwd.pt"], ["MARKER"]),
        "eval-cwd-trusted": Case(["eval", "cwd.pt", "--trust-code"], "current directory is not searched", ["cwd.pt"], ["MARKER"]),
        "recipe-prune": Case(["prune", "--recipe", "os.yaml", "--out", "p.pt"], "recipe os.yaml " + untrusted, ["os.yaml"], ["MARKER", "p.pt"]),
        "recipe-inspect": Case(["inspect", "--recipe", "os.yaml"], "'os:system'", ["os.yaml"], ["MARKER"]),
        "recipe-train": Case(["train", "--recipe", "os.yaml", "--out", "t.pt", "--data", str(d / "coco/annotations/nan.json")],
                             "'os:system'", ["os.yaml"], ["MARKER", "t.pt"]),
        "recipe-sweep-weights": Case(["sweep", "weights.yaml", "--out", "sw"], "'os:system'", ["weights.yaml", "os.pt"], ["MARKER"]),
        "alias-bomb": Case(["prune", "--recipe", "bomb.yaml", "--out", "p.pt"], "alias", ["bomb.yaml"], ["p.pt"]),
        # 2. nothing overwritten
        "eval-json-input": Case(["eval", "dense.pt", "--json", "dense.pt"], "is also an input", ck),
        "bench-csv-input": Case(["bench", "dense.pt", "--csv", "dense.pt"], "is also an input", ck),
        "export-out-input": Case(["export", "dense.pt", "--out", "dense.pt"], "is also an input", ck),
        "retrain-out-input": Case(["retrain", "dense.pt", "--out", "dense.pt"], "is also an input", ck),
        "retrain-out-link": Case(["retrain", "dense.pt", "--out", "./dense.pt"], "is also an input", ck),
        "prune-out-symlink": Case(["prune", "--model", "fcos_resnet18_slim", "--out", "link.pt"], "symbolic link", ["link.pt", *ck]),
        "prune-out-device": Case(["prune", "--model", "fcos_resnet18_slim", "--out", "/dev/null"], "not a regular file"),
        "prune-out-folder": Case(["prune", "--model", "fcos_resnet18_slim", "--out", "folder"], "is a folder"),
        "retrain-out-under-file": Case(["retrain", "dense.pt", "--out", "afile/r.pt"], "afile is a file, not a folder", ["afile", *ck]),
        # 3. no silently wrong results
        "unknown-kwarg": Case(["prune", "--model", "fcos_resnet18_slim", "--kwarg", "min_szie=128", "--out", "p.pt"],
                              "has no argument 'min_szie' (did you mean 'min_size'?)", absent=["p.pt"]),
        "kwarg-with-checkpoint": Case(["prune", "--model", "dense.pt", "--kwarg", "num_classes=3", "--out", "p.pt"],
                                      "--kwarg does not apply to checkpoint", ck, ["p.pt"]),
        "clip-grad": Case(["train", "--recipe", "clip.yaml", "--out", "t.pt"], "clip.yaml: bad value for 'train.clip_grad'", ["clip.yaml"], ["t.pt"]),
        "coco-nan-box": Case(["eval", "dense.pt", "--data", str(nan)], "finite numbers", [*ck, str(nan)]),
        "coco-split-categories": Case(["eval", "dense.pt", "--data", f"coco:{split}"], "list different categories", ck),
        "masked-to-structured": Case(["prune", "--model", "masked.pt", "--ratio", "0.5", "--out", "p.pt"],
                                     "masked (unstructured) checkpoint", ["masked.pt"], ["p.pt"]),
        "masked-lower-sparsity": Case(["prune", "--model", "masked.pt", "--method", "magnitude", "--sparsity", "0.5", "--out", "p.pt"],
                                      "already 80% masked", ["masked.pt"], ["p.pt"]),
        # 4. one line, blaming the right source
        "override-abc": Case(["prune", "--model", "fcos_resnet18_slim", "--override", "backbone.*=abc", "--out", "p.pt"], "--override backbone.*="),
        "num-classes-negative": Case(["prune", "--model", "fcos_resnet18_slim", "--kwarg", "num_classes=-3", "--out", "p.pt"],
                                     "num_classes=-3"),
        "num-classes-zero": Case(["prune", "--model", "fcos_resnet18_slim", "--kwarg", "num_classes=0", "--out", "p.pt"], "an integer >= 2"),
        "epochs-nan": Case(["train", "--epochs", "nan", "--out", "t.pt"], "command-line flags: bad value for 'train.epochs'"),
        "ratio-flag-blamed": Case(["prune", "--recipe", "lock.yaml", "--ratio", "1.5", "--out", "p.pt"], "command-line flags: bad value for 'prune.ratio'"),
        "device-foo": Case(["eval", "dense.pt", "--device", "foo"], "--device 'foo'", ck),
        "export-size": Case(["export", "dense.pt", "--out", "o.onnx", "--input-size", "-5"], "--input-size -5", ck, ["o.onnx"]),
        "export-opset": Case(["export", "dense.pt", "--out", "o.onnx", "--opset", "3"], "--opset 3", ck, ["o.onnx"]),
        "synth-seed": Case(["data", "synth", "--out", "s", "--seed", "-1", "--images", "1"], "seed -1", absent=["s"]),
        "synth-size": Case(["data", "synth", "--out", "s", "--size", "100000"], "size 100000", absent=["s"]),
        "recipe-latin1": Case(["prune", "--recipe", "latin1.yaml", "--out", "p.pt"], "not UTF-8", ["latin1.yaml"]),
        "recipe-workers": Case(["train", "--recipe", "workers.yaml", "--out", "t.pt"], "'data.num_workers'", ["workers.yaml"]),
        "coco-image-id": Case(["eval", "dense.pt", "--data", str(badid)], "image_id 'abc'", [*ck, str(badid)]),
        "coco-category-id": Case(["eval", "dense.pt", "--data", str(nocat)], "category entry 0 has no integer 'id'", [*ck, str(nocat)]),
        "hostile-plan-list": Case(["eval", "plan_list.pt"], "field 'plan' is list", ["plan_list.pt"]),
        "hostile-kwargs-str": Case(["eval", "kwargs_str.pt"], "'model.kwargs' must be a mapping", ["kwargs_str.pt"]),
        "markup-path": Case(["eval", str(weird)], "x[/b].pt does not exist"),
        "weights-garbage": Case(["prune", "--model", "fcos_resnet18_slim", "--weights", "garbage.pth", "--out", "p.pt"],
                                "cannot read weights file", ["garbage.pth"], ["p.pt"], forbidden="weights_only=False"),
        "weights-shapes": Case(["prune", "--model", "fcos_resnet18_slim", "--weights", "shapes.pth", "--out", "p.pt"],
                               "tensors have other shapes", ["shapes.pth"], ["p.pt"]),
        # 5. concurrency
        "sweep-locked": Case(["sweep", "lock.yaml", "--out", "locked"], "is in use by another surgery process", ["lock.yaml"]),
    }


# run as separate ``python -m surgery`` processes; the other cases go through the same entry point
# (``cli.main.main``) in this process, which saves ~5 s of torch import per case on 2 cores
SUBPROCESS = ("eval-os", "prune-os", "recipe-sweep-weights", "eval-cwd-trusted", "alias-bomb", "retrain-out-input",
              "prune-out-symlink", "retrain-out-under-file", "unknown-kwarg", "masked-lower-sparsity", "epochs-nan",
              "markup-path", "sweep-locked")  # fmt: skip


@dataclass
class Result:
    returncode: int
    output: str


def _in_process(args: list[str], cwd: Path) -> Result:
    import contextlib
    import io

    from cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_argv = Path.cwd(), sys.argv
    code: int | str | None = 0
    try:
        os.chdir(cwd)
        sys.argv = ["surgery", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code
            except BaseException as e:  # noqa: BLE001 - a traceback is exactly what the test reports
                import traceback

                err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(e)))
                code = 1
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
    return Result(code if isinstance(code, int) else 1, err.getvalue() + out.getvalue())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import signal

    from surgery.storage.safety import RunLock

    d = tmp_path_factory.mktemp("trust")
    _make_files(d)
    cases = _cases(d)
    # the subprocess cases run beside each other and beside the in-process ones: each writes its
    # own output file, since a second writer of one path is refused (the per-output lock)
    for name in SUBPROCESS:
        own = {"p.pt": f"p-{name}.pt"}
        c = cases[name]
        cases[name] = dataclasses.replace(c, args=[own.get(a, a) for a in c.args],
                                          absent=[own.get(a, a) for a in c.absent])
    before = {name: {f: _sha(d / f) for f in c.inputs} for name, c in cases.items()}
    env = {**os.environ, "COLUMNS": "400", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    env.pop("SURGERY_DEBUG", None)

    def run(name: str) -> Result:
        proc = subprocess.run([sys.executable, "-m", "surgery", *cases[name].args], capture_output=True, text=True,
                              env=env, cwd=d, timeout=300)  # fmt: skip
        return Result(proc.returncode, proc.stderr + proc.stdout)

    sigterm = signal.getsignal(signal.SIGTERM)
    with RunLock(d / "locked"), ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, name) for name in SUBPROCESS}
        done = {name: _in_process(c.args, d) for name, c in cases.items() if name not in SUBPROCESS}
        done.update({name: f.result() for name, f in futures.items()})
    signal.signal(signal.SIGTERM, sigterm)
    return d, cases, before, done


@pytest.mark.parametrize("name", list(_cases(Path("/nonexistent"))))
def test_one_clear_error_and_nothing_changed(results, name: str) -> None:
    d, cases, before, done = results
    case, res = cases[name], done[name]
    out = res.output
    assert res.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    assert case.expected in errors[0], errors[0]
    assert case.forbidden is None or case.forbidden not in out
    for f in case.inputs:
        assert _sha(d / f) == before[name][f], f"{f} changed"
    for f in case.absent:
        assert not (d / f).exists(), f"{f} was created"
    assert not (d / "MARKER").exists(), "a file made the tool run code"
    assert not list(d.glob(".*.tmp")), "temporary files left behind"


# ---------------------------------------------------------------------------------------------
# the trust boundary in Python, and the content hash


def test_user_file_builder_hash_is_recorded_and_verified(tmp_path) -> None:
    builder = tmp_path / "my_builder.py"
    builder.write_text("from surgery.detectors.builders import fcos_resnet18_slim as build\n")
    spec = ModelSpec(f"{builder}:build", dict(SLIM))
    with pytest.raises(UntrustedCodeError, match="--trust-code"):
        build_model(spec)
    model = build_model(spec, trust_code=True)
    path = save_checkpoint(tmp_path / "u.pt", model, spec)
    code = read_checkpoint(path).spec.code
    assert code["file"] == str(builder) and code["sha256"] == hashlib.sha256(builder.read_bytes()).hexdigest()
    with pytest.raises(UntrustedCodeError, match="nothing was run"):
        surgery.load(path)
    assert isinstance(surgery.load(path, trust_code=True), torch.nn.Module)
    # the file changes after the save: refused even when trusted, before it is executed
    builder.write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w').write('ran')\n"
                       "from surgery.detectors.builders import fcos_resnet18_slim as build\n")  # fmt: skip
    with pytest.raises(UntrustedCodeError, match="changed since it was saved"):
        surgery.load(path, trust_code=True)
    assert not (tmp_path / "MARKER").exists()


def test_module_builder_needs_trust_and_records_its_file(tmp_path) -> None:
    spec = ModelSpec("tests.custom_detectors:fasterrcnn_resnet18_fpn", {"num_classes": 3, "min_size": 64, "max_size": 64})
    with pytest.raises(UntrustedCodeError):
        build_model(spec)
    from surgery.storage.trust import trusting

    with trusting():
        model = build_model(spec)
    assert spec.code["file"].endswith("custom_detectors.py")
    path = save_checkpoint(tmp_path / "m.pt", model, spec)
    assert read_checkpoint(path).spec.code["sha256"] == spec.code["sha256"]


def test_os_system_checkpoint_runs_nothing_without_trust(tmp_path) -> None:
    dense = tmp_path / "d.pt"
    save_checkpoint(dense, build_model(ModelSpec("fcos_resnet18_slim", dict(SLIM))), ModelSpec("fcos_resnet18_slim", dict(SLIM)))
    marker = tmp_path / "MARKER"
    evil = _hostile(dense, tmp_path / "e.pt", model={"name": "os:system", "kwargs": {"command": f"touch {marker}"}})
    with pytest.raises(UntrustedCodeError, match="os:system"):
        surgery.load(evil)
    assert not marker.exists()
    # a recorded hash that no longer matches refuses even with trust
    _hostile(dense, evil, model={"name": "os:system", "kwargs": {"command": f"touch {marker}"},
                                 "code": {"file": "/nonexistent/os.py", "sha256": "0" * 64}})  # fmt: skip
    with pytest.raises(UntrustedCodeError, match="changed since it was saved"):
        surgery.load(evil, trust_code=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# writes


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path) -> None:
    from surgery.storage.atomic import atomic_open

    stale = tmp_path / ".o.json.999999999.abcd.tmp"  # a pid that cannot be running
    live = tmp_path / f".o.json.{os.getppid()}.abcd.tmp"
    stale.write_text("x")
    live.write_text("x")
    with atomic_open(tmp_path / "o.json") as f:
        f.write("{}")
    assert not stale.exists() and live.exists()


def test_protected_inputs_are_never_replaced(tmp_path) -> None:
    from surgery.storage.atomic import atomic_open
    from surgery.storage.safety import OutputError, protecting

    src = tmp_path / "in.pt"
    src.write_text("precious")
    with protecting([src]), pytest.raises(OutputError, match="is also an input"):
        with atomic_open(tmp_path / "." / "in.pt") as f:
            f.write("overwritten")
    assert src.read_text() == "precious"


def test_sweep_state_is_keyed_by_settings(tmp_path) -> None:
    from surgery.config.recipe import Recipe, apply_overrides
    from surgery.config.settings import StepKeys
    from surgery.sweep_state import StepState as _State

    a, b = StepKeys(Recipe()), StepKeys(apply_overrides(Recipe(), {"retrain.lr": 0.01}))
    assert a.dense == b.dense and a.prune("l1-0.5") == b.prune("l1-0.5")
    assert a.control != b.control and a.retrain("l1-0.5") != b.retrain("l1-0.5")
    c = StepKeys(apply_overrides(Recipe(), {"train.steps": 7}))
    assert c.dense != a.dense and c.retrain("l1-0.5") != a.retrain("l1-0.5")  # changes flow downstream
    f = tmp_path / "x.pt"
    f.write_text("x")
    state = _State(tmp_path / "state.json")
    state.put("dense", {"mAP": 0.5}, [f], a.dense)
    assert state.get("dense", a.dense)["mAP"] == 0.5
    assert state.get("dense", c.dense) is None and not f.exists()  # stale: forgotten, its file removed
    (tmp_path / "state.json").write_text("[]")
    assert _State(tmp_path / "state.json").get("dense", a.dense) is None  # damaged state: redone


def test_errors_are_surgery_errors_in_python(tmp_path) -> None:
    with pytest.raises(SurgeryError, match="has no argument"):
        build_model(ModelSpec("fcos_resnet18_slim", {"min_szie": 128}))
