"""Latency that explains itself: the *network* (backbone + neck + heads: the convolutions pruning
thins) timed apart from the *pipeline* (the model's transform, anchors, box decoding, NMS, RoI
selection and pooling, mask pasting: what pruning leaves alone), on the same inputs.

PyTorch (:func:`record_calls`, :func:`replay_network`, :func:`network_stubbed`): one forward
records each network module's call (inputs and outputs). The *network* time is those calls
replayed on their recorded inputs; the *pipeline* time is the whole model run with every network
module answering instantly with its recorded output. Both are real, separate measurements, so
``network + pipeline`` matching the end-to-end time is a check, not an identity.

ONNX Runtime (:func:`onnx_split_ms`): the exported graph runs with ONNX Runtime's profiler on,
and each node's kernel time is attributed to the network when its scope (the TorchScript exporter
names nodes ``/backbone/body/layer1/.../Conv``; quantization keeps those names in its Q/DQ nodes)
starts with a network module's path, to the pipeline otherwise. OpenVINO (``runtime="openvino"``):
the same from its per-node performance counters (node names keep the exporter's scopes; the layout
reorders it inserts are named after the node they feed from).

Which modules are "the network": :data:`NETWORK_MODULES` for torchvision's families; a model can
name its own with a ``network_modules`` attribute (a list of dotted submodule names).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deployment.onnx_io import OvSession, import_onnxruntime, ort_options
from ..errors import MeasureError

NETWORK_MODULES: tuple[str, ...] = (
    "backbone",  # body + FPN / extra layers
    "head",  # FCOS, RetinaNet, SSD heads
    "rpn.head",
    "roi_heads.box_head",
    "roi_heads.box_predictor",
    "roi_heads.mask_head",
    "roi_heads.mask_predictor",
    "roi_heads.keypoint_head",
    "roi_heads.keypoint_predictor",
)


def network_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's network submodules by dotted name (outermost only, in model order)."""
    wanted = getattr(model, "network_modules", None) or NETWORK_MODULES
    named = dict(model.named_modules())
    found = {n: named[n] for n in wanted if n in named}
    if not found:
        raise MeasureError(
            f"{type(model).__name__} has none of the network modules {list(wanted)}: give it a "
            "`network_modules` attribute listing its backbone/neck/head submodules"
        )
    return found


@dataclass
class Call:
    """One recorded call of a network module."""

    name: str
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


def record_calls(model: nn.Module, images: Sequence[torch.Tensor]) -> list[Call]:
    """Run ``model(images)`` once (no grad) and record every network-module call, in order."""
    calls: list[Call] = []
    handles = []
    for name, mod in network_modules(model).items():

        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any, name: str = name) -> None:
            calls.append(Call(name, m, args, kwargs, out))

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            model(list(images))
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise MeasureError(f"{type(model).__name__}: no network module ran during a forward")
    return calls


def replay_network(calls: Sequence[Call]) -> None:
    """Run every recorded network call again on its recorded inputs (the network time)."""
    for c in calls:
        c.module(*c.args, **c.kwargs)


@contextlib.contextmanager
def network_stubbed(calls: Sequence[Call]) -> Iterator[None]:
    """Network modules return their recorded outputs instantly (in call order, cycling), so a
    forward of the model costs only its pipeline. The real forwards are restored afterwards."""
    by_module: dict[nn.Module, list[Any]] = {}
    for c in calls:
        by_module.setdefault(c.module, []).append(c.output)
    counters = {m: 0 for m in by_module}

    def stub(mod: nn.Module) -> Any:
        outs = by_module[mod]

        def forward(*args: Any, **kwargs: Any) -> Any:
            i = counters[mod]
            counters[mod] = i + 1
            return outs[i % len(outs)]

        return forward

    try:
        for mod in by_module:
            mod.forward = stub(mod)  # instance attribute: nn.Module.__call__ finds it first
        yield
    finally:
        for mod in by_module:
            mod.__dict__.pop("forward", None)


