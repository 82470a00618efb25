"""The model registry: every torchvision builder, the project's own, user-built ones and weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torchvision

import surgery
from surgery.detectors.builders import ModelSpec, build_model, list_models
from surgery.errors import CheckpointError, UnknownModelError
from surgery.storage.checkpoint import save_checkpoint


def test_lists_every_torchvision_detection_builder() -> None:
    tv = set(torchvision.models.list_models(module=torchvision.models.detection))
    assert len(tv) >= 12
    assert tv <= set(list_models())
    assert "fcos_resnet18_slim" in list_models()


def test_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(UnknownModelError, match="Did you mean: fcos_resnet50_fpn"):
        build_model("fcos_resnet50_fpm")
    with pytest.raises(UnknownModelError, match="cannot import"):
        build_model("no_such_pkg.mod:fn", trust_code=True)
    with pytest.raises(UnknownModelError, match="has no callable"):
        build_model("tests.custom_detectors:nope", trust_code=True)


def test_bad_weights_and_arguments_are_clear() -> None:
    with pytest.raises(UnknownModelError, match="unknown weights 'FOO'"):
        build_model(ModelSpec("fcos_resnet50_fpn", {"weights": "FOO"}))
    with pytest.raises(UnknownModelError, match="has no argument .num_classe. .did you mean .num_classes"):
        build_model(ModelSpec("tests.custom_detectors:fasterrcnn_resnet18_fpn", {"trainable_layers": 2, "num_classe": 3}), trust_code=True)


def test_local_weights_file_and_dense_checkpoint(tmp_path) -> None:
    src = build_model("fcos_resnet18_slim")
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")  # torchvision reference-script layout
    loaded = build_model(ModelSpec("fcos_resnet18_slim", {"weights": str(tmp_path / "w.pth")}))
    for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # a dense surgery checkpoint reloads too, and is accepted as weights
    path = save_checkpoint(tmp_path / "d.pt", src, ModelSpec("fcos_resnet18_slim"))
    assert torch.equal(surgery.load(path).head.classification_head.cls_logits.weight,
                       src.head.classification_head.cls_logits.weight)
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_model(ModelSpec("fcos_resnet18_slim", {"weights": str(tmp_path / "bad.pth")}))
    torch.save({"x": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not match"):
        build_model(ModelSpec("fcos_resnet18_slim", {"weights": str(tmp_path / "other.pth")}))
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model(ModelSpec("fcos_resnet18_slim", {"weights": str(tmp_path / "missing.pth")}))


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch) -> None:
    model = build_model("fcos_resnet18_slim")
    path = save_checkpoint(tmp_path / "c.pt", model, ModelSpec("fcos_resnet18_slim"))
    before = path.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, model, ModelSpec("fcos_resnet18_slim"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_importing_the_library_sets_no_environment_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, sys, surgery; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules, surgery.ModelSpec)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == ["None", "False"] and "ModelSpec" in out  # torch loads on first use only
