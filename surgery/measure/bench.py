"""``surgery bench``: load checkpoints, measure them side by side (parameters, MACs, interleaved
latency, weight file size, optionally mAP) and write the rows under a fixed CSV schema
(:data:`BENCH_COLUMNS`). The measurements themselves are in :mod:`surgery.measure`."""

from __future__ import annotations

import contextlib
import csv
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from .. import compat
from ..deployment.export import export_onnx
from ..deployment.onnx_io import onnx_parameter_count
from ..deployment.runtime import OnnxDetector, fit_image, is_onnx, load_detector
from ..detectors.postprocess import fast_postprocess
from ..errors import MeasureError
from ..storage.atomic import atomic_open
from . import (
    configured_detections,
    count_macs,
    count_params,
    file_size,
    fixed_workload,
    state_dict_size,
)
from .evaluate import evaluate
from .split import (
    NETWORK_MODULES,
    accelerated_network,
    network_stubbed,
    onnx_network_shares,
    onnx_scopes,
    record_calls,
    replay_network,
)
from .timing import RUN_BLOCK, SPIN_BLOCK, paired_ratio, summarize, time_interleaved, torch_threads
from .workload import MACS_ROIS, example_images, quiet

if TYPE_CHECKING:
    from ..config.recipe import BenchSection

Progress = Callable[[str, float, int], None]  # (what, steps done, total steps)

RUNTIMES = ("torch", "onnxruntime", "openvino")


@dataclass
class BenchRow:
    """One CSV row: one model at one batch size. Ratios are against the first model.

    ``latency_ms_*`` is end to end (the model's transform, network, decoding, NMS) on a batch;
    ``network_ms_median`` the backbone + neck + head convolutions alone and ``pipeline_ms_median``
    everything else, measured separately on the same inputs (see :mod:`surgery.measure.split`).
    ``detections`` is the fixed count every model keeps per image while timed, so dense and pruned
    models do the same post-processing work.
    """

    model: str
    method: str
    ratio: float | None
    sparsity: float | None
    kind: str
    runtime: str
    precision: str  # f32 | bf16 | f16 (OpenVINO's inference precision; torch on CUDA: autocast)
    compile: str  # torch: none (eager) | cuda-graphs | reduce-overhead | default; ONNX runtimes: -
    device: str
    torch: str
    threads: int
    memory_format: str
    input_size: int
    batch_size: int
    detections: int | None
    params: int
    params_nonzero: int
    macs: int | None
    latency_ms_median: float
    latency_ms_p90: float
    network_ms_median: float | None
    pipeline_ms_median: float | None
    images_per_s: float
    file_bytes: int
    file_gzip_bytes: int
    mAP: float | None
    mAP50: float | None
    params_ratio: float
    macs_ratio: float
    latency_ratio: float
    network_ratio: float
    checkpoint: str
    notes: list[str] = field(default_factory=list)  # not in the CSV

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {c: d[c] for c in BENCH_COLUMNS}


# the CSV's columns: BenchRow's fields in order (``notes`` stays out)
BENCH_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(BenchRow) if f.name != "notes")


def _method_of(ckpt: Any) -> str:
    method = getattr(ckpt.plan, "method", None)
    return str(method or ckpt.kind)


def _sparsity_of(ckpt: Any) -> float | None:
    if getattr(ckpt.plan, "sparsity", None) is not None:
        return float(ckpt.plan.sparsity)
    if ckpt.masks:
        n = sum(m.numel() for m in ckpt.masks.values())
        kept = sum(int(m.sum().item()) for m in ckpt.masks.values())
        return 1.0 - kept / n if n else None
    return None


def _ratio(x: float | None, ref: float | None) -> float:
    return float(x) / float(ref) if x is not None and ref else float("nan")


def _num(meta: dict[str, str], key: str) -> float | None:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return None


@dataclass
class _Subject:
    """One model under one runtime: what is timed, and what is known about it."""

    key: str
    runtime: str
    model: nn.Module  # torch detector, or an OnnxDetector
    info: dict[str, Any]
    onnx: Path | None = None  # the file ONNX Runtime / OpenVINO runs (timing: fixed detection count)
    scopes: tuple[str, ...] = ()
    memory_format: str = "-"


