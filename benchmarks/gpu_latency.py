"""GPU latency of dense vs structurally pruned detectors (CUDA, synchronised), the way GPUs run them.

Builds each model with untrained weights (latency does not depend on the values), cuts it to keep
50% and 25% of its MACs with `surgery prune --target-macs`, and times every checkpoint with
`surgery bench --device cuda` (interleaved, warm-up, median; torch.cuda.synchronize around each run)
in each of :data:`MODES`: eager FP32 (the old numbers), and the network captured in CUDA graphs under
FP16 autocast (bench's `--compile cuda-graphs --precision f16`, launch overhead gone), at batch 1 and 8.
Writes one CSV with bench's fixed columns (with `precision` and `compile` naming the mode) plus the
input size, rewritten after every model and mode (a run cut off keeps its rows). Needs a CUDA
device; `make gpu-check` (benchmarks/gpu_check.py) runs it for FCOS-R50 and YOLOv8s in the time
its device budget leaves. All models: about 6 minutes on one H100 (`--models` / `--modes` to run
less; `--runs` 30 by default).

    python benchmarks/gpu_latency.py --csv benchmarks/gpu_latency.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import surgery  # noqa: E402  (lazy: torch loads on first use, after the variable above)

MODELS = [  # (builder, kwargs, input size)
    ("fcos_resnet50_fpn", {"min_size": 640, "max_size": 640}, 640),
    ("ultralytics:yolov8s.yaml", {"nc": 80, "size": 640}, 640),
    ("fcos_resnet18_slim", {"min_size": 640, "max_size": 640}, 640),
]
MODES = {  # name -> bench options
    "eager-f32": [],
    "graphs-f16": ["--compile", "cuda-graphs", "--precision", "f16"],
}


def _save_dense(name: str, kwargs: dict, path: Path) -> None:
    spec = surgery.ModelSpec(name, kwargs)
    surgery.save_checkpoint(path, surgery.build_model(spec), spec, kind="dense")


def _surgery(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "surgery", *args], cwd=cwd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path("benchmarks/gpu_latency.csv"))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--modes", nargs="*", default=list(MODES), help=f"bench modes (default: {' '.join(MODES)})")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to dry-run the script")
    ap.add_argument("--models", nargs="*", default=None, help="builders to run (default: all)")
    args = ap.parse_args()
    out_rows: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, kw, size in MODELS:
            if args.models and name not in args.models:
                continue
            tag = name.replace(":", "_").replace(".yaml", "")
            try:
                _save_dense(name, kw, d / f"{tag}-dense.pt")
                for keep in ("0.5", "0.25"):
                    _surgery("prune", "--model", f"{tag}-dense.pt", "--target-macs", keep, "--macs-size", str(size),
                             "--out", f"{tag}-macs{keep}.pt", cwd=d)
            except (subprocess.CalledProcessError, ImportError) as e:  # one model failing must not lose the others' rows
                print(f"{name}: {e}", file=sys.stderr)
                continue
            for mode in args.modes:
                try:
                    _surgery("bench", f"{tag}-dense.pt", f"{tag}-macs0.5.pt", f"{tag}-macs0.25.pt", "--device", args.device,
                             "--input-size", str(size), "-b", "1", "-b", "8", "--runs", str(args.runs), "--warmup", "10",
                             *MODES[mode], "--csv", f"{tag}-{mode}.csv", cwd=d)
                except subprocess.CalledProcessError as e:
                    print(f"{name} {mode}: {e}", file=sys.stderr)
                    continue
                with open(d / f"{tag}-{mode}.csv", newline="") as f:
                    out_rows += [{"input_size": str(size), "mode": mode, **r} for r in csv.DictReader(f)]
                _write(out_rows, args.csv)  # after every mode: a run cut off by a time limit keeps its rows
    if not out_rows:
        sys.exit("no model benchmarked")
    print(f"wrote {args.csv} ({len(out_rows)} rows)")


def _write(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_csv = path.with_suffix(".csv.tmp")
    with open(tmp_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp_csv, path)


if __name__ == "__main__":
    main()
