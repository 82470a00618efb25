"""The latency table of :mod:`surgery.pruning.latency`: every convolution of a network timed alone at a
grid of input/output width fractions on one runtime, cached per machine (see that module's
docstring, step 1), and the bilinear estimate between grid points."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deployment.onnx_io import OvSession, import_onnxruntime, ort_options, runtime_version
from ..errors import PruningError
from ..measure import fixed_workload
from ..measure.split import network_modules
from ..measure.timing import time_cuda_events, time_interleaved, torch_threads
from ..measure.workload import example_images, quiet
from ..storage.atomic import atomic_open

FRACTIONS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
RUNTIMES = ("onnxruntime", "openvino", "torch")


# --------------------------------------------------------------------------------------------
# the table and the estimate


@dataclass
class LatencyTable:
    """Per layer, milliseconds at ``FRACTIONS[i]`` of its input and ``FRACTIONS[j]`` of its
    output channels (``ms[name][i][j]``)."""

    runtime: str
    threads: int
    input_size: int
    batch: int
    ms: dict[str, list[list[float]]]
    depthwise: set[str] = field(default_factory=set)
    key: str = ""
    notes: list[str] = field(default_factory=list)  # not cached: what happened while loading it

    def layer_ms(self, name: str, f_in: float, f_out: float) -> float:
        if name in self.depthwise:
            f_in = f_out = min(f_in, f_out)
        return _bilinear(self.ms[name], f_in, f_out)

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "threads": self.threads, "input_size": self.input_size, "batch": self.batch,
                "ms": self.ms, "depthwise": sorted(self.depthwise), "key": self.key, "fractions": list(FRACTIONS)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        return cls(d["runtime"], int(d["threads"]), int(d["input_size"]), int(d["batch"]),
                   {k: [list(map(float, r)) for r in v] for k, v in d["ms"].items()}, set(d.get("depthwise", [])),
                   d.get("key", ""))


def _interp_index(f: float) -> tuple[int, int, float]:
    """Grid neighbours of ``f`` in :data:`FRACTIONS` (descending) and the weight of the second;
    below the smallest fraction, linear towards zero latency at zero width."""
    fr = FRACTIONS
    if f >= fr[0]:
        return 0, 0, 0.0
    for a in range(len(fr) - 1):
        if fr[a] >= f >= fr[a + 1]:
            return a, a + 1, (fr[a] - f) / (fr[a] - fr[a + 1])
    return len(fr) - 1, len(fr) - 1, 0.0


def _bilinear(grid: list[list[float]], f_in: float, f_out: float) -> float:
    lo = FRACTIONS[-1]
    scale = 1.0
    if f_in < lo:
        scale *= f_in / lo
    if f_out < lo:
        scale *= f_out / lo
    a0, a1, wa = _interp_index(f_in)
    b0, b1, wb = _interp_index(f_out)
    v = ((1 - wa) * (1 - wb) * grid[a0][b0] + wa * (1 - wb) * grid[a1][b0]
         + (1 - wa) * wb * grid[a0][b1] + wa * wb * grid[a1][b1])
    return v * scale



# --------------------------------------------------------------------------------------------
# measuring the table


CALL = "@"  # `name@k`: the k-th further call of layer `name` (a head shared by the FPN levels)


def _conv_inputs(model: nn.Module, input_size: int, batch: int) -> dict[str, tuple[nn.Conv2d, tuple[int, ...]]]:
    """Every call of every Conv2d of the network modules with the input shape it sees, under the
    fixed workload: ``name`` for the first call, ``name@1``, ``name@2``, ... for the next ones (an
    FCOS / RetinaNet head runs each of its convolutions once per FPN level: the quickstart FCOS's
    35 convolutions make 63 calls, and a table of first calls left out four levels of the head,
    whose fixed cost per call does not shrink with the width). :func:`_per_layer` sums them back.
    The calls of one layer share one weight tensor in the banks, as in the model (separate copies
    read the weights from memory once per call: a 1x1 level's call costs its weights' traffic)."""

    nets = network_modules(model)
    seen: dict[str, tuple[nn.Conv2d, tuple[int, ...]]] = {}
    calls: dict[str, int] = {}
    handles = []
    for prefix, net in nets.items():
        for name, m in net.named_modules():
            if isinstance(m, nn.Conv2d):
                full = f"{prefix}.{name}" if name else prefix

                def hook(mod: nn.Module, args: tuple, _out: Any, full: str = full) -> None:
                    calls[full] = calls.get(full, -1) + 1
                    seen[full if calls[full] == 0 else f"{full}{CALL}{calls[full]}"] = (mod, tuple(args[0].shape))

                handles.append(m.register_forward_hook(hook))
    try:
        with quiet(), torch.no_grad(), fixed_workload(model, 100, 100):
            model.eval()(example_images(batch, input_size, "cpu"))
    finally:
        for h in handles:
            h.remove()
    return seen


def _layer(call: str) -> str:
    return call.split(CALL, 1)[0]


def _per_layer(ms: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
    """Each layer's grid: the sum of its calls' grids (see :func:`_conv_inputs`)."""
    out: dict[str, list[list[float]]] = {}
    for call, grid in ms.items():
        base = out.get(_layer(call))
        out[_layer(call)] = [row[:] for row in grid] if base is None else [
            [a + b for a, b in zip(r0, r1)] for r0, r1 in zip(base, grid)]
    return out


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def _scaled(conv: nn.Conv2d, f_in: float, f_out: float) -> nn.Conv2d:
    if _is_depthwise(conv):
        c = max(1, round(conv.in_channels * min(f_in, f_out)))
        cin, cout, groups = c, c * (conv.out_channels // conv.in_channels), c
    else:
        groups = conv.groups
        cin = max(groups, round(conv.in_channels * f_in / groups) * groups)
        cout = max(groups, round(conv.out_channels * f_out / groups) * groups)
    return nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups,
                     conv.bias is not None).eval()


class _Bank(nn.Module):
    """Independent convolutions, one per input: every layer of the network at one grid cell."""

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(c(x) for c, x in zip(self.convs, xs))


def _cells() -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(FRACTIONS)) for j in range(len(FRACTIONS))]


def _time_torch(layers: dict[str, tuple[nn.Conv2d, tuple[int, ...]]], threads: int, runs: int,
                device: str = "cpu") -> dict[str, list[list[float]]]:
    """Each layer at each grid cell, channels-last, on ``device``: the CPU with
    :func:`~surgery.measure.timing.time_interleaved`; CUDA with
    :func:`~surgery.measure.timing.time_cuda_events` (each cell captured in a CUDA graph of 10
    calls where capture works, CUDA events around the replays: the network is timed the same way,
    see :func:`surgery.pruning.latency.network_ms`)."""
    dev = torch.device(device)
    fns: dict[str, Callable[[], Any]] = {}
    scaled: dict[tuple[str, int, int], nn.Conv2d] = {}  # the calls of one layer share its weights
    for name, (conv, shape) in layers.items():
        for i, j in _cells():
            if _is_depthwise(conv) and i != j:
                continue
            key = (_layer(name), i, j)
            if key not in scaled:
                scaled[key] = _scaled(conv, FRACTIONS[i], FRACTIONS[j]).to(dev, memory_format=torch.channels_last)
            c = scaled[key]
            x = torch.rand(shape[0], c.in_channels, *shape[2:], device=dev).contiguous(memory_format=torch.channels_last)
            fns[f"{name}\0{i}\0{j}"] = lambda c=c, x=x: c(x)
    with torch_threads(threads), torch.inference_mode():
        if dev.type == "cuda":
            times = time_cuda_events(fns, warmup=2, runs=runs)
        else:
            times = time_interleaved(fns, warmup=2, runs=runs)
    return _grid(layers, {k: statistics.median(v) for k, v in times.items()})


def _grid(layers: dict[str, Any], med: dict[str, float]) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {}
    n = len(FRACTIONS)
    for name in layers:
        grid = [[0.0] * n for _ in range(n)]
        for i, j in _cells():
            k = f"{name}\0{i}\0{j}"
            grid[i][j] = med[k] if k in med else med[f"{name}\0{min(i, j)}\0{min(i, j)}"]  # depthwise: diagonal
        out[name] = grid
    return out


def _bank_files(layers: dict[str, tuple[nn.Conv2d, tuple[int, ...]]], tmp: str) -> list[tuple[tuple[int, int], str, dict[str, Any]]]:
    """One ONNX file per grid cell holding every layer as an independent branch, with its feed."""
    names = list(layers)
    out = []
    for i, j in _cells():
        scaled: dict[str, nn.Conv2d] = {}  # the calls of one layer share its weights, as in the model
        convs = []
        for n in names:
            if _layer(n) in scaled:  # a module of its own (the exporter names a reused one `convs.3_1`), same tensors
                convs.append(copy.copy(scaled[_layer(n)]))
            else:
                convs.append(scaled.setdefault(_layer(n), _scaled(layers[n][0], FRACTIONS[i], FRACTIONS[j])))
        xs = tuple(torch.rand(layers[n][1][0], c.in_channels, *layers[n][1][2:]) for n, c in zip(names, convs))
        path = os.path.join(tmp, f"cell{i}{j}.onnx")
        with torch.no_grad():
            torch.onnx.export(_Bank(convs).eval(), xs, path, input_names=[f"x{k}" for k in range(len(xs))],
                              output_names=[f"y{k}" for k in range(len(xs))], opset_version=17, dynamo=False)
        out.append(((i, j), path, {f"x{k}": x.numpy() for k, x in enumerate(xs)}))
    return out


def _cell_medians(names: list[str], cell: tuple[int, int], nodes: Sequence[tuple[str, float]], med: dict[str, float]) -> None:
    """Each bank layer's median over its profiled (node, ms) entries, into ``med``."""
    per: dict[int, list[float]] = {}
    for node, ms in nodes:
        k = _bank_index(node)
        if k is not None:
            per.setdefault(k, []).append(ms)
    for k, values in per.items():
        med[f"{names[k]}\0{cell[0]}\0{cell[1]}"] = statistics.median(values)


