"""Measurements: parameters, MACs, latency, file size, and the ``surgery bench`` runner.

What each number means (they are the numbers users came for, so they are meant to be honest):

- **params**: every parameter element (shared tensors once); **params_nonzero**: those not exactly 0.
  A masked model has the dense shape, so only ``params_nonzero`` drops.
- **MACs**: fvcore's ``FlopCountAnalysis``, which counts one fused multiply-add as one "flop", i.e.
  its numbers *are* MACs. Counted on one ``3 x S x S`` image in eval mode, after the model's own
  ``transform`` (which may resize the image to its ``min_size``). Two-stage models are counted at a
  fixed RoI / detection count (see :func:`fixed_workload`). Element-wise ops fvcore has no rule for
  (add, mul, sigmoid, nms, topk...) are *not* counted and are listed in ``MacsResult.uncounted``.
  ``torchvision::roi_align`` *is* counted, as its bilinear interpolation cost (see
  :func:`_roi_align_macs`). Masked weights are still multiplied on dense hardware, so a masked model
  has the dense model's MACs.
  Why fvcore and not Torch-Pruning's ``count_ops_and_params``: the latter counts ``ConvTranspose2d``
  at the output resolution, i.e. 4x too high for Mask R-CNN's 2x-upsampling mask head; fvcore
  counts a transposed conv at its input resolution, which is right.
- **latency**: timm-benchmark style, warm-up then runs *interleaved* across models (round-robin with
  a rotating start), so drift on a shared machine hits all models alike; median and p90 in ms per
  batch. Masked models are timed with their masks folded into plain weights (:func:`fold_masks`).
- **peak memory**: CUDA only (``max_memory_allocated`` during the forward, relative to before it,
  plus the model's own weights). On CPU there is no reliable per-model number without a separate
  process (``ru_maxrss`` is a process-wide high-water mark that never goes down, and tracemalloc does
  not see torch's allocator), so it is recorded as ``None``.
- **file size**: bytes of the weights alone (``torch.save`` of the state dict, masks folded in, no
  optimizer state or mask tensors) and of the same bytes gzipped; zeros compress, so masked models
  shrink on disk even though they do not get faster.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .atomic import atomic_open
from .errors import SurgeryError

if TYPE_CHECKING:
    from .recipe import BenchSection

Progress = Callable[[str, float, int], None]  # (what, steps done, total steps)


class MeasureError(SurgeryError):
    """A measurement cannot be done as asked (no CUDA device, a model that does not run...)."""


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(total, nonzero)`` parameter elements; a parameter shared by two modules counts once."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()).item())
    return total, nonzero


def fold_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Make a masked model a plain module: remove ``torch.nn.utils.prune`` re-parametrisations
    (``weight_orig`` x ``weight_mask`` forward pre-hooks) and multiply ``masks`` (``{param_name:
    bool tensor}``, as a checkpoint stores them) into the weights. In place; returns ``model``.

    Latency is measured on the result, so a masked model is timed exactly like a dense one of the
    same shape (no hook overhead in its favour or against it)."""
    from torch.nn.utils import prune as tprune

    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, tprune.BasePruningMethod):
                tprune.remove(module, hook._tensor_name)
    if masks:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, mask in masks.items():
                p = params.get(name)
                if p is None:
                    raise MeasureError(f"mask for {name!r} matches no parameter of the model")
                if p.shape != mask.shape:
                    raise MeasureError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(p.shape)}")
                p.mul_(mask.to(device=p.device, dtype=p.dtype))
    return model


# --------------------------------------------------------------------------------------------
# Fixed workload: make post-processing deterministic in size
# --------------------------------------------------------------------------------------------


def is_two_stage(model: nn.Module) -> bool:
    return hasattr(model, "rpn") and hasattr(model, "roi_heads")


def configured_rois(model: nn.Module) -> int | None:
    """The RPN's test-time post-NMS top-n (the most RoIs the box head ever sees), or ``None``."""
    rpn = getattr(model, "rpn", None)
    post = getattr(rpn, "_post_nms_top_n", None)
    return int(post["testing"]) if isinstance(post, dict) and "testing" in post else None


