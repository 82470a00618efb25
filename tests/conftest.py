import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows 2-core CI 10-40x

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Session-wide artefacts several test modules share (built once per run; treat them as read-only).


@pytest.fixture(scope="session")
def synthetic_shapes(tmp_path_factory: pytest.TempPathFactory):
    """The synthetic COCO-format set at its smallest: 8 train / 4 val images of 64 px, seed 3."""
    from surgery.data import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "shapes", images=8, size=64, seed=3, val_images=4)


@pytest.fixture(scope="session")
def trained_slim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fcos_resnet18_slim (fpn_channels 64) trained 40 steps from scratch at 64 px: not accurate, but its
    scores and boxes come from trained heads (no ties at the prior), which agreement checks need."""
    from surgery.config.recipe import recipe_from_dict
    from surgery.workflows import train_from_recipe

    tmp = tmp_path_factory.mktemp("trained")
    rec = recipe_from_dict({
        "model": {"name": "fcos_resnet18_slim", "kwargs": {"min_size": 64, "max_size": 64, "fpn_channels": 64}},
        "data": {"root": str(tmp / "synth"), "images": 48, "size": 64},
        "train": {"steps": 40, "batch_size": 8, "lr": 0.004, "warmup_steps": 5, "checkpoint_every": 0},
    }, "test")  # fmt: skip
    return train_from_recipe(rec, tmp / "dense.pt", evaluate=False).out


@pytest.fixture
def ultralytics():
    """The optional Ultralytics package, imported the adapter's way (offline, settings in the cache).
    Missing: a failure under CI=true (CI installs the extra), a skip elsewhere (tests/extras.py)."""
    from surgery.errors import UnknownModelError
    from surgery.yolo import ultralytics_adapter
    from tests.extras import require

    ultralytics_adapter._ultralytics.cache_clear()
    try:
        return ultralytics_adapter._ultralytics()
    except UnknownModelError:
        require("ultralytics")
        raise