def _onnx_runtime(cfg: BenchSection) -> str:
    """What runs ONNX files: OpenVINO when asked, else ONNX Runtime (also for ``--runtime torch``)."""
    return "openvino" if cfg.runtime == "openvino" else "onnxruntime"


def _load_subject(path: Path, cfg: BenchSection, rois: int | None, tmp: Path) -> _Subject:
    key = str(path)
    if is_onnx(path):
        det, ckpt = load_detector(path, "cpu", threads=cfg.threads, spinning=cfg.spinning, runtime=_onnx_runtime(cfg),
                                  precision=cfg.precision if cfg.runtime == "openvino" else "f32")
        meta = ckpt.meta.get("onnx", {})
        fbytes, fgzip = file_size(path)
        counted = onnx_parameter_count(path)  # the file's initializers: what a lying metadata cannot change
        declared = _num(meta, "params")
        # the model's own count when the file agrees with it (within 1%: shape constants, an INT8
        # copy's quantization parameters); otherwise the file's count, and a note
        agrees = declared is not None and abs(declared - counted) <= 0.01 * max(counted, 1)
        params = int(declared) if agrees else counted
        nonzero = int(_num(meta, "params_nonzero") or params) if agrees else params
        info = {"model": ckpt.spec.name, "method": meta.get("method", "onnx"), "ratio": _num(meta, "ratio"),
                "sparsity": None, "kind": ckpt.kind, "params": params, "params_nonzero": nonzero,
                "file_bytes": fbytes, "file_gzip_bytes": fgzip, "macs": _num(meta, "macs"), "detections": int(_num(meta, "detections") or 0) or None,
                "notes": [f"{path.name}: an ONNX file, timed as exported (its own thresholds and input size)"]}
        if declared is not None and not agrees:
            info["notes"].append(f"{path.name}: its metadata says {int(declared)} parameters, its initializers hold "
                                 f"{counted} (shown)")
        macs_size = _num(meta, "input_size")
        if macs_size is not None and int(macs_size) != cfg.input_size:
            info["notes"].append(f"{path.name}: MACs are from its export at {int(macs_size)}px")
        return _Subject(key, det.runtime, det, info, onnx=path, scopes=onnx_scopes(NETWORK_MODULES))
    model, ckpt = load_detector(path, device=cfg.device)
    if cfg.resize_model:
        compat.set_resize(model, (int(cfg.input_size),), int(cfg.input_size))  # SSD: fixed size, kept
    params, nonzero = count_params(model)
    fbytes, fgzip = state_dict_size(model)
    det = configured_detections(model)
    macs = count_macs(model, cfg.input_size, rois=rois, detections=det)
    info = {"model": ckpt.spec.name, "method": _method_of(ckpt), "ratio": getattr(ckpt.plan, "ratio", None),
            "sparsity": _sparsity_of(ckpt), "kind": ckpt.kind, "params": params, "params_nonzero": nonzero,
            "file_bytes": fbytes, "file_gzip_bytes": fgzip, "macs": macs.total, "detections": det,
            "notes": [n for n in macs.notes if not n.startswith("element-wise")]}
    if cfg.runtime == "torch":
        return _Subject(key, "torch", model, info)
    onnx = tmp / f"{len(list(tmp.iterdir()))}-{path.stem}.onnx"
    with fixed_workload(model, rois, det):  # the detection count is baked into the graph
        export_onnx(model, onnx, cfg.input_size, verify=False)
    info["torch_model"] = model  # mAP is measured on the real thresholds: see _evaluate
    det = OnnxDetector(onnx, cfg.threads, spinning=cfg.spinning, runtime=cfg.runtime, precision=cfg.precision)
    return _Subject(key, cfg.runtime, det, info, onnx=onnx, scopes=onnx_scopes(model))


def _memory_format(subject: _Subject, cfg: BenchSection, batch: list[torch.Tensor]) -> str:
    """channels_last where it helps: ``auto`` times both layouts (5 runs each, batch as given) and
    keeps the faster; oneDNN's convolutions are often faster in NHWC on x86."""
    if subject.runtime != "torch" or cfg.channels_last == "off":
        return "contiguous" if subject.runtime == "torch" else "-"
    model = subject.model
    if cfg.channels_last == "on":
        model.to(memory_format=torch.channels_last)
        return "channels_last"
    with torch.inference_mode():
        fns = {"contiguous": lambda: model(batch)}
        t_cont = time_interleaved(fns, warmup=1, runs=5)["contiguous"]
        model.to(memory_format=torch.channels_last)
        fns = {"channels_last": lambda: model(batch)}
        t_last = time_interleaved(fns, warmup=1, runs=5)["channels_last"]
    if statistics.median(t_last) < statistics.median(t_cont):
        return "channels_last"
    model.to(memory_format=torch.contiguous_format)
    return "contiguous"


