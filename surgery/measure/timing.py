"""Latency: warm-up, then runs interleaved across models."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MeasureError
from .workload import example_images, fixed_workload, quiet


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (``None``: as set), restored after."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


# Consecutive timed runs of one model (after one untimed run) before the next model takes over;
# the models rotate round by round, so drift on a shared machine still hits all of them alike.
# Run by run alternation measured each call cold (the other model's weights in the caches, its
# thread pool asleep): the quickstart's 25%-MACs FCOS ran at 0.43 of the dense time that way and
# at 0.35 in blocks, as it runs when it serves a stream of images (docs/benchmarks/deployment-speed.md).
RUN_BLOCK = 5
SPIN_BLOCK = 10  # ONNX Runtime spinning: the idle threads of the model timed before keep the cores a while


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    runs: int = 20,
    sync: Callable[[], None] | None = None,
    progress: Callable[[], None] | None = None,
    block: int = 1,
) -> dict[str, list[float]]:
    """Milliseconds of each of ``runs`` calls of every function, after ``warmup`` untimed rounds.

    Rounds are round-robin with a rotating start, so drift on a shared machine (another process,
    thermal throttling) is spread over all functions alike. ``sync`` runs before and after each
    timed call (CUDA); ``progress()`` after each round. ``block`` > 1: each function runs that many
    timed calls in a row (after one untimed call) before the next takes over, for runtimes whose
    idle threads keep spinning after a call (ONNX Runtime with spinning on) and would otherwise
    take the cores from the function timed next.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            fns[n]()
        if sync:
            sync()
        if progress:
            progress()
    block = max(1, int(block))
    for r in range(math.ceil(runs / block)):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if block > 1:
                fns[n]()
            for _ in range(min(block, runs - r * block)):
                if sync:
                    sync()
                t0 = time.perf_counter()
                fns[n]()
                if sync:
                    sync()
                times[n].append((time.perf_counter() - t0) * 1e3)
        if progress:
            progress()
    return times


def cuda_graphed(fn: Callable[[], Any], repeats: int = 1) -> tuple[Callable[[], Any], bool]:
    """``fn`` (``repeats`` calls of it) captured in one CUDA graph: a callable replaying it, and
    ``True``; or ``fn`` repeated eagerly and ``False`` where capture fails (an op that syncs with
    the host, a CPU tensor). ``fn``'s inputs must stay where they are: a graph replays on the
    tensors it was captured with. Warm-up runs on a side stream first, as capture requires."""
    def eager() -> Any:
        out = None
        for _ in range(repeats):
            out = fn()
        return out

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                eager()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
    except Exception:  # noqa: BLE001 - capture is an optimisation: eager still times the same work
        torch.cuda.synchronize()
        return eager, False
    return graph.replay, True


def time_cuda_events(
    fns: dict[str, Callable[[], Any]], *, warmup: int = 3, runs: int = 20, repeats: int = 10, graphs: bool = True,
) -> dict[str, list[float]]:
    """Milliseconds per call of every function on the current CUDA device, interleaved as
    :func:`time_interleaved` does: each run times ``repeats`` calls between two CUDA events (a
    kernel of a few microseconds is below what a host clock around one synchronised call can
    see) and divides. With ``graphs`` each function's ``repeats`` calls are captured in one CUDA
    graph (:func:`cuda_graphed`; launch overhead gone, as a deployed GPU model runs) where it can
    be. The device is synchronised once per round, not per call."""
    names = list(fns)
    calls = {}
    for n in names:
        if graphs:
            calls[n], _ = cuda_graphed(fns[n], repeats)
        else:
            calls[n] = lambda f=fns[n]: [f() for _ in range(repeats)]
    for _ in range(warmup):
        for n in names:
            calls[n]()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        k = r % len(names)
        events = []
        for n in names[k:] + names[:k]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[n]()
            end.record()
            events.append((n, start, end))
        torch.cuda.synchronize()
        for n, start, end in events:
            times[n].append(start.elapsed_time(end) / repeats)
    return times


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """The median of run-by-run ratios of two functions timed by :func:`time_interleaved` (run
    ``i`` of each ran back to back). On a shared machine this is steadier than the ratio of the
    two medians: a burst of other work slows both members of a pair alike and cancels out."""
    ratios = [t / r for t, r in zip(times, reference) if r > 0]
    return statistics.median(ratios) if ratios else float("nan")


def summarize(times: Sequence[float]) -> tuple[float, float]:
    """(median, p90) of a list of milliseconds."""
    return statistics.median(times), _quantile(times, 0.9)


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
    modes = {n: m.training for n, m in models.items()}
    results: list[LatencyResult] = []
    total_steps = len(batch_sizes) * (warmup + runs)
    step = [0]

    def tick() -> None:
        step[0] += 1
        if progress:
            progress(step[0], total_steps)

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch_threads(threads))
            stack.enter_context(quiet())
            for m in models.values():
                m.to(dev).eval()
                if rois is not None or detections is not None:
                    stack.enter_context(fixed_workload(m, rois, detections))
            for bs in batch_sizes:
                batch = example_images(bs, input_size, dev, seed=bs)
                with torch.inference_mode():
                    calls = {n: (lambda m=m, b=batch: m(b)) for n, m in models.items()}
                    times = time_interleaved(calls, warmup=warmup, runs=runs, sync=sync, progress=tick)
                    peaks = {n: _peak_mem_mb(models[n], calls[n], dev) for n in models}
                results += [_latency(n, t, dev, input_size, bs, warmup, runs, peaks[n]) for n, t in times.items()]
    finally:
        for n, m in models.items():
            m.train(modes[n])
    return results


def _peak_mem_mb(model: nn.Module, call: Callable[[], Any], dev: torch.device) -> float | None:
    """CUDA: the model's weights plus what one more (untimed) call allocates at its peak; CPU: ``None``."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    call()
    torch.cuda.synchronize(dev)
    own = sum(x.numel() * x.element_size() for x in model.state_dict().values())
    return (torch.cuda.max_memory_allocated(dev) - before + own) / 2**20


def _latency(
    name: str, t: list[float], dev: torch.device, input_size: int, bs: int, warmup: int, runs: int, peak: float | None
) -> LatencyResult:
    med = statistics.median(t)
    return LatencyResult(
        name=name,
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