def configured_detections(model: nn.Module) -> int | None:
    holder = getattr(model, "roi_heads", model)
    d = getattr(holder, "detections_per_img", None)
    return int(d) if d is not None else None


@contextlib.contextmanager
def fixed_workload(model: nn.Module, rois: int | None = 100, detections: int | None = 100) -> Iterator[None]:
    """Temporarily make the number of RoIs / detections independent of the weights, then restore.

    Two-stage (``rpn`` + ``roi_heads``): the RPN keeps ``rois`` proposals (pre- and post-NMS top-n
    for training and testing set to ``rois``, ``nms_thresh=1.0`` so NMS removes nothing,
    ``score_thresh=0``, ``min_size=0``), so the box head sees exactly ``rois`` RoIs (fewer only if
    the image has fewer anchors); ``roi_heads`` keeps ``detections`` (``score_thresh=0``,
    ``nms_thresh=1.0``, ``detections_per_img``), so mask/keypoint heads see a fixed count.
    One-stage (FCOS, RetinaNet, SSD): ``score_thresh=0``, ``nms_thresh=1.0``,
    ``detections_per_img=detections``. ``None`` keeps the model's own value.

    Without this an untrained or pruned model emits a different number of boxes than the dense
    one, and the heads' cost (and latency) would change for reasons unrelated to the pruning.
    """
    saved: list[tuple[Any, str, Any]] = []

    def put(obj: Any, attr: str, value: Any) -> None:
        if obj is None or not hasattr(obj, attr):
            return
        old = getattr(obj, attr)
        saved.append((obj, attr, dict(old) if isinstance(old, dict) else old))
        setattr(obj, attr, value)

    try:
        if is_two_stage(model):
            rpn, heads = model.rpn, model.roi_heads
            if rois is not None:
                put(rpn, "_pre_nms_top_n", {"training": rois, "testing": rois})
                put(rpn, "_post_nms_top_n", {"training": rois, "testing": rois})
                put(rpn, "nms_thresh", 1.0)
                put(rpn, "score_thresh", 0.0)
                put(rpn, "min_size", 0.0)
            if detections is not None:
                put(heads, "score_thresh", 0.0)
                put(heads, "nms_thresh", 1.0)
                put(heads, "detections_per_img", detections)
        elif detections is not None:
            put(model, "score_thresh", 0.0)
            put(model, "nms_thresh", 1.0)
            put(model, "detections_per_img", detections)
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


# --------------------------------------------------------------------------------------------
# MACs
# --------------------------------------------------------------------------------------------


@dataclass
class MacsResult:
    """MACs of one forward on one ``3 x input_size x input_size`` image (eval mode)."""

    total: int
    by_module: dict[str, int]  # top-level children: backbone, rpn, roi_heads, head, transform...
    uncounted: dict[str, int]  # ops fvcore has no rule for -> number of calls (their cost is not in total)
    input_size: int
    rois: int | None = None  # RoIs the box head actually saw (two-stage), else None
    detections: int | None = None  # detections per image the fixed workload asked for
    roi_align_macs: int = 0  # included in total: RoIAlign bilinear interpolation cost
    backbone_input: tuple[int, int] | None = None  # (H, W) after the model's transform resized the image
    notes: list[str] = field(default_factory=list)

    @property
    def gmacs(self) -> float:
        return self.total / 1e9