def onnx_scopes(model_or_names: nn.Module | Sequence[str]) -> tuple[str, ...]:
    """ONNX node-name prefixes of the network modules (``rpn.head`` -> ``/rpn/head/``, and
    ``/model/rpn/head/`` for :func:`surgery.deployment.export.export_onnx`'s output-ordering wrapper)."""
    names = list(network_modules(model_or_names)) if isinstance(model_or_names, nn.Module) else list(model_or_names)
    return tuple(f"{root}/{n.replace('.', '/')}/" for n in names for root in ("", "/model"))


@dataclass
class OnnxSplit:
    network_ms: float  # per run: kernel time of nodes in a network scope
    pipeline_ms: float  # per run: kernel time of every other node
    network_nodes: int
    pipeline_nodes: int

    @property
    def network_share(self) -> float | None:
        """The network's share of the kernel time (``None``: no network node found). The profiler's
        per-node timing adds its own overhead, so a network time is the *measured* end-to-end time
        times this share (``surgery bench`` and the latency allocator's verification both do this)."""
        kernel = self.network_ms + self.pipeline_ms
        return self.network_ms / kernel if kernel > 0 and self.network_nodes else None


def onnx_split_ms(
    path: str | Path,
    feeds: Sequence[dict[str, Any]],
    scopes: Sequence[str] = (),
    *,
    threads: int | None = None,
    warmup: int = 2,
    runs: int = 10,
    spinning: bool = False,
    runtime: str = "onnxruntime",
    precision: str = "f32",
) -> OnnxSplit:
    """Profile ``runs`` passes over ``feeds`` (one ``session.run`` per feed) and split the kernel
    time into network (node names under ``scopes``, default :data:`NETWORK_MODULES`') and pipeline.
    Per pass over all feeds, in ms. ``runtime``: onnxruntime or openvino (at ``precision``)."""
    scopes = tuple(scopes) or onnx_scopes(NETWORK_MODULES)
    if runtime == "openvino":
        return _openvino_split_ms(path, feeds, scopes, threads=threads, warmup=warmup, runs=runs, precision=precision)
    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="surgery-profile-") as tmp:
        opts = ort_options(threads, spinning=spinning)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            for f in feeds:
                sess.run(None, f)
        for _ in range(runs):
            for f in feeds:
                sess.run(None, f)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # the warm-up passes are the first model_run events: count from the first timed one
    run_starts = sorted(float(e["ts"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    skip = warmup * len(feeds)
    first = run_starts[skip] if len(run_starts) > skip else 0.0
    net = pipe = 0.0
    net_nodes: set[str] = set()
    pipe_nodes: set[str] = set()
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if float(e.get("ts", 0)) < first:
            continue  # warm-up passes
        node = e["name"][: -len("_kernel_time")]
        if node.startswith(scopes):
            net += float(e["dur"])
            net_nodes.add(node)
        else:
            pipe += float(e["dur"])
            pipe_nodes.add(node)
    runs = max(runs, 1)
    return OnnxSplit(net / runs / 1e3, pipe / runs / 1e3, len(net_nodes), len(pipe_nodes))


def _openvino_split_ms(
    path: str | Path, feeds: Sequence[dict[str, Any]], scopes: tuple[str, ...], *, threads: int | None, warmup: int,
    runs: int, precision: str,
) -> OnnxSplit:
    """:func:`onnx_split_ms` from OpenVINO's performance counters (read after every call: they
    describe the last inference only). Nodes OpenVINO made itself carry a generated name without
    the exporter's scope (GroupNorm's ``InstanceNormalization`` becomes ``MVN_907``): they count
    where the node executed before them counts, which is where they sit in the graph."""
    sess = OvSession(path, threads, precision, profiling=True)
    for _ in range(warmup):
        for f in feeds:
            sess.run(None, f)
    net = pipe = 0.0
    net_nodes: set[str] = set()
    pipe_nodes: set[str] = set()
    for _ in range(runs):
        for f in feeds:
            sess.run(None, f)
            in_network = False
            for node, ms in sess.profile():
                if "/" in node:
                    in_network = node.startswith(scopes)
                if in_network:
                    net += ms
                    net_nodes.add(node)
                else:
                    pipe += ms
                    pipe_nodes.add(node)
    runs = max(runs, 1)
    return OnnxSplit(net / runs, pipe / runs, len(net_nodes), len(pipe_nodes))


def onnx_network_shares(
    files: Sequence[tuple[str | Path, Sequence[str], Sequence[dict[str, Any]]]],
    *,
    threads: int | None = None,
    rounds: int = 3,
    runs: int = 5,
    spinning: bool = False,
    runtime: str = "onnxruntime",
    precision: str = "f32",
) -> list[float | None]:
    """Each ``(file, scopes, feeds)``'s network share of its profiled kernel time
    (:attr:`OnnxSplit.network_share`), the median over ``rounds`` passes that alternate the files: one profiled pass per file is
    at the mercy of whatever else the machine runs meanwhile, and comparing two models' network
    times compares their shares."""
    shares: list[list[float]] = [[] for _ in files]
    for _ in range(max(1, rounds)):
        for k, (path, scopes, feeds) in enumerate(files):
            share = onnx_split_ms(path, feeds, scopes, threads=threads, warmup=1, runs=runs, spinning=spinning,
                                  runtime=runtime, precision=precision).network_share
            if share is not None:
                shares[k].append(share)
    return [statistics.median(s) if s else None for s in shares]


# --------------------------------------------------------------------------------------------
# the network the way GPUs run it: CUDA graphs or torch.compile


COMPILE_MODES = ("none", "cuda-graphs", "reduce-overhead", "default")


@contextlib.contextmanager
def accelerated_network(calls: Sequence[Call], mode: str) -> Iterator[None]:
    """The network modules of ``calls`` (:func:`record_calls`) run as ``mode`` says until exit:

    - ``cuda-graphs``: each module's recorded call is captured once in a CUDA graph
      (``torch.cuda.graph``) on static copies of its inputs; a call copies its inputs in and replays
      the graph (launch overhead gone: what a deployed GPU model does at batch 1). Only calls with
      the recorded shapes can replay: another shape raises :class:`~surgery.errors.MeasureError`.
    - ``reduce-overhead`` / ``default``: ``torch.compile`` of each module with that mode
      (``reduce-overhead`` uses CUDA graphs inside).
    - ``none``: eager, unchanged.

    The post-processing stays eager (data-dependent shapes); a graph-captured network feeds it
    the same tensors."""
    if mode not in COMPILE_MODES:
        raise MeasureError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    modules = list(dict.fromkeys(c.module for c in calls))
    try:
        if mode in ("reduce-overhead", "default"):
            for mod in modules:
                mod.forward = torch.compile(mod.forward, mode=mode, dynamic=False)
        elif mode == "cuda-graphs":
            for mod in modules:
                mod.forward = _graphed(mod, [c for c in calls if c.module is mod])
        yield
    finally:
        for mod in modules:
            mod.__dict__.pop("forward", None)


def _graphed(mod: nn.Module, calls: Sequence[Call]) -> Any:
    """``mod``'s forward replaying a CUDA graph captured on its first recorded call."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    first = calls[0]
    flat, spec = tree_flatten((first.args, first.kwargs))
    if not all(t.is_cuda for t in flat if isinstance(t, torch.Tensor)):
        raise MeasureError("cuda-graphs: the network's inputs are not on a CUDA device (bench --device cuda)")
    static = [t.clone() if isinstance(t, torch.Tensor) else t for t in flat]
    args, kwargs = tree_unflatten(static, spec)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):  # warm-up on a side stream, as torch.cuda.graph's docs ask
            type(mod).forward(mod, *args, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = type(mod).forward(mod, *args, **kwargs)

    def forward(*a: Any, **k: Any) -> Any:
        got, got_spec = tree_flatten((a, k))
        if got_spec != spec or any(isinstance(g, torch.Tensor) and g.shape != s.shape for g, s in zip(got, static)):
            raise MeasureError(f"cuda-graphs: {type(mod).__name__} called with other shapes than it was captured with")
        for g, s in zip(got, static):
            if isinstance(s, torch.Tensor) and g is not s:
                s.copy_(g)
        graph.replay()
        return out

    return forward