def bench_checkpoints(
    paths: Sequence[str | Path],
    cfg: BenchSection,
    *,
    dataset: Any = None,
    progress: Progress | None = None,
    rois: int | None = None,
) -> list[BenchRow]:
    """Benchmark checkpoints (or exported ``.onnx`` files) side by side; the first is the reference.

    Each checkpoint is loaded with :func:`surgery.deployment.runtime.load_detector` (masks folded into the
    weights), then: parameters, MACs at ``cfg.input_size`` (two-stage models at ``rois`` RoIs,
    default ``cfg.rois``, else :data:`~surgery.measure.workload.MACS_ROIS` as prune counts), and for
    every ``cfg.batch_sizes`` the
    end-to-end, network and pipeline latency, interleaved across models, with every model keeping
    exactly its ``detections_per_img`` detections (score threshold 0) so post-processing costs the
    same for all. ``cfg.runtime`` ``onnxruntime`` / ``openvino`` exports each checkpoint (fixed
    workload baked in) and times it in that runtime (OpenVINO at ``cfg.precision``), its
    network/pipeline split from the runtime's profiler; ``.onnx`` files run in OpenVINO with
    ``--runtime openvino``, in ONNX Runtime otherwise. Size of the weights (plain and gzipped), and mAP /
    mAP50 when ``dataset`` is given (with the models' own thresholds). One row per (model, batch).
    """
    import tempfile

    rois = next(r for r in (rois, cfg.rois, MACS_ROIS) if r is not None)  # one default with prune's MACs
    paths = [Path(p) for p in paths]
    if not paths:
        raise MeasureError("bench needs at least one checkpoint")
    if len(set(map(str, paths))) != len(paths):
        raise MeasureError(f"a checkpoint is given twice: {[str(p) for p in paths]}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MeasureError("--device cuda asked for, but torch sees no CUDA device")
    n = len(paths)
    total = n + len(cfg.batch_sizes) + (n if dataset is not None else 0) + 1
    done = 0.0

    def tick(what: str, amount: float = 1.0) -> None:
        nonlocal done
        done += amount
        if progress:
            progress(what, done, total)

    with tempfile.TemporaryDirectory(prefix="surgery-bench-") as tmpdir:
        subjects: list[_Subject] = []
        for path in paths:
            subjects.append(_load_subject(path, cfg, rois, Path(tmpdir)))
            tick(f"loaded {path.name}")
        timings = _time_all(subjects, cfg, rois, tick)
        maps = {s.key: _evaluate(s, dataset, cfg) for s in subjects} if dataset is not None else {}
        if dataset is not None:
            tick("mAP", n)
    rows = _rows(subjects, timings, maps, cfg)
    if progress:
        progress("done", total, total)
    return rows


def _time_all(
    subjects: list[_Subject], cfg: BenchSection, rois: int | None, tick: Callable[[str, float], None]
) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (model, batch size): end-to-end, network and pipeline milliseconds and the memory format."""
    dev = torch.device(cfg.device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else None
    block = SPIN_BLOCK if cfg.spinning else RUN_BLOCK
    out: dict[tuple[str, int], dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(cfg.threads))
        stack.enter_context(quiet())
        for s in subjects:
            if s.runtime == "torch":
                stack.enter_context(fixed_workload(s.model, rois, s.info["detections"]))
                # the exported file's post-processing (surgery.detectors.postprocess), same detections
                stack.enter_context(fast_postprocess(s.model))
        for bs in cfg.batch_sizes:
            batch = example_images(bs, cfg.input_size, dev, seed=bs)
            fns: dict[str, Callable[[], Any]] = {}
            per_batch = contextlib.ExitStack()
            for s in subjects:
                if s.runtime == "torch":
                    if s.memory_format == "-":
                        s.memory_format = _memory_format(s, cfg, batch)
                    with _autocast(cfg):
                        calls = record_calls(s.model, batch)
                    per_batch.enter_context(accelerated_network(calls, cfg.compile))

                    def pipeline(m: nn.Module = s.model, calls: list = calls, b: list = batch) -> None:
                        with network_stubbed(calls):
                            m(b)

                    fns[f"{s.key}\0network"] = _in_precision(lambda calls=calls: replay_network(calls), cfg)
                    fns[f"{s.key}\0pipeline"] = _in_precision(pipeline, cfg)
                    fns[f"{s.key}\0e2e"] = _in_precision(lambda m=s.model, b=batch: m(b), cfg)
                else:
                    fns[f"{s.key}\0e2e"] = lambda m=s.model, b=batch: m(b)
            with per_batch, torch.inference_mode():
                times = time_interleaved(
                    fns, warmup=cfg.warmup, runs=cfg.runs, sync=sync, block=block,
                    progress=lambda: tick("latency", 1 / max(cfg.warmup + math.ceil(cfg.runs / block), 1)),
                )
            shares = _onnx_shares([s for s in subjects if s.runtime != "torch"], batch, cfg)
            for s in subjects:
                t = {part: times.get(f"{s.key}\0{part}") for part in ("e2e", "network", "pipeline")}
                row: dict[str, Any] = {"e2e": summarize(t["e2e"]), "memory_format": s.memory_format,
                                       "e2e_runs": t["e2e"], "network_runs": t["network"]}
                if s.runtime == "torch":
                    row["network"] = statistics.median(t["network"])
                    row["pipeline"] = statistics.median(t["pipeline"])
                else:
                    # the profiler's per-node times add overhead: split the measured
                    # end-to-end time by the profiled share of network kernel time
                    share = row["share"] = shares[s.key]
                    e2e = row["e2e"][0]
                    row["network"] = None if share is None else e2e * share
                    row["pipeline"] = None if share is None else e2e - row["network"]
                out[(s.key, bs)] = row
    return out


def _autocast(cfg: BenchSection) -> contextlib.AbstractContextManager:
    """torch on CUDA at ``cfg.precision`` bf16 / f16: autocast (convolutions in half precision,
    reductions and the post-processing's sensitive ops in float, as torch decides); else nothing."""
    if cfg.device != "cuda" or cfg.precision == "f32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


def _in_precision(fn: Callable[[], Any], cfg: BenchSection) -> Callable[[], Any]:
    if cfg.device != "cuda" or cfg.precision == "f32":
        return fn

    def run() -> Any:
        with _autocast(cfg):
            return fn()

    return run


def _onnx_shares(subjects: list[_Subject], batch: list[torch.Tensor], cfg: BenchSection) -> dict[str, float | None]:
    """Each ONNX Runtime / OpenVINO subject's network share of its profiled kernel time (median of
    3 passes alternating the subjects of one runtime, :func:`~surgery.measure.split.onnx_network_shares`)."""
    out: dict[str, float | None] = {}
    for runtime in sorted({s.runtime for s in subjects}):
        group = [s for s in subjects if s.runtime == runtime]
        files = [(s.onnx, s.scopes, [{s.model.input_name: fit_image(img, s.model.fixed).numpy()} for img in batch])
                 for s in group]
        shares = onnx_network_shares(files, threads=cfg.threads, runs=max(1, min(cfg.runs, 10) // 2),
                                     spinning=cfg.spinning, runtime=runtime, precision=group[0].model.precision)
        out.update(zip((s.key for s in group), shares))
    return out


def _evaluate(s: _Subject, dataset: Any, cfg: BenchSection) -> tuple[float | None, float | None]:
    """mAP of what a user deploys: the model's own thresholds (an ONNX Runtime subject made from a
    checkpoint is exported again without the timing workload)."""
    import tempfile

    model = s.model
    with tempfile.TemporaryDirectory(prefix="surgery-eval-") as tmp:
        if "torch_model" in s.info:
            path = Path(tmp) / "eval.onnx"
            export_onnx(s.info["torch_model"], path, cfg.input_size, verify=False)
            model = OnnxDetector(path, cfg.threads, runtime=s.model.runtime, precision=s.model.precision)
        res = evaluate(model, dataset, batch_size=8, device=cfg.device if s.runtime == "torch" else "cpu")
    return res.metrics.get("mAP"), res.metrics.get("mAP50")


def _network_ratio(t: dict[str, Any], ref: dict[str, Any]) -> float:
    """Network time against the reference's, from the same interleaved runs as the end-to-end
    ratio (paired run by run; ONNX Runtime: scaled by the two profiled network shares)."""
    if t["network_runs"] is not None and ref["network_runs"] is not None:
        return paired_ratio(t["network_runs"], ref["network_runs"])
    if t.get("share") is None or ref.get("share") is None:
        return _ratio(t["network"], ref["network"])
    return paired_ratio(t["e2e_runs"], ref["e2e_runs"]) * t["share"] / ref["share"]


def _rows(
    subjects: list[_Subject], timings: dict[tuple[str, int], dict[str, Any]],
    maps: dict[str, tuple[float | None, float | None]], cfg: BenchSection,
) -> list[BenchRow]:
    ref = subjects[0]
    notes = compare_notes(subjects)
    rows: list[BenchRow] = []
    for s in subjects:
        i = s.info
        for bs in cfg.batch_sizes:
            t, r0 = timings[(s.key, bs)], timings[(ref.key, bs)]
            med, p90 = t["e2e"]
            rows.append(BenchRow(
                model=i["model"], method=i["method"], ratio=i["ratio"], sparsity=i["sparsity"], kind=i["kind"],
                runtime=s.runtime, precision=_precision(s, cfg), compile=cfg.compile if s.runtime == "torch" else "-",
                device=cfg.device if s.runtime == "torch" else "cpu", torch=torch.__version__,
                threads=cfg.threads, memory_format=t["memory_format"], input_size=cfg.input_size, batch_size=bs,
                detections=i["detections"], params=i["params"], params_nonzero=i["params_nonzero"],
                macs=None if i["macs"] is None else int(i["macs"]), latency_ms_median=med, latency_ms_p90=p90,
                network_ms_median=t["network"], pipeline_ms_median=t["pipeline"],
                images_per_s=bs / (med / 1e3) if med > 0 else float("inf"),
                file_bytes=i["file_bytes"], file_gzip_bytes=i["file_gzip_bytes"],
                mAP=maps.get(s.key, (None, None))[0], mAP50=maps.get(s.key, (None, None))[1],
                params_ratio=_ratio(i["params"], ref.info["params"]), macs_ratio=_ratio(i["macs"], ref.info["macs"]),
                latency_ratio=paired_ratio(t["e2e_runs"], r0["e2e_runs"]), network_ratio=_network_ratio(t, r0),
                checkpoint=s.key, notes=list(i["notes"]) + notes,
            ))
    return rows


def _precision(s: _Subject, cfg: BenchSection) -> str:
    if s.runtime == "torch":
        return cfg.precision if cfg.device == "cuda" else "f32"
    return s.model.precision


def compare_notes(subjects: Sequence[_Subject]) -> list[str]:
    """Warnings about the comparison itself: different architectures or runtimes side by side."""
    notes = []
    models = {s.info["model"] for s in subjects}
    if len(models) > 1:
        notes.append(
            f"comparing different models ({', '.join(sorted(models))}): the ratios are not a pruning result"
        )
    runtimes = {s.runtime for s in subjects}
    if len(runtimes) > 1:
        notes.append(f"comparing runtimes ({', '.join(sorted(runtimes))}): latency ratios mix runtime and model")
    return notes


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return str(v)


def write_csv(rows: Sequence[BenchRow | dict[str, Any]], path: str | Path) -> Path:
    """Write rows with the :data:`BENCH_COLUMNS` header (always the same, in that order),
    atomically (temporary file + rename). Missing keys of dict rows are left empty."""
    path = Path(path)
    with atomic_open(path, "w", newline="") as f:
        write_csv_to(rows, f)
    return path


def write_csv_to(rows: Sequence[BenchRow | dict[str, Any]], stream: IO[str]) -> None:
    """The CSV of :func:`write_csv` on an open text stream (``sys.stdout``)."""
    w = csv.writer(stream)
    w.writerow(BENCH_COLUMNS)
    for row in rows:
        d = row.to_dict() if isinstance(row, BenchRow) else row
        w.writerow([_csv_value(d.get(c)) for c in BENCH_COLUMNS])