def _roi_align_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``torchvision::roi_align``: output elements x sampling points per bin x 4.

    Each sampling point is a bilinear interpolation (4 weighted reads = 4 MACs) and the
    ``sampling_ratio**2`` points of a bin are averaged. An adaptive ``sampling_ratio <= 0`` depends
    on each RoI's size; it is counted as 2 (torchvision's detectors all use 2)."""
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(outputs[0]) or []
    try:
        sr = int(inputs[5].toIValue())
    except Exception:  # noqa: BLE001 - not a constant in the trace
        sr = 2
    sr = sr if sr > 0 else 2
    return int(math.prod(shape)) * sr * sr * 4


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence fvcore's logging and the tracer/torchvision warnings it triggers."""
    loggers = [logging.getLogger(n) for n in ("fvcore", "fvcore.nn.jit_analysis", "iopath")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _example_images(n: int, size: int, device: torch.device | str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g).to(device) for _ in range(n)]


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def count_macs(
    model: nn.Module,
    input_size: int,
    *,
    rois: int | None = 100,
    detections: int | None = 100,
    count_roi_align: bool = True,
) -> MacsResult:
    """Count multiply-accumulates with fvcore (one fused multiply-add = one fvcore "flop" = 1 MAC).

    The model runs in eval mode on one random ``3 x input_size x input_size`` image inside
    :func:`fixed_workload` (``rois`` proposals into the box head of a two-stage model, ``detections``
    kept per image); ``rois=None`` uses the model's own test-time post-NMS top-n, i.e. the most RoIs
    it ever processes. Thresholds and train/eval mode are restored afterwards.

    ``torchvision::roi_align`` is counted as its interpolation cost (:func:`_roi_align_macs`,
    reported separately in ``roi_align_macs``) unless ``count_roi_align=False``, in which case it
    shows up in ``uncounted``. Torch-Pruning's counter is not used: it counts ``ConvTranspose2d`` at
    output resolution (4x too high on Mask R-CNN's mask head); fvcore counts it correctly.
    """
    with _quiet():
        from fvcore.nn import FlopCountAnalysis

    if rois is None:
        rois = configured_rois(model)
    seen: dict[str, int] = {}
    hooks = []
    heads = getattr(model, "roi_heads", None)
    if is_two_stage(model) and isinstance(getattr(heads, "box_roi_pool", None), nn.Module):
        hooks.append(
            heads.box_roi_pool.register_forward_hook(lambda m, i, o: seen.__setitem__("rois", int(o.shape[0])))
        )
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):

        def grab(m: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen["h"], seen["w"] = int(args[0].shape[-2]), int(args[0].shape[-1])

        hooks.append(backbone.register_forward_pre_hook(grab))
    was_training = model.training
    model.eval()
    image = _example_images(1, input_size, _model_device(model))
    ra_total = 0

    def roi_align_handle(inputs: list[Any], outputs: list[Any]) -> int:
        nonlocal ra_total
        n = _roi_align_macs(inputs, outputs)
        ra_total += n
        return n

    try:
        with _quiet(), fixed_workload(model, rois, detections), torch.no_grad():
            fa = FlopCountAnalysis(model, (image,))
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            fa.tracer_warnings("none")
            if count_roi_align:
                fa.set_op_handle("torchvision::roi_align", roi_align_handle)
            total = int(fa.total())
            by_mod = fa.by_module()
            uncounted = dict(fa.unsupported_ops())
    except Exception as e:
        raise MeasureError(f"cannot count MACs of {type(model).__name__} at {input_size}px: {e}") from e
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    by_module = {name: int(by_mod.get(name, 0)) for name, _ in model.named_children()}
    notes = ["element-wise ops (add, mul, sigmoid, nms, topk...) are not counted; see uncounted"]
    if count_roi_align and ra_total:
        notes.append("roi_align counted as output elements x sampling points x 4 (bilinear)")
    if is_two_stage(model) and seen.get("rois") is not None and rois is not None and seen["rois"] != rois:
        notes.append(f"asked for {rois} RoIs, the box head saw {seen['rois']} (too few anchors)")
    bb = (seen["h"], seen["w"]) if "h" in seen else None
    if bb is not None and bb != (input_size, input_size):
        notes.append(
            f"the model's transform resizes the {input_size}x{input_size} image to {bb[0]}x{bb[1]} "
            "(its min_size/max_size); the backbone runs at that size"
        )
    return MacsResult(
        total=total,
        by_module=by_module,
        uncounted=uncounted,
        input_size=input_size,
        rois=seen.get("rois"),
        detections=detections,
        roi_align_macs=ra_total,
        backbone_input=bb,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------


@dataclass
class LatencyResult:
    name: str
    device: str
    threads: int  # torch.get_num_threads() during the runs
    input_size: int
    batch_size: int
    warmup: int
    runs: int
    median_ms: float  # per batch
    p90_ms: float
    mean_ms: float
    min_ms: float
    images_per_s: float  # batch_size / median
    peak_mem_mb: float | None  # CUDA only; None on CPU (no reliable in-process number)
    times_ms: list[float] = field(default_factory=list)


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure_latency(
    models: dict[str, nn.Module],
    input_size: int,
    *,
    batch_sizes: Sequence[int] = (1, 4),
    warmup: int = 3,
    runs: int = 20,
    threads: int | None = 2,
    device: str = "cpu",
    rois: int | None = None,
    detections: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[LatencyResult]:
    """Time inference of several models on the same random batches, interleaved.

    For each batch size: ``warmup`` untimed passes per model, then ``runs`` rounds in which every
    model runs once (round-robin, starting one model later each round), so thermal/contention
    drift on a shared machine is spread over all models alike. Times are per batch of
    ``batch_size`` ``3 x input_size x input_size`` images (the model's own transform included),
    under ``torch.inference_mode``; CUDA is synchronised around each call. ``threads`` sets
    ``torch.set_num_threads`` for the runs (restored afterwards). Models are moved to ``device``
    and put in eval mode (their mode is restored). By default the model's own thresholds apply
    (real deployment latency); ``rois``/``detections`` use :func:`fixed_workload` instead.

    Returns one result per (batch size, model), in that order.
    """
    if not models:
        return []
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MeasureError("device 'cuda' asked for, but torch sees no CUDA device")
    cuda = dev.type == "cuda"
    names = list(models)
    modes = {n: m.training for n, m in models.items()}
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    results: list[LatencyResult] = []
    total_steps = len(batch_sizes) * (warmup + runs)
    step = 0

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_quiet())
            for m in models.values():
                m.to(dev).eval()
                if rois is not None or detections is not None:
                    stack.enter_context(fixed_workload(m, rois, detections))
            for bs in batch_sizes:
                batch = _example_images(bs, input_size, dev, seed=bs)
                times: dict[str, list[float]] = {n: [] for n in names}
                peaks: dict[str, float] = {n: 0.0 for n in names}
                with torch.inference_mode():
                    for _ in range(warmup):
                        for n in names:
                            models[n](batch)
                        sync()
                        step += 1
                        if progress:
                            progress(step, total_steps)
                    for r in range(runs):
                        k = r % len(names)
                        for n in names[k:] + names[:k]:
                            if cuda:
                                torch.cuda.reset_peak_memory_stats(dev)
                                before = torch.cuda.memory_allocated(dev)
                            sync()
                            t0 = time.perf_counter()
                            models[n](batch)
                            sync()
                            times[n].append((time.perf_counter() - t0) * 1e3)
                            if cuda:
                                peaks[n] = max(peaks[n], torch.cuda.max_memory_allocated(dev) - before)
                        step += 1
                        if progress:
                            progress(step, total_steps)
                for n in names:
                    t = times[n]
                    med = statistics.median(t)
                    peak = None
                    if cuda:
                        own = sum(x.numel() * x.element_size() for x in models[n].state_dict().values())
                        peak = (peaks[n] + own) / 2**20
                    results.append(
                        LatencyResult(
                            name=n,
                            device=str(dev),
                            threads=torch.get_num_threads(),
                            input_size=input_size,
                            batch_size=bs,
                            warmup=warmup,
                            runs=runs,
                            median_ms=med,
                            p90_ms=_quantile(t, 0.9),
                            mean_ms=statistics.fmean(t),
                            min_ms=min(t),
                            images_per_s=bs / (med / 1e3) if med > 0 else float("inf"),
                            peak_mem_mb=peak,
                            times_ms=list(t),
                        )
                    )
    finally:
        torch.set_num_threads(old_threads)
        for n, m in models.items():
            m.train(modes[n])
    return results


# --------------------------------------------------------------------------------------------
# File size
# --------------------------------------------------------------------------------------------


def file_size(path: str | Path) -> tuple[int, int]:
    """``(bytes, gzip_bytes)`` of a file; the gzip size is computed in memory (level 6)."""
    data = Path(path).read_bytes()
    return len(data), len(gzip.compress(data, compresslevel=6))


def state_dict_size(model: nn.Module) -> tuple[int, int]:
    """``(bytes, gzip_bytes)`` of ``torch.save(model.state_dict())``: the deployable weights alone,
    without a checkpoint's masks, plan or optimizer state."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    return len(data), len(gzip.compress(data, compresslevel=6))


# --------------------------------------------------------------------------------------------
# Bench: a fixed CSV schema
# --------------------------------------------------------------------------------------------

BENCH_COLUMNS: tuple[str, ...] = (
    "model",
    "method",
    "ratio",
    "sparsity",
    "kind",
    "device",
    "torch",
    "threads",
    "input_size",
    "batch_size",
    "params",
    "params_nonzero",
    "macs",
    "latency_ms_median",
    "latency_ms_p90",
    "images_per_s",
    "peak_mem_mb",
    "file_bytes",
    "file_gzip_bytes",
    "mAP",
    "mAP50",
    "params_ratio",
    "macs_ratio",
    "latency_ratio",
    "checkpoint",
)


@dataclass
class BenchRow:
    """One CSV row: one checkpoint at one batch size. Ratios are against the first checkpoint."""

    model: str
    method: str
    ratio: float | None
    sparsity: float | None
    kind: str
    device: str
    torch: str
    threads: int
    input_size: int
    batch_size: int
    params: int
    params_nonzero: int
    macs: int
    latency_ms_median: float
    latency_ms_p90: float
    images_per_s: float
    peak_mem_mb: float | None
    file_bytes: int
    file_gzip_bytes: int
    mAP: float | None
    mAP50: float | None
    params_ratio: float
    macs_ratio: float
    latency_ratio: float
    checkpoint: str
    notes: list[str] = field(default_factory=list)  # not in the CSV

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {c: d[c] for c in BENCH_COLUMNS}


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


def set_input_size(model: nn.Module, size: int) -> None:
    """Make a torchvision-style detector resize its images to ``size`` (``GeneralizedRCNNTransform``
    ``min_size``/``max_size``); models with a fixed size (SSD) are left alone."""
    transform = getattr(model, "transform", None)
    if transform is not None and hasattr(transform, "min_size") and getattr(transform, "fixed_size", None) is None:
        transform.min_size, transform.max_size = (int(size),), int(size)


def bench_checkpoints(
    paths: Sequence[str | Path],
    cfg: BenchSection,
    *,
    dataset: Any = None,
    progress: Progress | None = None,
    rois: int | None = None,
) -> list[BenchRow]:
    """Benchmark checkpoints side by side; the first one is the dense reference for the ratios.

    Each checkpoint is loaded with :func:`surgery.checkpoint.load_checkpoint`, masked ones get
    their masks folded into the weights, then: parameters, MACs at ``cfg.input_size`` (two-stage
    models at ``rois`` RoIs, default the model's own test-time post-NMS top-n, and its
    ``detections_per_img``), interleaved latency for every ``cfg.batch_sizes`` on ``cfg.device``
    with ``cfg.threads``, size of the weights (plain and gzipped), and mAP / mAP50 when ``dataset``
    is given. One row per (checkpoint, batch size).
    """
    from .checkpoint import load_checkpoint

    rois = rois if rois is not None else cfg.rois
    paths = [Path(p) for p in paths]
    if not paths:
        raise MeasureError("bench needs at least one checkpoint")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MeasureError("--device cuda asked for, but torch sees no CUDA device")
    n = len(paths)
    total = 2 * n + (n if dataset is not None else 0) + 1
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(what, done, total)

    models: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    for path in paths:
        key = str(path)
        if key in models:
            raise MeasureError(f"checkpoint {path} is given twice")
        model, ckpt = load_checkpoint(path, device=cfg.device)
        if ckpt.kind == "masked":
            fold_masks(model, ckpt.masks)
        model.eval()
        if cfg.resize_model:
            set_input_size(model, cfg.input_size)
        params, nonzero = count_params(model)
        fbytes, fgzip = state_dict_size(model)
        info[key] = {
            "model": ckpt.spec.name,
            "method": _method_of(ckpt),
            "ratio": getattr(ckpt.plan, "ratio", None),
            "sparsity": _sparsity_of(ckpt),
            "kind": ckpt.kind,
            "params": params,
            "params_nonzero": nonzero,
            "file_bytes": fbytes,
            "file_gzip_bytes": fgzip,
        }
        models[key] = model
        tick(f"loaded {path.name}")
        det = configured_detections(model)
        macs = count_macs(model, cfg.input_size, rois=rois, detections=det)
        info[key]["macs"] = macs.total
        info[key]["notes"] = [n for n in macs.notes if not n.startswith("element-wise")]
        tick(f"MACs {path.name}")

    lat_total = len(cfg.batch_sizes) * (cfg.warmup + cfg.runs)

    def lat_progress(step: int, steps: int) -> None:
        if progress:
            progress("latency", done + step / max(steps, 1), total)

    lat = measure_latency(
        models,
        cfg.input_size,
        batch_sizes=tuple(cfg.batch_sizes),
        warmup=cfg.warmup,
        runs=cfg.runs,
        threads=cfg.threads,
        device=cfg.device,
        rois=rois,
        progress=lat_progress if lat_total else None,
    )
    tick("latency")

    maps: dict[str, tuple[float | None, float | None]] = {}
    for key, model in models.items():
        if dataset is None:
            maps[key] = (None, None)
            continue
        from .evaluate import evaluate

        res = evaluate(model, dataset, batch_size=8, device=cfg.device)
        maps[key] = (res.metrics.get("mAP"), res.metrics.get("mAP50"))
        tick(f"mAP {Path(key).name}")

    ref_key = str(paths[0])
    ref_lat = {r.batch_size: r.median_ms for r in lat if r.name == ref_key}
    rows: list[BenchRow] = []
    for r in sorted(lat, key=lambda r: (list(models).index(r.name), r.batch_size)):
        i = info[r.name]
        rows.append(
            BenchRow(
                model=i["model"],
                method=i["method"],
                ratio=i["ratio"],
                sparsity=i["sparsity"],
                kind=i["kind"],
                device=r.device,
                torch=torch.__version__,
                threads=r.threads,
                input_size=cfg.input_size,
                batch_size=r.batch_size,
                params=i["params"],
                params_nonzero=i["params_nonzero"],
                macs=i["macs"],
                latency_ms_median=r.median_ms,
                latency_ms_p90=r.p90_ms,
                images_per_s=r.images_per_s,
                peak_mem_mb=r.peak_mem_mb,
                file_bytes=i["file_bytes"],
                file_gzip_bytes=i["file_gzip_bytes"],
                mAP=maps[r.name][0],
                mAP50=maps[r.name][1],
                params_ratio=_ratio(i["params"], info[ref_key]["params"]),
                macs_ratio=_ratio(i["macs"], info[ref_key]["macs"]),
                latency_ratio=_ratio(r.median_ms, ref_lat.get(r.batch_size)),
                checkpoint=r.name,
                notes=list(i["notes"]),
            )
        )
    return rows


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
        w = csv.writer(f)
        w.writerow(BENCH_COLUMNS)
        for row in rows:
            d = row.to_dict() if isinstance(row, BenchRow) else row
            w.writerow([_csv_value(d.get(c)) for c in BENCH_COLUMNS])
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Read a bench CSV back as dicts of strings (header checked against :data:`BENCH_COLUMNS`)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != BENCH_COLUMNS:
            raise MeasureError(f"{path} is not a surgery bench CSV (unexpected header)")
        return list(reader)
