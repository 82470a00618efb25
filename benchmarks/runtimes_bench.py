"""The quickstart FCOS (fcos_resnet18_slim, 5 classes, 128 px) dense and cut to keep 50% / 25% of its
MACs (L1, round_to 8, as recipes/quickstart.yaml cuts it; untrained weights: latency does not depend on
the values, the detection count is fixed by bench), timed by `surgery bench` in each runtime at batch 1,
2 threads: end to end and network ratios against the dense model, next to the MACs ratio.

    nice -n 5 python benchmarks/runtimes_bench.py --csv benchmarks/runtimes_quickstart.csv
    nice -n 5 python benchmarks/runtimes_bench.py --profile   # OpenVINO's time per node type instead
    nice -n 5 python benchmarks/runtimes_bench.py --keep-latency 0.5 --runtimes openvino \
        --csv benchmarks/runtimes_keep_latency.csv   # prune to a latency budget, re-measured by bench
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from surgery.config.recipe import BenchSection, PruneSection  # noqa: E402
from surgery.detectors.builders import ModelSpec, build_model  # noqa: E402
from surgery.measure.bench import bench_checkpoints, write_csv  # noqa: E402
from surgery.pruning.prune import prune_model  # noqa: E402
from surgery.storage.checkpoint import save_checkpoint  # noqa: E402

SPEC = ModelSpec("fcos_resnet18_slim", {"num_classes": 5, "min_size": 128, "max_size": 128})
SIZE = 128


def checkpoints(d: Path) -> list[Path]:
    torch.manual_seed(0)
    dense = build_model(SPEC).eval()
    paths = [save_checkpoint(d / "dense.pt", dense, SPEC, kind="dense")]
    for keep in (0.5, 0.25):
        torch.manual_seed(0)
        model = build_model(SPEC).eval()
        res = prune_model(model, PruneSection(method="l1", round_to=8, min_channels=8, target_macs=keep),
                          trace_size=SIZE, macs_input_size=SIZE)
        paths.append(save_checkpoint(d / f"keep-macs{keep}.pt", model, SPEC, kind="structured", plan=res.plan))
    return paths


def keep_latency_checkpoints(d: Path, keep: float, runtime: str) -> tuple[list[Path], float | None]:
    """The dense model and the model cut with ``--keep-latency keep --runtime runtime`` (L1, round_to 8,
    as the quickstart cuts); with the ratio the pruning itself measured for the cut network."""
    torch.manual_seed(0)
    dense = build_model(SPEC).eval()
    paths = [save_checkpoint(d / "dense.pt", dense, SPEC, kind="dense")]
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    res = prune_model(model, PruneSection(method="l1", round_to=8, min_channels=8, target_latency=keep, runtime=runtime),
                      trace_size=SIZE, macs_input_size=SIZE)
    paths.append(save_checkpoint(d / f"keep-latency{keep}-{runtime}.pt", model, SPEC, kind="structured", plan=res.plan))
    for note in res.report.target.notes:
        print(f"  prune: {note}")
    return paths, res.report.target.measured_ratio


def profile(paths: list[Path], tmp: Path, runs: int = 20) -> None:
    """OpenVINO's per-node counters of each model's export (fixed workload), summed per (network or
    pipeline, node type), ms per image: where a cut model's time goes that its MACs do not explain."""
    import numpy as np

    from surgery.deployment.export import export_onnx
    from surgery.deployment.onnx_io import OvSession
    from surgery.deployment.runtime import load_detector
    from surgery.measure import fixed_workload
    from surgery.measure.split import onnx_scopes

    image = {"image": np.random.default_rng(0).random((3, SIZE, SIZE), dtype=np.float32)}
    for path in paths:
        model, _ = load_detector(path)
        onnx = tmp / f"{path.stem}.onnx"
        with fixed_workload(model, 100, 100):
            export_onnx(model, onnx, SIZE, verify=False)
        scopes = onnx_scopes(model)
        sess = OvSession(onnx, 2, profiling=True)
        for _ in range(5):
            sess.run(None, image)
        ms: collections.Counter = collections.Counter()
        for _ in range(runs):
            sess.run(None, image)
            net = False
            for info in sess.request.get_profiling_info():
                if info.status.name != "EXECUTED":
                    continue
                net = info.node_name.startswith(scopes) if "/" in info.node_name else net
                ms[("network" if net else "pipeline", info.node_type)] += info.real_time.total_seconds() * 1e3 / runs
        total = sum(ms.values())
        print(f"{path.name}: {total:.2f} ms of node time per image")
        for (part, kind), v in ms.most_common(6):
            print(f"  {part:8s} {kind:18s} {v:7.2f} ms  {v / total:5.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path("benchmarks/runtimes_quickstart.csv"))
    ap.add_argument("--runtimes", nargs="*", default=["onnxruntime", "openvino"])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--profile", action="store_true", help="print OpenVINO's time per node type, no CSV")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spinning", action="store_true",
                    help="ONNX Runtime's threads spin between operators (its own default; off by default here, "
                         "where a shared machine's other jobs need the cores)")
    ap.add_argument("--keep-latency", type=float, default=None,
                    help="instead of the MACs cuts: prune to keep this fraction of the network latency on the (one) "
                         "runtime of --runtimes, then bench it against the dense model there")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="surgery-runtimes-") as tmp:
        if args.keep_latency is not None:
            if len(args.runtimes) != 1:
                ap.error("--keep-latency: name one runtime (--runtimes openvino)")
            paths, measured = keep_latency_checkpoints(Path(tmp), args.keep_latency, args.runtimes[0])
            print(f"prune --keep-latency {args.keep_latency} --runtime {args.runtimes[0]}: the pruning measured "
                  f"the cut network at {measured if measured is None else f'{measured:.3f}'} of the dense one")
        else:
            paths = checkpoints(Path(tmp))
        if args.profile:
            profile(paths, Path(tmp))
            return
        for runtime in args.runtimes:
            cfg = BenchSection(input_size=SIZE, batch_sizes=[1], warmup=5, runs=args.runs, threads=args.threads,
                               runtime=runtime, spinning=args.spinning)
            rows += bench_checkpoints(paths, cfg)
    write_csv(rows, args.csv)
    for r in rows:
        print(f"{r.runtime:12s} {r.precision} {Path(r.checkpoint).name:18s} MACs x{r.macs_ratio:.3f} e2e "
              f"{r.latency_ms_median:.2f} ms x{r.latency_ratio:.3f} ({r.latency_ratio / r.macs_ratio:.2f}x the MACs "
              f"ratio) network {r.network_ms_median or float('nan'):.2f} ms x{r.network_ratio:.3f} "
              f"pipeline {r.pipeline_ms_median or float('nan'):.2f} ms")


if __name__ == "__main__":
    main()
