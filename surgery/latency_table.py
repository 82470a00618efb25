"""The latency table of :mod:`surgery.latency`: every convolution of a network timed alone at a
grid of input/output width fractions on one runtime, cached per machine (see that module's
docstring, step 1), and the bilinear estimate between grid points."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_open
from .errors import PruningError
from .measure import fixed_workload
from .measure.split import network_modules
from .measure.timing import time_interleaved, torch_threads
from .measure.workload import example_images, quiet
from .onnx_io import ort_options
from .runtime import import_onnxruntime

FRACTIONS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
RUNTIMES = ("onnxruntime", "torch")


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


def _conv_inputs(model: nn.Module, input_size: int, batch: int) -> dict[str, tuple[nn.Conv2d, tuple[int, ...]]]:
    """Every Conv2d of the network modules with the input shape it sees (first call), under the
    fixed workload."""

    nets = network_modules(model)
    seen: dict[str, tuple[nn.Conv2d, tuple[int, ...]]] = {}
    handles = []
    for prefix, net in nets.items():
        for name, m in net.named_modules():
            if isinstance(m, nn.Conv2d):
                full = f"{prefix}.{name}" if name else prefix

                def hook(mod: nn.Module, args: tuple, _out: Any, full: str = full) -> None:
                    if full not in seen:
                        seen[full] = (mod, tuple(args[0].shape))

                handles.append(m.register_forward_hook(hook))
    try:
        with quiet(), torch.no_grad(), fixed_workload(model, 100, 100):
            model.eval()(example_images(batch, input_size, "cpu"))
    finally:
        for h in handles:
            h.remove()
    return seen


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


def _time_torch(layers: dict[str, tuple[nn.Conv2d, tuple[int, ...]]], threads: int, runs: int) -> dict[str, list[list[float]]]:

    fns: dict[str, Callable[[], Any]] = {}
    for name, (conv, shape) in layers.items():
        for i, j in _cells():
            if _is_depthwise(conv) and i != j:
                continue
            c = _scaled(conv, FRACTIONS[i], FRACTIONS[j])
            x = torch.rand(shape[0], c.in_channels, *shape[2:]).contiguous(memory_format=torch.channels_last)
            c = c.to(memory_format=torch.channels_last)
            fns[f"{name}\0{i}\0{j}"] = lambda c=c, x=x: c(x)
    with torch_threads(threads), torch.inference_mode():
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


def _time_onnxruntime(layers: dict[str, tuple[nn.Conv2d, tuple[int, ...]]], threads: int, runs: int) -> dict[str, list[list[float]]]:

    ort = import_onnxruntime()
    names = list(layers)
    with tempfile.TemporaryDirectory(prefix="surgery-latency-") as tmp:
        sessions = []
        for i, j in _cells():
            convs = [_scaled(layers[n][0], FRACTIONS[i], FRACTIONS[j]) for n in names]
            xs = tuple(torch.rand(layers[n][1][0], c.in_channels, *layers[n][1][2:]) for n, c in zip(names, convs))
            path = os.path.join(tmp, f"cell{i}{j}.onnx")
            with torch.no_grad():
                torch.onnx.export(_Bank(convs).eval(), xs, path, input_names=[f"x{k}" for k in range(len(xs))],
                                  output_names=[f"y{k}" for k in range(len(xs))], opset_version=17, dynamo=False)
            opts = ort_options(threads)
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, f"prof{i}{j}")
            sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
            feed = {f"x{k}": x.numpy() for k, x in enumerate(xs)}
            sessions.append(((i, j), sess, feed))
        for _ in range(2):  # warm-up, not profiled apart: the median drops it
            for _, s, f in sessions:
                s.run(None, f)
        for _ in range(runs):  # round-robin over the cells: load changes hit every cell alike
            for _, s, f in sessions:
                s.run(None, f)
        med: dict[str, float] = {}
        for (i, j), s, _ in sessions:
            per: dict[int, list[float]] = {}
            for e in json.loads(Path(s.end_profiling()).read_text()):
                if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
                    continue
                node = e["name"][: -len("_kernel_time")]
                k = _bank_index(node)
                if k is not None:
                    per.setdefault(k, []).append(float(e["dur"]) / 1e3)
            for k, values in per.items():
                med[f"{names[k]}\0{i}\0{j}"] = statistics.median(values)
    missing = [n for n in names if f"{n}\0{0}\0{0}" not in med]
    if missing:
        raise PruningError(f"latency table: ONNX Runtime's profile has no time for {missing[:3]}")
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


def _table_key(layers: dict[str, tuple[nn.Conv2d, tuple[int, ...]]], runtime: str, threads: int, size: int, batch: int,
               model_name: str) -> str:
    version = torch.__version__
    if runtime == "onnxruntime":

        version = import_onnxruntime().__version__
    desc = [model_name, runtime, version, threads, size, batch, list(FRACTIONS)]
    desc += [[n, c.in_channels, c.out_channels, list(c.kernel_size), list(c.stride), c.groups, list(s)]
             for n, (c, s) in layers.items()]
    return hashlib.sha256(json.dumps(desc, default=str).encode()).hexdigest()[:16]


def measure_table(
    model: nn.Module, runtime: str, input_size: int, *, batch: int = 1, threads: int = 2, runs: int = 15,
    model_name: str = "", refresh: bool = False, cache: bool = True,
) -> LatencyTable:
    """The latency table of ``model``'s network convolutions on ``runtime`` (cached; see the
    module docstring)."""
    if runtime not in RUNTIMES:
        raise PruningError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    layers = _conv_inputs(model, input_size, batch)
    if not layers:
        raise PruningError(f"{type(model).__name__}: no convolution in its network modules to time")
    key = _table_key(layers, runtime, threads, input_size, batch, model_name or type(model).__name__)
    path = cache_dir() / f"{key}.json"
    if cache and not refresh and path.is_file():
        try:
            table = LatencyTable.from_dict(json.loads(path.read_text()))
            if set(table.ms) == set(layers):
                return table
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again
    timer = _time_onnxruntime if runtime == "onnxruntime" else _time_torch
    ms = timer(layers, threads, runs)
    table = LatencyTable(runtime, threads, input_size, batch, ms,
                         {n for n, (c, _) in layers.items() if _is_depthwise(c)}, key)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w") as f:
            json.dump(table.to_dict(), f)
    return table