def _time_onnxruntime(layers: dict[str, tuple[nn.Conv2d, tuple[int, ...]]], threads: int, runs: int) -> dict[str, list[list[float]]]:

    ort = import_onnxruntime()
    names = list(layers)
    with tempfile.TemporaryDirectory(prefix="surgery-latency-") as tmp:
        sessions = []
        for (i, j), path, feed in _bank_files(layers, tmp):
            opts = ort_options(threads)
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, f"prof{i}{j}")
            sessions.append(((i, j), ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"]), feed))
        for _ in range(2):  # warm-up, not profiled apart: the median drops it
            for _, s, f in sessions:
                s.run(None, f)
        for _ in range(runs):  # round-robin over the cells: load changes hit every cell alike
            for _, s, f in sessions:
                s.run(None, f)
        med: dict[str, float] = {}
        for cell, s, _ in sessions:
            events = json.loads(Path(s.end_profiling()).read_text())
            nodes = [(e["name"][: -len("_kernel_time")], float(e["dur"]) / 1e3) for e in events
                     if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
            _cell_medians(names, cell, nodes, med)
    return _checked_grid(layers, med, "ONNX Runtime")


def _time_openvino(layers: dict[str, tuple[nn.Conv2d, tuple[int, ...]]], threads: int, runs: int) -> dict[str, list[list[float]]]:
    """As :func:`_time_onnxruntime`, from OpenVINO's per-node counters (f32, read after every call)."""
    names = list(layers)
    with tempfile.TemporaryDirectory(prefix="surgery-latency-") as tmp:
        sessions = [(cell, OvSession(path, threads, "f32", profiling=True), feed) for cell, path, feed in _bank_files(layers, tmp)]
        for _ in range(2):
            for _, s, f in sessions:
                s.run(None, f)
        nodes: dict[tuple[int, int], list[tuple[str, float]]] = {cell: [] for cell, _, _ in sessions}
        for _ in range(runs):
            for cell, s, f in sessions:
                s.run(None, f)
                nodes[cell] += s.profile()
    med: dict[str, float] = {}
    for cell, entries in nodes.items():
        _cell_medians(names, cell, entries, med)
    return _checked_grid(layers, med, "OpenVINO")


def _checked_grid(layers: dict[str, Any], med: dict[str, float], runtime: str) -> dict[str, list[list[float]]]:
    missing = [n for n in layers if f"{n}\0{0}\0{0}" not in med]
    if missing:
        raise PruningError(f"latency table: {runtime}'s profile has no time for {missing[:3]}")
    return _grid(layers, med)


def _bank_index(node: str) -> int | None:
    """Which layer of a bank a profiled node is: ``/convs.12/Conv`` (the exporter's module path)
    or ``y12_nchwc`` (ONNX Runtime's NCHWc layout pass renames a convolution after its output);
    ``None`` for the layout reorders around them."""
    head = node.strip("/").split("/")[0]
    for prefix, text in (("convs.", head[6:]), ("y", head[1:].removesuffix("_nchwc"))):
        if head.startswith(prefix) and text.isdigit():
            return int(text)
    return None


def cache_dir() -> Path:
    env = os.environ.get("SURGERY_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "surgery") / "latency"


def check_cache_dir(folder: Path) -> None:
    """The latency cache can be written: one clear error naming it *before* anything is measured
    (a ``SURGERY_CACHE`` that is a file, or a folder that cannot be written)."""
    env = "SURGERY_CACHE" if os.environ.get("SURGERY_CACHE") else "the default cache"
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise PruningError(f"latency cache {folder}: {p} is not a folder ({env}); set SURGERY_CACHE to a writable folder")
        if p.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PruningError(f"latency cache {folder} cannot be written ({env}: {e.strerror or e}); "
                           "set SURGERY_CACHE to a writable folder") from None


def check_latency_device(device: str, runtime: str) -> None:
    """One line for a device a latency budget cannot be measured on: ``cpu`` for every runtime,
    ``cuda`` with runtime ``torch`` and a CUDA device present."""
    if device not in ("cpu", "cuda"):
        raise PruningError(f"latency device {device!r}: choose cpu or cuda")
    if device == "cuda" and runtime != "torch":
        raise PruningError(f"latency device cuda: runtime torch only (got {runtime}; ONNX files are timed on the CPU)")
    if device == "cuda" and not torch.cuda.is_available():
        raise PruningError("latency device cuda asked for, but torch sees no CUDA device")


def machine_identity() -> dict[str, Any]:
    """What a latency table depends on besides the model: the CPU (model name, logical cores, the
    cores this process may use), the host name."""
    import platform
    import socket

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "host": socket.gethostname()}


def device_identity(device: str) -> str:
    """``cpu``, or the CUDA device's name and compute capability (a table is per GPU model)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(dev)
    return f"cuda:{torch.cuda.get_device_name(dev)}:sm{major}{minor}"


def _table_key(layers: dict[str, tuple[nn.Conv2d, tuple[int, ...]]], runtime: str, threads: int, size: int, batch: int,
               model_name: str, device: str = "cpu") -> str:
    """The cache key: the layers, the runtime, its version and precision (f32), threads, size,
    batch, the device (:func:`device_identity`) and :func:`machine_identity`: another machine's
    table is never used."""
    desc = [model_name, runtime, runtime_version(runtime), "f32", threads, size, batch, list(FRACTIONS), machine_identity(),
            "every call, shared weights"]  # how the table is measured: a table measured otherwise is not reused
    if device_identity(device) != "cpu":  # CPU tables keep the keys they had
        desc.append(device_identity(device))
    desc += [[n, c.in_channels, c.out_channels, list(c.kernel_size), list(c.stride), c.groups, list(s)]
             for n, (c, s) in layers.items()]
    return hashlib.sha256(json.dumps(desc, default=str).encode()).hexdigest()[:16]


MAX_CACHE_BYTES = 16 * 2**20  # a 1000-layer table is ~0.5 MB: a larger entry is not read
MAX_LAYER_MS = 60_000.0  # one convolution taking a minute is not a measurement


def check_table(d: Any, layers: dict[str, Any], key: str) -> str | None:
    """Why a cached table cannot be used (``None``: it can): its key, its layers, a
    ``len(FRACTIONS)`` x ``len(FRACTIONS)`` grid of finite positive milliseconds per layer (below
    :data:`MAX_LAYER_MS`), and not one constant value everywhere (an edited or zeroed file)."""
    if not isinstance(d, dict) or not isinstance(d.get("ms"), dict):
        return "not a latency table"
    if d.get("key") != key:
        return "made for another key (model, runtime or machine)"
    if set(d["ms"]) != {_layer(n) for n in layers}:
        return "its layers differ from the model's"
    n = len(FRACTIONS)
    values: list[float] = []
    for name, grid in d["ms"].items():
        if not (isinstance(grid, list) and len(grid) == n and all(isinstance(r, list) and len(r) == n for r in grid)):
            return f"layer {name!r} is not a {n} x {n} grid"
        for v in (v for r in grid for v in r):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v < MAX_LAYER_MS:
                return f"layer {name!r} holds {v!r} (milliseconds must be finite, positive, below {MAX_LAYER_MS:g})"
            values.append(float(v))
    if len(values) > 1 and max(values) == min(values):
        return f"every value is {values[0]:g} ms (not a measurement)"
    return None


def _cached(path: Path, layers: dict[str, Any], key: str) -> tuple[LatencyTable | None, str | None]:
    """The cached table at ``path`` if it is valid data; else ``(None, why)`` (``why`` is ``None``
    when there is no entry). The size is checked before anything is read."""
    if not path.is_file():
        return None, None
    size = path.stat().st_size
    if size > MAX_CACHE_BYTES:
        return None, f"{size} bytes (at most {MAX_CACHE_BYTES})"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__})"
    why = check_table(d, layers, key)
    if why is not None:
        return None, why
    return LatencyTable.from_dict(d), None


def measure_table(
    model: nn.Module, runtime: str, input_size: int, *, batch: int = 1, threads: int = 2, runs: int = 15,
    model_name: str = "", refresh: bool = False, cache: bool = True, device: str = "cpu",
) -> LatencyTable:
    """The latency table of ``model``'s network convolutions on ``runtime`` (cached; see the
    module docstring). A cache entry that is not valid data (:func:`check_table`, or larger than
    :data:`MAX_CACHE_BYTES`) is measured again, and the table says so in ``notes``. ``device``
    ``cuda``: runtime ``torch`` only, each cell timed on the GPU (:func:`_time_torch`)."""
    if runtime not in RUNTIMES:
        raise PruningError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    check_latency_device(device, runtime)
    if cache:
        check_cache_dir(cache_dir())
    layers = _conv_inputs(model, input_size, batch)
    if not layers:
        raise PruningError(f"{type(model).__name__}: no convolution in its network modules to time")
    key = _table_key(layers, runtime, threads, input_size, batch, model_name or type(model).__name__, device)
    path = cache_dir() / f"{key}.json"
    notes: list[str] = []
    if cache and not refresh:
        table, why = _cached(path, layers, key)
        if table is not None:
            return table
        if why is not None:
            notes.append(f"latency cache entry {path} is not a valid table ({why}): measured again")
    if runtime == "torch":
        ms = _time_torch(layers, threads, runs) if device == "cpu" else _time_torch(layers, threads, runs, device)
    else:
        ms = {"onnxruntime": _time_onnxruntime, "openvino": _time_openvino}[runtime](layers, threads, runs)
    table = LatencyTable(runtime, threads, input_size, batch, _per_layer(ms),
                         {_layer(n) for n, (c, _) in layers.items() if _is_depthwise(c)}, key, notes)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w") as f:
            json.dump(table.to_dict(), f)
    return table
