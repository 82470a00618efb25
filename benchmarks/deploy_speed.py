"""Deployment speed (docs/benchmarks/deployment-speed.md): the numbers behind issue 19, CSV out.

- ``pp``: end-to-end and network time in ONNX Runtime of the quickstart FCOS (dense and cut to
  25% of its MACs) and SSDlite (90 classes, 320 px), exported with torchvision's post-processing
  traced as is and with surgery.detectors.postprocess's vectorised one (same detections), every model keeping
  100 detections at score threshold 0 as ``surgery bench`` does.
- ``int8``: network time of FP32 and of each INT8 form (surgery.deployment.quantize.FORMS) for the two FCOS.
- ``threads``: the dense and cut FCOS end to end at 1 and 2 threads, spin-waiting off and on.
- ``latency``: ``prune_model`` with ``target_latency`` on the dense FCOS (and YOLOv8n with
  ``--yolo``), re-measured with ``surgery bench --runtime onnxruntime``'s own code.

Untrained weights (timing does not depend on them at a fixed detection count). Every timing is
interleaved across the files compared, ``--rounds`` x ``--runs``, medians.

    python benchmarks/deploy_speed.py --csv benchmarks/deploy_speed.csv [--what pp,int8,threads,latency] [--yolo] [--spin]
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from surgery.config.recipe import BenchSection, PruneSection  # noqa: E402
from surgery.deployment.export import export_onnx  # noqa: E402
from surgery.deployment.runtime import ort_session  # noqa: E402
from surgery.detectors.builders import ModelSpec, build_model  # noqa: E402
from surgery.measure import count_macs, fixed_workload  # noqa: E402
from surgery.measure.split import onnx_scopes, onnx_split_ms  # noqa: E402
from surgery.measure.timing import RUN_BLOCK, time_interleaved  # noqa: E402
from surgery.pruning.prune import prune_model  # noqa: E402

COLUMNS = ("section", "model", "variant", "spinning", "macs_ratio", "e2e_ms", "network_ms", "pipeline_ms",
           "cpu_e2e_ms", "cpu_network_ms", "value", "value_cpu", "note")
SPINNING = False  # --spin: the wall-clock sessions spin-wait between operators (ONNX Runtime's default)
FCOS_KW = {"num_classes": 5, "min_size": 128, "max_size": 128}


def fcos_pair(size: int, round_to: int = 8) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    torch.manual_seed(0)
    dense = build_model("fcos_resnet18_slim", **FCOS_KW).eval()
    cut = copy.deepcopy(dense)
    prune_model(cut, PruneSection(method="l1", round_to=round_to, min_channels=8, target_macs=0.25),
                macs_input_size=size)
    ratio = count_macs(cut.eval(), size).total / count_macs(dense, size).total
    return dense, cut.eval(), ratio


def export(model: torch.nn.Module, path: Path, size: int, vectorized: bool = True) -> Path:
    with fixed_workload(model, 100, 100):
        export_onnx(model, path, size, verify=False, vectorized_postprocess=vectorized)
    return path


def time_files(files: dict[str, tuple[Path, tuple[str, ...]]], size: int, threads: int, rounds: int, runs: int
               ) -> dict[str, tuple[float, float, float, float]]:
    """Per file: median end-to-end wall ms and network ms (end to end x the profiled network
    share), then the same as CPU ms of a one-thread session (``time.thread_time`` around each run:
    ONNX Runtime runs a one-thread session in the calling thread, so the time other processes take
    the core away is not counted; on a busy machine the robust measure of relative cost)."""
    feed = {"image": torch.rand(3, size, size, generator=torch.Generator().manual_seed(1)).numpy()}
    sessions = {k: ort_session(p, threads, spinning=SPINNING) for k, (p, _) in files.items()}
    single = {k: ort_session(p, 1) for k, (p, _) in files.items()}
    fns = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    e2e: dict[str, list[float]] = {k: [] for k in files}
    cpu: dict[str, list[float]] = {k: [] for k in files}
    share: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(rounds):
        # in blocks as `surgery bench` times (surgery.measure.timing.RUN_BLOCK); spinning: each
        # file's runs of a round in one block (the idle spinning threads of the file timed before
        # would take the cores from the next one)
        t = time_interleaved(fns, warmup=2, runs=runs, block=runs if SPINNING else RUN_BLOCK)
        for k in files:
            e2e[k].append(statistics.median(t[k]))
        for _ in range(runs):
            for k, s in single.items():
                c0 = time.thread_time()
                s.run(None, feed)
                cpu[k].append((time.thread_time() - c0) * 1e3)
        for k, (p, scopes) in files.items():
            sp = onnx_split_ms(p, [feed], scopes, threads=threads, warmup=1, runs=5, spinning=SPINNING)
            share[k].append(sp.network_ms / max(sp.network_ms + sp.pipeline_ms, 1e-9))
    out = {}
    for k in files:
        m, c, sh = statistics.median(e2e[k]), statistics.median(cpu[k]), statistics.median(share[k])
        out[k] = (m, m * sh, c, c * sh)
    return out


def row(section: str, model: str, variant: str, macs: float | None, e2e: float | None, net: float | None,
        value: float | None = None, note: str = "", cpu: tuple[float, float] | None = None,
        value_cpu: float | None = None) -> dict:
    return {"section": section, "model": model, "variant": variant, "spinning": SPINNING, "macs_ratio": macs, "e2e_ms": e2e,
            "network_ms": net, "pipeline_ms": None if e2e is None or net is None else e2e - net,
            "cpu_e2e_ms": cpu[0] if cpu else None, "cpu_network_ms": cpu[1] if cpu else None, "value": value,
            "value_cpu": value_cpu, "note": note}


def section_pp(tmp: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    dense, cut, ratio = fcos_pair(128)
    ssd = build_model("ssdlite320_mobilenet_v3_large", weights_backbone=None).eval()
    files: dict[str, tuple[Path, tuple[str, ...]]] = {}
    for name, model, size in (("fcos-dense", dense, 128), ("fcos-macs0.25", cut, 128)):
        for vec in (False, True):
            key = f"{name}|{'vectorized' if vec else 'torchvision'}"
            files[key] = (export(model, tmp / f"{key.replace('|', '-')}.onnx", size, vec), onnx_scopes(model))
    t = time_files(files, 128, args.threads, args.rounds, args.runs)
    for key, (e2e, net, ce, cn) in t.items():
        name, pp = key.split("|")
        rows.append(row("pp", name, pp, ratio if "macs" in name else 1.0, e2e, net, cpu=(ce, cn)))
    for pp in ("torchvision", "vectorized"):
        r = t[f"fcos-macs0.25|{pp}"][0] / t[f"fcos-dense|{pp}"][0]
        rc = t[f"fcos-macs0.25|{pp}"][2] / t[f"fcos-dense|{pp}"][2]
        rows.append(row("pp", "fcos-macs0.25", f"{pp}: e2e ratio / MACs ratio", ratio, None, None, r / ratio,
                        f"e2e ratio {r:.3f} (1-thread CPU {rc:.3f}) at MACs ratio {ratio:.3f} (target <= 1.3)",
                        value_cpu=rc / ratio))
    ssd_files = {}
    for vec in (False, True):
        key = f"ssdlite|{'vectorized' if vec else 'torchvision'}"
        ssd_files[key] = (export(ssd, tmp / f"ssd-{vec}.onnx", 320, vec), onnx_scopes(ssd))
    # torchvision's SSDlite export takes ~1 s a run at score threshold 0: fewer runs
    t = time_files(ssd_files, 320, args.threads, max(1, args.rounds // 2), max(3, args.runs // 4))
    for key, (e2e, net, ce, cn) in t.items():
        rows.append(row("pp", "ssdlite", key.split("|")[1], None, e2e, net, e2e / net,
                        "value: end to end / network (target <= 2)", cpu=(ce, cn), value_cpu=ce / cn))


def section_int8(tmp: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    from surgery.deployment.quantize import FORMS, quantize_onnx

    dense, cut, ratio = fcos_pair(128)
    calib = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    files: dict[str, tuple[Path, tuple[str, ...]]] = {}
    # INT8 kernels work on blocks of channels: the cut widths rounded to 8 (the default) and 16
    cuts = {"fcos-macs0.25": (cut, ratio)}
    cuts.update({f"fcos-macs0.25-r{r}": fcos_pair(128, r)[1:] for r in args.int8_round_to if r != 8})
    macs = {"fcos-dense": 1.0, **{n: r for n, (_, r) in cuts.items()}}
    for name, model in (("fcos-dense", dense), *((n, m) for n, (m, _) in cuts.items())):
        fp = export(model, tmp / f"{name}.onnx", 128)
        files[f"{name}|fp32"] = (fp, onnx_scopes(model))
        for form in FORMS:
            q = tmp / f"{name}.{form}.onnx"
            quantize_onnx(fp, q, model, calib, input_size=128, form=form)
            files[f"{name}|{form}"] = (q, onnx_scopes(model))
    t = time_files(files, 128, args.threads, args.rounds, args.runs)
    for key, (e2e, net, ce, cn) in t.items():
        name, form = key.split("|")
        fp = t[f"{name}|fp32"]
        rows.append(row("int8", name, form, macs[name], e2e, net, net / fp[1],
                        "value: network vs FP32 network", cpu=(ce, cn), value_cpu=cn / fp[3]))
    dense_fp32 = t["fcos-dense|fp32"]
    for name in macs:
        best = min((k for k in t if k.startswith(name + "|") and not k.endswith("fp32")), key=lambda k: t[k][0])
        rows.append(row("int8", name, f"{best.split('|')[1]} (fastest): dense FP32 e2e / this e2e", macs[name], t[best][0],
                        t[best][1], dense_fp32[0] / t[best][0], "target >= 4 for the cut model",
                        cpu=(t[best][2], t[best][3]), value_cpu=dense_fp32[2] / t[best][2]))


def section_threads(tmp: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """The dense and 25%-MACs FCOS end to end at 1 and 2 threads, spinning off and on: each
    session's runs in one block per round (spinning threads would take the cores from the next
    session), ``rounds`` rounds, medians. What a second thread buys a thin model."""
    global SPINNING
    dense, cut, ratio = fcos_pair(128)
    paths = {name: export(m, tmp / f"threads-{name}.onnx", 128) for name, m in (("dense", dense), ("cut", cut))}
    feed = {"image": torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1)).numpy()}
    configs = [(1, False), (2, False), (2, True)]
    sessions = {(n, c): ort_session(p, c[0], spinning=c[1]) for n, p in paths.items() for c in configs}
    fns = {f"{n}|{c[0]}|{c[1]}": (lambda s=s: s.run(None, feed)) for (n, c), s in sessions.items()}
    ms: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        t = time_interleaved(fns, warmup=1, runs=args.runs, block=args.runs)
        for k in fns:
            ms[k].append(statistics.median(t[k]))
    saved = SPINNING
    for threads, spin in configs:
        SPINNING = spin
        d, c = (statistics.median(ms[f"{n}|{threads}|{spin}"]) for n in ("dense", "cut"))
        rows.append(row("threads", "fcos-dense", f"{threads} threads", 1.0, d, None))
        rows.append(row("threads", "fcos-macs0.25", f"{threads} threads", ratio, c, None, c / d / ratio,
                        f"e2e ratio {c / d:.3f} at MACs ratio {ratio:.3f}: value = e2e ratio / MACs ratio"))
    SPINNING = saved


def section_latency(tmp: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    from surgery.measure.bench import bench_checkpoints
    from surgery.storage.checkpoint import save_checkpoint

    models = [("fcos_resnet18_slim", FCOS_KW, 128)]
    if args.yolo:
        try:
            import ultralytics  # noqa: F401 - the optional extra
        except ImportError:
            rows.append(row("latency", "ultralytics:yolov8n.yaml", "skipped", None, None, None, None,
                            "ultralytics is not installed"))
        else:
            models.append(("ultralytics:yolov8n.yaml", {"nc": 4, "size": 128}, 128))
    for name, kw, size in models:
        torch.manual_seed(0)
        dense = build_model(name, **kw).eval()
        cut = copy.deepcopy(dense)
        t0 = time.perf_counter()
        res = prune_model(cut, PruneSection(method="l1", round_to=8, min_channels=8, target_latency=args.target,
                                            runtime="onnxruntime"), macs_input_size=size)
        lat = res.report.target
        seconds = time.perf_counter() - t0
        paths = [tmp / "dense.pt", tmp / "cut.pt"]
        save_checkpoint(paths[0], dense, ModelSpec(name, kw))
        save_checkpoint(paths[1], cut, ModelSpec(name, kw), kind="structured", plan=res.plan)
        cfg = BenchSection(input_size=size, batch_sizes=[1], runs=args.runs * 2, warmup=5, threads=args.threads,
                           runtime="onnxruntime")
        b = bench_checkpoints([str(p) for p in paths], cfg)
        rows.append(row("latency", name, f"target {args.target}", b[1].macs_ratio, b[1].latency_ms_median,
                        b[1].network_ms_median, b[1].network_ratio,
                        f"value: bench network ratio; allocator measured {lat.measured:.3f} in {lat.rounds} rounds, "
                        f"{seconds:.0f} s; within 5%: {abs(b[1].network_ratio - args.target) <= 0.05 * args.target}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path("benchmarks/deploy_speed.csv"))
    ap.add_argument("--what", default="pp,int8,latency")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--yolo", action="store_true")
    ap.add_argument("--spin", action="store_true", help="ONNX Runtime sessions spin-wait (its default; a quiet machine)")
    ap.add_argument("--int8-round-to", type=lambda t: [int(x) for x in t.split(",")], default=[8, 16])
    args = ap.parse_args()
    global SPINNING
    SPINNING = args.spin
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    printed = 0
    with tempfile.TemporaryDirectory(prefix="deploy-speed-") as tmp:
        for what in args.what.split(","):
            sections = {"pp": section_pp, "int8": section_int8, "threads": section_threads, "latency": section_latency}
            sections[what](Path(tmp), args, rows)
            for r in rows[printed:]:
                print(",".join("" if r[c] is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                               for c in COLUMNS), flush=True)
            printed = len(rows)
            rows_out = list(rows)
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                w.writeheader()
                w.writerows(rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
