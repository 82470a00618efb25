"""Prune to a latency budget: a measured latency table, channels allocated by importance per
millisecond saved, the result timed and reported.

1. **Table** (:func:`measure_table`): every convolution of the network runs alone, on an input of
   the shape it sees in the model (its input size and batch, recorded by forward hooks; a head
   shared by the FPN levels once per level, its time the sum of its calls), at the
   width fractions :data:`FRACTIONS` of its input and output channels (a 4 x 4 grid; depthwise
   layers along the diagonal). ``onnxruntime``: one ONNX file per grid cell holding every layer
   as an independent branch, the cells' sessions run round-robin under ONNX Runtime's profiler
   and each layer's kernel time is the median over the runs; ``torch``: each layer timed by
   :func:`surgery.measure.timing.time_interleaved`, all layers and cells interleaved, medians.
   Interleaving and medians keep a busy machine's noise out of the ratios between cells.
   The table is cached as JSON under the surgery cache (``$SURGERY_CACHE/latency``), keyed by the
   layer shapes, runtime, threads, input size, batch and the runtime's version: it describes this
   machine only and is measured again on another one (or with ``refresh``).
2. **Estimate**: the network's latency with given group widths is the sum of its layers'
   latencies, bilinear in the (input, output) fractions between grid points.
3. **Allocation** (:func:`allocate`): starting from the dense widths, repeatedly remove the step
   of channels (``round_to``, GroupNorm/chunk multiples) whose importance lost per millisecond
   saved is lowest (the importance of a group's channels normalised by its mean, as global
   ranking does), until the estimate reaches the goal.
4. **Verification** (:func:`latency_ratios`): a copy is cut and its network timed against the
   dense one, interleaved, as ``surgery bench`` measures it (ONNX Runtime: the exported files'
   end-to-end time times the profiled network share of their kernel time; torch: the recorded
   network calls replayed). The goal
   is corrected (first by the observed factor, then by the secant through the last two
   (estimate, measured) points) and the allocation repeated (at most ``max_rounds``).

``torch`` on a CUDA device (``device="cuda"``, ``prune.latency_device``): the table's cells and the
verified networks run in CUDA graphs and are timed with CUDA events, as a deployed GPU model runs
at batch 1 (launch overhead gone); ONNX files are timed on the CPU only.

The result is a ratio per coupled group (by group index), which :func:`allocate_for_latency`
turns into the channel plan (:func:`surgery.pruning.allocate.channel_plan`).

The table and the timing need the ONNX export and ONNX Runtime session helpers; they are imported
in the functions that measure, so importing the pipeline (:mod:`surgery.pruning.prune`) does not load them.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import PruningError
from ..measure import fixed_workload
from ..measure.timing import RUN_BLOCK, time_cuda_events, time_interleaved, torch_threads
from ..measure.workload import example_images, quiet
from .allocate import Allocation, channel_plan, keep_count
from .budget import KeepLatency, Rounding
from .candidate import Candidates

if TYPE_CHECKING:
    from .latency_table import LatencyTable


@dataclass
class GroupSpec:
    """What the allocator knows of a coupled group: its width, the step its width moves by, the
    fewest channels it may keep, its channels' importance (any scale) and the layers whose input
    (``consumers``) or output (``producers``) channels it sets."""

    index: int
    channels: int
    step: int
    min_keep: int
    importance: Sequence[float]
    producers: Sequence[str]
    consumers: Sequence[str]


class LatencyModel:
    """The network's estimated latency for a choice of group widths (``keep``: channels kept per
    group index); layers in no group keep their width."""

    def __init__(self, table: LatencyTable, groups: Sequence[GroupSpec]) -> None:
        self.table = table
        self.groups = {g.index: g for g in groups}
        self.out_group: dict[str, int] = {}
        self.in_group: dict[str, int] = {}
        for g in groups:
            for name in g.producers:
                if name in table.ms:
                    self.out_group[name] = g.index
            for name in g.consumers:
                if name in table.ms:
                    self.in_group[name] = g.index
        self.touching: dict[int, list[str]] = {g.index: sorted({n for n in (*g.producers, *g.consumers) if n in table.ms})
                                               for g in groups}

    def _frac(self, group: int | None, keep: dict[int, int]) -> float:
        if group is None:
            return 1.0
        return keep.get(group, self.groups[group].channels) / self.groups[group].channels

    def layer_ms(self, name: str, keep: dict[int, int]) -> float:
        return self.table.layer_ms(name, self._frac(self.in_group.get(name), keep),
                                   self._frac(self.out_group.get(name), keep))

    def total(self, keep: dict[int, int]) -> float:
        return sum(self.layer_ms(n, keep) for n in self.table.ms)

    def group_part(self, index: int, keep: dict[int, int]) -> float:
        return sum(self.layer_ms(n, keep) for n in self.touching[index])


def allocate(model: LatencyModel, goal_ms: float) -> dict[int, int]:
    """Channels to keep per group so the estimate reaches ``goal_ms``: greedily remove the step
    with the least importance lost per millisecond saved (importance normalised by each group's
    mean and multiplied by the number of timed layers the group spans). Stops at ``goal_ms`` or when no group can shrink further (then the estimate is above
    the goal)."""
    keep = {i: g.channels for i, g in model.groups.items()}
    order = {}
    for i, g in model.groups.items():
        imp = torch.as_tensor(list(g.importance), dtype=torch.float64)
        # normalised by the group's mean, times the layers the group spans: a channel of a residual
        # stream lives in every block it crosses, so it weighs as much as those layers' channels
        imp = imp / imp.mean().clamp_min(1e-12) * max(1, len(model.touching[i]))
        order[i] = torch.sort(imp).values.tolist()  # weakest first

    def next_width(i: int) -> int:
        g = model.groups[i]
        return (keep[i] - 1) // g.step * g.step  # widths below the dense one stay multiples of the step

    def candidate(i: int) -> tuple[float, int] | None:
        g = model.groups[i]
        new = next_width(i)
        if new < max(g.min_keep, 1):
            return None
        before = model.group_part(i, keep)
        after = model.group_part(i, {**keep, i: new})
        saved = before - after
        cut = g.channels - keep[i]
        lost = sum(order[i][cut : g.channels - new])
        if saved <= 0:
            return None
        return lost / saved, new

    total = model.total(keep)
    heap: list[tuple[float, int, int]] = []
    for i in model.groups:
        c = candidate(i)
        if c is not None:
            heapq.heappush(heap, (c[0], i, c[1]))
    while total > goal_ms and heap:
        _, i, new = heapq.heappop(heap)
        if next_width(i) != new:
            continue  # stale entry
        changed = {i}
        before = sum(model.layer_ms(n, keep) for n in model.touching[i])
        keep[i] = new
        total += sum(model.layer_ms(n, keep) for n in model.touching[i]) - before
        # neighbours sharing a layer see a different marginal saving now
        shared = set(model.touching[i])
        changed |= {j for j, names in model.touching.items() if shared.intersection(names)}
        for j in changed:
            c = candidate(j)
            if c is not None:
                heapq.heappush(heap, (c[0], j, c[1]))
    return keep


# --------------------------------------------------------------------------------------------
# timing a network, dense against cut


def network_ms(models: Sequence[nn.Module], runtime: str, input_size: int, *, batch: int = 1, threads: int = 2,
               runs: int = 15, rounds: int = 5, device: str = "cpu") -> list[list[float]]:
    """Per model, its network milliseconds in each of ``rounds`` interleaved passes over the
    models (each ``runs`` runs, median per pass; ONNX Runtime: end to end times the profiled
    network share, as ``surgery bench`` splits it; torch: recorded network calls replayed). Ratios between models
    are best taken per pass, then their median: a load change between passes cancels out.
    ``device`` ``cuda`` (torch): copies of the models on the GPU, each network's recorded calls
    captured in CUDA graphs (``bench --device cuda --compile cuda-graphs`` times it so) and timed
    with CUDA events (:func:`~surgery.measure.timing.time_cuda_events`)."""

    # function-level: measure.split, the export and the runtime bring the ONNX (Runtime) helpers,
    # which only a latency budget needs (importing the pipeline must not load them)
    from ..deployment.export import export_onnx
    from ..deployment.runtime import OnnxDetector, fit_image
    from ..measure.split import onnx_network_shares, onnx_scopes, record_calls, replay_network

    images = example_images(batch, input_size, "cpu", seed=batch)
    samples: list[list[float]] = [[] for _ in models]
    if runtime == "torch" and torch.device(device).type == "cuda":
        return _network_ms_cuda(models, input_size, batch=batch, runs=runs, rounds=rounds, device=device)
    if runtime == "torch":
        with torch_threads(threads), quiet(), torch.inference_mode():
            calls = []
            for m in models:
                with fixed_workload(m, 100, 100):
                    calls.append(record_calls(m.eval(), images))
            fns = {str(k): (lambda c=c: replay_network(c)) for k, c in enumerate(calls)}
            for _ in range(rounds):
                times = time_interleaved(fns, warmup=1, runs=runs, block=RUN_BLOCK)  # as bench times
                for k in range(len(models)):
                    samples[k].append(statistics.median(times[str(k)]))
        return samples

    with tempfile.TemporaryDirectory(prefix="surgery-latency-") as tmp:
        files = []
        for k, m in enumerate(models):
            path = Path(tmp) / f"m{k}.onnx"
            with fixed_workload(m, 100, 100):
                export_onnx(m, path, input_size, verify=False)
            files.append((path, onnx_scopes(m)))
        # measured as `surgery bench --runtime onnxruntime|openvino` measures it (the number a user checks
        # the target against): the end-to-end time of the exported detector, interleaved, times
        # the network's share of the profiled kernel time. The profiled kernel sum alone leaves
        # out the runtime's per-operator overhead and disagreed with bench by 5-13% on this machine
        detectors = [OnnxDetector(path, threads, runtime=runtime) for path, _ in files]  # f32
        feeds = [{"image": fit_image(img, input_size).numpy()} for img in images]
        shares = onnx_network_shares([(p, sc, feeds) for p, sc in files], threads=threads, runs=min(runs, 10),
                                     runtime=runtime)
        if any(share is None for share in shares):
            raise PruningError("no network node found in the exported model's profile: cannot time its network")
        fns = {str(k): (lambda d=d: d(images)) for k, d in enumerate(detectors)}
        for _ in range(rounds):
            times = time_interleaved(fns, warmup=1, runs=runs, block=RUN_BLOCK)  # as bench times
            for k, share in enumerate(shares):
                samples[k].append(statistics.median(times[str(k)]) * share)
    return samples


def _network_ms_cuda(models: Sequence[nn.Module], input_size: int, *, batch: int, runs: int, rounds: int,
                     device: str) -> list[list[float]]:
    """:func:`network_ms` for torch on a CUDA device (see there)."""
    # function-level: measure.split brings the ONNX (Runtime) helpers (see network_ms)
    from ..measure.split import accelerated_network, record_calls, replay_network

    dev = torch.device(device)
    images = example_images(batch, input_size, dev, seed=batch)
    samples: list[list[float]] = [[] for _ in models]
    copies = [copy.deepcopy(m).to(dev).eval() for m in models]  # the caller's models stay where they are
    with contextlib.ExitStack() as stack, quiet(), torch.inference_mode():
        calls = []
        for m in copies:
            with fixed_workload(m, 100, 100):
                calls.append(record_calls(m, images))
            stack.enter_context(accelerated_network(calls[-1], "cuda-graphs"))
        fns = {str(k): (lambda c=c: replay_network(c)) for k, c in enumerate(calls)}
        for _ in range(rounds):
            times = time_cuda_events(fns, warmup=1, runs=runs, repeats=5, graphs=False)  # graphs are inside
            for k in range(len(models)):
                samples[k].append(statistics.median(times[str(k)]))
    return samples


# --------------------------------------------------------------------------------------------
# the entry point prune uses


@dataclass
class LatencyTargetResult:
    """Per-group ratios for a latency budget and what they measured (not
    :class:`surgery.measure.LatencyResult`, one model's timing)."""

    ratios: dict[int, float]  # group index -> fraction of its channels cut
    target: float  # fraction of the dense network latency to keep
    runtime: str
    dense_ms: float
    measured_ms: float | None
    estimated_ms: float
    table_key: str
    rounds: int
    within_tolerance: bool
    tol: float
    notes: list[str] = field(default_factory=list)
    measured_ratio: float | None = None  # median over interleaved passes of cut / dense

    @property
    def measured(self) -> float | None:
        return self.measured_ratio


def group_specs(graph: Any, scores: dict[int, torch.Tensor], rounding: Rounding) -> list[GroupSpec]:
    """The allocator's view of a traced graph's prunable groups (overridden and skipped groups
    keep their own ratio / width)."""
    out = []
    for g in graph.groups:
        if not g.prunable or g.index not in scores:
            continue
        step = math.lcm(rounding.step, max(1, g.multiple_of))
        floor = keep_count(g.channels, 0.999, round_to=rounding.step, min_channels=rounding.min_channels,
                           multiple_of=g.multiple_of)
        out.append(GroupSpec(g.index, g.channels, step, floor, scores[g.index].tolist(), g.producers, g.consumers))
    return out


def _keep_to_ratios(keep: dict[int, int], specs: Sequence[GroupSpec]) -> dict[int, float]:
    by = {s.index: s for s in specs}
    # a ratio whose keep_count gives back exactly this width: ceil(C * (1 - r)) = keep
    return {i: max(0.0, 1.0 - (k - 0.5) / by[i].channels) if k < by[i].channels else 0.0 for i, k in keep.items()}


def measure_table(model: nn.Module, runtime: str, input_size: int, **kw: Any) -> LatencyTable:
    """:func:`surgery.pruning.latency_table.measure_table` (cached per machine and shapes)."""
    # function-level: the table module imports the ONNX Runtime helpers (see the module docstring)
    from .latency_table import measure_table as measured

    return measured(model, runtime, input_size, **kw)


def latency_ratios(
    model: nn.Module, graph: Any, scores: dict[int, torch.Tensor], rounding: Rounding, *, target: float, runtime: str,
    input_size: int, batch: int = 1, threads: int = 2, tol: float = 0.05, max_rounds: int = 4,
    cut: Callable[[nn.Module, dict[int, float]], nn.Module] | None = None, model_name: str = "", device: str = "cpu",
) -> LatencyTargetResult:
    """Per-group cut ratios that keep ``target`` of the dense network latency on ``runtime``,
    verified by timing (see the module docstring). ``cut(model, ratios)`` returns a cut copy
    (:func:`surgery.pruning.prune.prune_model` passes one); without it nothing is verified."""
    if not 0.0 < target < 1.0:
        raise PruningError(f"target_latency must be a fraction strictly between 0 and 1, got {target}")
    table = measure_table(model, runtime, input_size, batch=batch, threads=threads, model_name=model_name, device=device)
    specs = group_specs(graph, scores, rounding)
    if not specs:
        raise PruningError("no prunable group to reach a latency target with")
    lm = LatencyModel(table, specs)
    dense_est = lm.total({})
    from .latency_table import FRACTIONS  # function-level: see measure_table

    where = f"{runtime} on {device}" if device != "cpu" else f"{runtime} ({threads} threads"
    notes = [f"latency table: {len(table.ms)} convolutions x {len(FRACTIONS) ** 2} widths on {where}"
             f"{', ' if device == 'cpu' else ' ('}{input_size}px, batch {batch}; cache key {table.key})", *table.notes]
    goal = target
    best: tuple[float, dict[int, float], float, float, float] | None = None
    dense_ms = float("nan")
    history: list[tuple[float, float]] = []  # (estimated, measured) fraction per round
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        keep = allocate(lm, goal * dense_est)
        ratios = _keep_to_ratios(keep, specs)
        est = lm.total(keep) / dense_est
        if cut is None:
            return LatencyTargetResult(ratios, target, runtime, dense_est, None, est * dense_est, table.key, rounds,
                                 abs(est - target) <= tol * target, tol, notes + ["not verified by timing"])
        cut_model = cut(model, ratios)
        dense_s, cut_s = network_ms([model, cut_model], runtime, input_size, batch=batch, threads=threads, device=device)
        dense_ms, cut_ms = statistics.median(dense_s), statistics.median(cut_s)
        achieved = statistics.median(c / d for c, d in zip(cut_s, dense_s))  # per interleaved pass
        notes.append(f"round {rounds}: estimate {est:.3f}, measured {achieved:.3f} of the dense network "
                     f"({cut_ms:.2f} / {dense_ms:.2f} ms)")
        if best is None or abs(achieved - target) < abs(best[0] - target):
            best = (achieved, ratios, est, cut_ms, dense_ms)
        if abs(achieved - target) <= tol * target:
            break
        history.append((est, achieved))
        new_goal = goal * target / achieved  # the table's bias, corrected as a factor
        if len(history) >= 2 and abs(history[-1][0] - history[-2][0]) > 1e-6:
            # secant on measured(estimate): the runtime's fixed per-op costs do not shrink with
            # the widths, so the bias is an offset as much as a factor; only a plausible slope
            # is trusted (timings on a busy machine can make two rounds' points meaningless)
            (e0, m0), (e1, m1) = history[-2], history[-1]
            slope = (m1 - m0) / (e1 - e0)
            if 0.3 <= slope <= 3.0:
                new_goal = e1 + (target - m1) / slope
        goal = min(0.999, max(0.01, goal * 0.6, min(goal * 1.5, new_goal)))  # at most this far per round
    assert best is not None
    achieved, ratios, est, cut_ms, dense_ms = best
    ok = abs(achieved - target) <= tol * target
    if not ok:
        notes.append(f"no allocation within {tol:.0%} of the target after {rounds} timed rounds "
                     "(round_to / min_channels steps, or a busy machine): the closest is returned")
    return LatencyTargetResult(ratios, target, runtime, dense_ms, cut_ms, est * dense_est, table.key, rounds, ok, tol, notes,
                         measured_ratio=achieved)


def allocate_for_latency(candidates: Candidates, scores: dict[int, torch.Tensor], budget: KeepLatency,
                         rounding: Rounding) -> Allocation:
    """The :class:`~surgery.pruning.budget.KeepLatency` allocator: per-group widths from the measured
    latency table that keep ``budget.fraction`` of the dense network latency on ``budget.runtime``
    (:func:`latency_ratios`, verified by timing cut copies)."""
    graph = candidates.graph

    def plan(ratios: dict[int, float]) -> dict[int, list[int]]:
        return channel_plan(graph, scores, 0.0, rounding, overrides=budget.overrides, group_ratios=ratios)

    target = latency_ratios(
        graph.model, graph, scores, rounding, target=budget.fraction, runtime=budget.runtime,
        input_size=budget.input_size, cut=lambda model, ratios: candidates.cut(plan(ratios))[0], device=budget.device,
    )  # fmt: skip
    return Allocation(plan=plan(target.ratios), group_ratios=dict(target.ratios), target=target)
