"""`make gpu-check`: every GPU check in one script that keeps within a device-time budget (default
540 s: a lent GPU runs one command for at most 600 s).

1. the `gpu` tests (tests/test_gpu.py), at most 240 s;
2. `--keep-latency 0.5 --runtime torch --latency-device cuda` on the quickstart FCOS
   (fcos_resnet18_slim, 5 classes, 128 px, untrained weights, L1, round_to 8), then `bench --device
   cuda --compile cuda-graphs` of the result against the dense model: the network ratio bench
   measures next to the 0.5 asked for (benchmarks/gpu_keep_latency.csv), at most 150 s;
3. GPU latency (benchmarks/gpu_latency.py: FCOS-R50 and YOLOv8s at 640 px, dense vs 50% / 25% of
   the MACs, eager FP32 and CUDA graphs + FP16, batch 1 and 8) in the time left; it writes its CSV
   after every model, so a stage cut off keeps what it measured.

Each stage runs under a timeout of what is left and is reported (seconds, exit status); one that
fails or is cut off does not stop the next. Exit status: 0 when every stage passed.

    python benchmarks/gpu_check.py                 # what `make gpu-check` runs
    python benchmarks/gpu_check.py --budget 300 --skip latency
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
SIZE = 128


def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> int:
    print("$", " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=cwd, timeout=max(1.0, timeout)).returncode
    except subprocess.TimeoutExpired:
        print(f"cut off after {timeout:.0f} s", flush=True)
        return 124


def keep_latency(timeout: float, csv: Path) -> int:
    """Stage 2 (see the module docstring): prune to half the network latency on the GPU, bench it."""
    import surgery

    start = time.monotonic()
    spec = surgery.ModelSpec("fcos_resnet18_slim", {"num_classes": 5, "min_size": SIZE, "max_size": SIZE})
    with tempfile.TemporaryDirectory(prefix="surgery-gpu-check-") as tmp:
        d = Path(tmp)
        surgery.save_checkpoint(d / "dense.pt", surgery.build_model(spec), spec, kind="dense")
        cli = [sys.executable, "-m", "surgery"]
        rc = _run([*cli, "prune", "--model", "dense.pt", "--method", "l1", "--round-to", "8", "--keep-latency", "0.5",
                   "--runtime", "torch", "--latency-device", "cuda", "--macs-size", str(SIZE), "--out", "half.pt"],
                  timeout - (time.monotonic() - start), cwd=d)
        if rc != 0:
            return rc
        return _run([*cli, "bench", "dense.pt", "half.pt", "--device", "cuda", "--compile", "cuda-graphs",
                     "--input-size", str(SIZE), "-b", "1", "--runs", "50", "--warmup", "10", "--csv", str(csv.resolve())],
                    timeout - (time.monotonic() - start), cwd=d)


STAGES = ("tests", "keep-latency", "latency")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all stages together (default 540)")
    ap.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages not to run")
    ap.add_argument("--latency-runs", type=int, default=20, help="benchmarks/gpu_latency.py --runs")
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget
    left = lambda: deadline - time.monotonic()  # noqa: E731
    results: list[tuple[str, int, float]] = []
    for stage in STAGES:
        if stage in args.skip:
            continue
        if left() < 20:
            results.append((stage, -1, 0.0))
            print(f"== {stage}: no time left", flush=True)
            continue
        print(f"== {stage} ({left():.0f} s left)", flush=True)
        t0 = time.monotonic()
        if stage == "tests":
            rc = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", str(HERE.parent / "tests" / "test_gpu.py")],
                      min(240.0, left()))
        elif stage == "keep-latency":
            rc = keep_latency(min(150.0, left()), HERE / "gpu_keep_latency.csv")
        else:
            rc = _run([sys.executable, str(HERE / "gpu_latency.py"), "--csv", str(HERE / "gpu_latency.csv"),
                       "--runs", str(args.latency_runs), "--models", "fcos_resnet50_fpn", "ultralytics:yolov8s.yaml"],
                      left() - 5)
        results.append((stage, rc, time.monotonic() - t0))
    print("== summary")
    for stage, rc, s in results:
        print(f"{stage:13s} {'passed' if rc == 0 else 'not run' if rc == -1 else f'exit {rc}'} ({s:.0f} s)")
    sys.exit(0 if results and all(rc == 0 for _, rc, _ in results) else 1)


if __name__ == "__main__":
    main()
