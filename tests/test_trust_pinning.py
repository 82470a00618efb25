"""``--trust-code`` runs a checkpoint's builder file only
when the checkpoint pinned it by hash, and a valid 250-character output name is not refused for
the names of its lock and temporary files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import surgery
from surgery.detectors.builders import ModelSpec, build_model
from surgery.storage.atomic import atomic_path
from surgery.storage.checkpoint import save_checkpoint
from surgery.storage.safety import OutputLock, clean_stale_temporaries, tmp_prefix
from surgery.storage.trust import UntrustedCodeError

SLIM = {"num_classes": 3, "min_size": 64, "max_size": 64}


@pytest.mark.parametrize("code", [None, {"file": "BUILDER"}, {"file": "BUILDER", "sha256": None}, {"file": "BUILDER", "sha256": "x"}])
def test_trusted_checkpoint_without_a_pinned_hash_runs_nothing(tmp_path: Path, code) -> None:
    marker = tmp_path / "MARKER"
    builder = tmp_path / "evil_builder.py"
    builder.write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom surgery.detectors.builders import fcos_resnet18_slim as build\n")
    spec = ModelSpec(f"{builder}:build", dict(SLIM))
    path = save_checkpoint(tmp_path / "u.pt", build_model(ModelSpec("fcos_resnet18_slim", dict(SLIM))), spec)
    marker.unlink(missing_ok=True)  # save_checkpoint hashes the file, it does not run it
    ckpt = torch.load(path, weights_only=True)
    if code is None:
        ckpt["model"].pop("code", None)
    else:
        ckpt["model"]["code"] = {k: (str(builder) if v == "BUILDER" else v) for k, v in code.items()}
    torch.save(ckpt, path)
    with pytest.raises(UntrustedCodeError, match=r"records no sha256 of its file.*nothing was run, even with --trust-code"):
        surgery.load(path, trust_code=True)
    assert not marker.exists()


def test_trusted_checkpoint_with_its_hash_still_loads(tmp_path: Path) -> None:
    builder = tmp_path / "my_builder.py"
    builder.write_text("from surgery.detectors.builders import fcos_resnet18_slim as build\n")
    spec = ModelSpec(f"{builder}:build", dict(SLIM))
    path = save_checkpoint(tmp_path / "u.pt", build_model(spec, trust_code=True), spec)
    assert isinstance(surgery.load(path, trust_code=True), torch.nn.Module)


def test_250_character_output_name_is_written_with_its_lock(tmp_path: Path) -> None:
    out = tmp_path / ("a" * 247 + ".pt")
    assert len(out.name) == 250
    with OutputLock(out), atomic_path(out) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255 and tmp.name.startswith(tmp_prefix(out))
        tmp.write_text("x")
    assert out.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_stale_temporaries_of_a_long_name_are_still_found(tmp_path: Path) -> None:
    out = tmp_path / ("b" * 247 + ".pt")
    stale = tmp_path / f"{tmp_prefix(out).replace(str(os.getpid()), '999999999')}abcd1234.tmp"
    stale.write_text("left by a killed process")
    assert clean_stale_temporaries(tmp_path, out.name) == [stale]
