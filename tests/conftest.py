import os
import shutil
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows 2-core CI 10-40x
# Under pytest-xdist (`make test` runs `-n 2`) each worker is one process on one core: two workers of
# two threads each would oversubscribe a 2-core machine. The CLI processes a worker's tests start
# inherit one thread too. Run alone, the suite uses up to two threads.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402  (a dependency of torch: always installed with it)

torch.set_num_threads(1 if XDIST_WORKER else max(1, min(2, os.cpu_count() or 1)))


# Under xdist (`--dist loadfile --no-loadscope-reorder`) whole files go to the workers in collection
# order, each worker asking for the next when it is idle: the longest files go first (longest job
# first), or a long file handed out last keeps one core busy while the other waits. The order comes
# from the per-file sums of `--durations=0` on a full run (only the order matters, not the seconds):
# test_sweep.py alone is about a quarter of the suite. The tests inside a file keep their order.
LONGEST_FIRST = ("test_sweep.py", "test_recover.py", "test_sparsify.py", "test_compress.py",
                 "test_recovery_families.py", "test_reconstruct.py", "test_pipeline.py", "test_deploy.py",
                 "test_quantize.py", "test_measure.py", "test_distill.py", "test_recipe_cli.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if XDIST_WORKER:  # alone, the files run in their usual order
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shared_artefact(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """``build(folder)`` once per test run, even under xdist: every worker gets the same path.

    Alone, ``folder`` is a fresh temporary folder. Under xdist the workers share pytest's base
    temporary folder (``getbasetemp().parent``); the first worker to take the lock builds the
    artefact, the others wait for it and reuse it (the pattern of pytest-xdist's documentation).
    A ``.done`` marker, written last, tells a finished build from one that failed half-way (a
    failed build is retried by the next worker that asks). Treat the result as read-only."""
    if XDIST_WORKER is None:
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    done = folder / ".done"
    with FileLock(f"{folder}.lock"):
        if done.is_file():
            return Path(done.read_text())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        result = build(folder)
        done.write_text(str(result))
        return result


@pytest.fixture
def serial_threads():
    """The test runs at the serial suite's torch thread count (2), also on an xdist worker (1). For
    tests whose outputs sit on near-ties that flip with the float summation order (found under xdist:
    SSDlite's detections vs torchvision's, Mask R-CNN's zeroed-cut oracle, both at 1 thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(old)


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

    def train(tmp: Path) -> Path:
        rec = recipe_from_dict({
            "model": {"name": "fcos_resnet18_slim", "kwargs": {"min_size": 64, "max_size": 64, "fpn_channels": 64}},
            "data": {"root": str(tmp / "synth"), "images": 48, "size": 64},
            "train": {"steps": 40, "batch_size": 8, "lr": 0.004, "warmup_steps": 5, "checkpoint_every": 0},
        }, "test")  # fmt: skip
        return train_from_recipe(rec, tmp / "dense.pt", evaluate=False).out

    return shared_artefact(tmp_path_factory, "trained_slim", train)


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
