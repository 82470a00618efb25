"""ONNX files and ONNX Runtime sessions: every session in the project is made here, and the
``surgery.*`` metadata an exported detector carries is written and read here (used by export,
runtime, quantize and measure).

ONNX Runtime's intra-op thread pool spin-waits by default, which on a 2-core machine shared with
other work made a dense detector 9x slower (102 ms instead of 11.8 ms) - the same trap as OpenMP's
spin-waiting (``OMP_WAIT_POLICY=PASSIVE`` for torch): :func:`ort_session` switches it off.

OpenVINO (:func:`ov_session`, the optional extra ``openvino``) runs the same files through
:class:`OvSession`, which answers the part of ``InferenceSession``'s interface the project uses
(``get_inputs``, ``get_outputs``, ``run``, ``get_modelmeta``), so a detector, bench and the latency
table take either runtime. Its settings are explicit, as for ONNX Runtime: ``precision``
(:data:`PRECISIONS`; OpenVINO's own default is bf16 on CPUs that have it, which moved the
quickstart's scores by up to 0.005, so comparisons use ``f32``), one stream, ``threads`` inference
threads, the latency hint, and no thread pinning (a shared machine; OpenVINO's CPU plugin has no
spin-wait switch). Outputs are found by name among each output's tensor names (OpenVINO's graph
optimisations merge an intermediate tensor's name into an output's).
Nothing here imports torch; onnx, onnxruntime and openvino are imported when first needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SurgeryError


class RuntimeUnavailable(SurgeryError):
    """A runtime the user asked for is not installed or cannot load the model."""


def import_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeUnavailable("onnxruntime is not installed (pip install 'surgery[export]')") from e
    return ort


def ort_options(threads: int | None = None, *, spinning: bool = False) -> Any:
    """``onnxruntime.SessionOptions`` with ``threads`` intra-op threads (``None``: onnxruntime's
    default), one inter-op thread, quiet logs, and spin-waiting off unless ``spinning``."""
    opts = import_onnxruntime().SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    return opts


def ort_session(path: str | Path, threads: int | None = None, *, spinning: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU with :func:`ort_options`."""
    ort = import_onnxruntime()
    opts = ort_options(threads, spinning=spinning)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeUnavailable(f"onnxruntime cannot load {path}: {first}") from e


ONNX_RUNTIMES = ("onnxruntime", "openvino")  # what runs an .onnx file here
PRECISIONS = ("f32", "bf16", "f16")  # OpenVINO's INFERENCE_PRECISION_HINT; ONNX Runtime: f32 only
_OV_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}


def import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as e:
        raise RuntimeUnavailable("openvino is not installed (pip install 'surgery[openvino]')") from e
    return ov


def check_runtime(runtime: str, precision: str = "f32") -> None:
    """One line for a runtime or precision an ONNX file cannot run with here."""
    if runtime not in ONNX_RUNTIMES:
        raise RuntimeUnavailable(f"runtime {runtime!r}: ONNX files run in {' or '.join(ONNX_RUNTIMES)}")
    if precision not in PRECISIONS:
        raise RuntimeUnavailable(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if runtime == "onnxruntime" and precision != "f32":
        raise RuntimeUnavailable(f"precision {precision}: ONNX Runtime runs float files in f32 here (bf16/f16: --runtime openvino)")


def ov_config(threads: int | None = None, precision: str = "f32", *, profiling: bool = False) -> dict[str, Any]:
    """OpenVINO CPU settings: ``precision`` inference, one stream of ``threads`` threads (``None``:
    OpenVINO's choice), the latency hint, no pinning, per-node profiling when asked."""
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY",
                           "ENABLE_CPU_PINNING": False, "PERF_COUNT": profiling}
    if threads is not None:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


class _Port:
    """A name and a shape, as ``onnxruntime.NodeArg`` gives them (dynamic dimensions as text)."""

    def __init__(self, name: str, shape: list[Any]) -> None:
        self.name, self.shape = name, shape


class _Meta:
    def __init__(self, props: dict[str, str]) -> None:
        self.custom_metadata_map = props


def _no_external_data(proto: Any, path: str | Path) -> None:
    """OpenVINO reads external tensor data wherever a file points (ONNX Runtime refuses paths
    outside the model's folder): a surgery export has none, so any is refused."""
    external = [t.name for t in proto.graph.initializer if t.data_location == 1]  # onnx.TensorProto.EXTERNAL
    if external:
        raise RuntimeUnavailable(f"{path}: tensors stored outside the file ({external[0]}, ...): refused")


class OvSession:
    """An ONNX file compiled by OpenVINO for the CPU, with ``InferenceSession``'s interface."""

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "f32", *,
                 profiling: bool = False) -> None:
        import onnx  # the openvino extra installs it: the file's names, shapes and metadata

        check_runtime("openvino", precision)
        ov = import_openvino()
        proto = onnx.load(str(path), load_external_data=False)
        _no_external_data(proto, path)
        core = ov.Core()
        if _OV_CAPABILITY[precision] not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise RuntimeUnavailable(f"precision {precision}: this CPU has no {_OV_CAPABILITY[precision]} (f32 runs everywhere)")
        try:
            self.compiled = core.compile_model(str(path), "CPU", ov_config(threads, precision, profiling=profiling))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError with its whole log
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeUnavailable(f"openvino cannot load {path}: {first}") from e
        self.precision = precision
        self.request = self.compiled.create_infer_request()
        self._inputs = [_Port(v.name, _dims(v)) for v in proto.graph.input if v.name not in {i.name for i in proto.graph.initializer}]
        names = [v.name for v in proto.graph.output]
        self._outputs = [_Port(n, _dims(v)) for n, v in zip(names, proto.graph.output)]
        self._ports = []
        for n in names:  # by name: OpenVINO may give an output more names than the file's
            port = next((o for o in self.compiled.outputs if n in o.get_names()), None)
            if port is None:
                raise RuntimeUnavailable(f"openvino lost the output {n!r} of {path}")
            self._ports.append(port)
        self._meta = {p.key: p.value for p in proto.metadata_props}

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def get_modelmeta(self) -> _Meta:
        return _Meta(self._meta)

    def run(self, output_names: Any, feed: dict[str, Any]) -> list[Any]:
        res = self.request.infer(feed)
        return [res[p] for p in self._ports]

    def profile(self) -> list[tuple[str, float]]:
        """(node name, ms) of every executed node of the last :meth:`run` (``profiling=True``)."""
        return [(p.node_name, p.real_time.total_seconds() * 1e3) for p in self.request.get_profiling_info()
                if p.status.name == "EXECUTED"]


def _dims(value: Any) -> list[Any]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def session(path: str | Path, runtime: str = "onnxruntime", threads: int | None = None, *, precision: str = "f32",
            spinning: bool = False) -> Any:
    """A session on ``runtime``: :func:`ort_session` or an :class:`OvSession`."""
    check_runtime(runtime, precision)
    if runtime == "openvino":
        return OvSession(path, threads, precision)
    return ort_session(path, threads, spinning=spinning)


def runtime_version(runtime: str) -> str:
    """The installed version of ``runtime`` (torch, onnxruntime, openvino)."""
    if runtime == "openvino":
        return str(import_openvino().__version__)
    if runtime == "onnxruntime":
        return str(import_onnxruntime().__version__)
    import importlib.metadata  # stdlib; torch's version without importing torch here

    return importlib.metadata.version(runtime)


def is_onnx(path: str | Path) -> bool:
    """An ONNX file: ``.onnx`` suffix, or a protobuf starting with the ``ir_version`` field (a torch
    checkpoint is a zip, ``PK``, or a pickle, ``0x80``)."""
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(1) == b"\x08"
    except OSError:
        return False


def output_names(path: str | Path) -> list[str]:
    return [o.name for o in ort_session(path).get_outputs()]


METADATA_PREFIX = "surgery."


def write_metadata(path: str | Path, metadata: dict[str, str]) -> dict[str, str]:
    """Set ``surgery.<key>`` entries in an ONNX file's ``metadata_props`` (in place: call it on a
    file being written, e.g. inside :func:`surgery.storage.atomic.atomic_path`)."""
    import onnx

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({METADATA_PREFIX + k: str(v) for k, v in metadata.items()})
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    return {k: str(v) for k, v in metadata.items()}


def read_metadata(path_or_session: str | Path | Any) -> dict[str, str]:
    """The ``surgery.*`` metadata of an ONNX file, or of an open ``InferenceSession`` (without the
    prefix); empty for other files."""
    sess = ort_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    meta = sess.get_modelmeta().custom_metadata_map
    return {k[len(METADATA_PREFIX):]: v for k, v in meta.items() if k.startswith(METADATA_PREFIX)}


# what each ``surgery.*`` key may hold: a file's metadata is input, never trusted for its types
_META_INTS = {"params": 10**13, "params_nonzero": 10**13, "macs": 10**16, "input_size": 8192}
_META_TEXT = ("model", "kind", "method", "source")


def check_metadata(meta: dict[str, str], where: str | Path) -> dict[str, str]:
    """``meta`` (from :func:`read_metadata`) if every ``surgery.*`` value has its type and range;
    otherwise one :class:`~surgery.errors.CheckpointError` line naming the key: counts are
    non-negative integers, ``ratio`` a number in [0, 1), ``num_classes`` an integer >= 1,
    ``class_names`` a JSON list of strings and ``recipe`` a JSON mapping."""

    def bad(key: str, what: str) -> CheckpointError:
        value = meta[key] if len(meta[key]) <= 60 else meta[key][:57] + "..."
        return CheckpointError(f"{where}: ONNX metadata surgery.{key}={value!r} is not {what}; refused (re-export the model)")

    for key, hi in _META_INTS.items():
        if meta.get(key, "") != "" and not (meta[key].isdigit() and int(meta[key]) <= hi):
            raise bad(key, f"an integer in 0..{hi:g}")
    if meta.get("params") and meta.get("params_nonzero") and int(meta["params_nonzero"]) > int(meta["params"]):
        raise bad("params_nonzero", f"at most params ({meta['params']})")
    if meta.get("num_classes", "") != "" and not (meta["num_classes"].isdigit() and 1 <= int(meta["num_classes"]) <= 100_000):
        raise bad("num_classes", "an integer in 1..100000")
    if meta.get("ratio", "") != "":
        try:
            ok = 0.0 <= float(meta["ratio"]) < 1.0
        except ValueError:
            ok = False
        if not ok:
            raise bad("ratio", "a number in [0, 1)")
    for key in _META_TEXT:
        if len(meta.get(key, "")) > 512:
            raise bad(key, "a name of at most 512 characters")
    for key, kind in (("class_names", list), ("recipe", dict)):
        if meta.get(key, "") == "":
            continue
        try:
            value = json.loads(meta[key])
        except ValueError:
            raise bad(key, "JSON") from None
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise bad(key, "a JSON list of names" if kind is list else "a JSON mapping")
    return meta


def onnx_parameter_count(path: str | Path) -> int:
    """Parameters the file holds: elements of its initializers (what a lying ``surgery.params``
    cannot change). External data is not read, only the declared shapes."""
    import onnx  # optional extra (export): only when a file is read

    proto = onnx.load(str(path), load_external_data=False)
    return sum(math.prod(t.dims) for t in proto.graph.initializer)


def run_onnx(path: str | Path, image: Any) -> dict[str, Any]:
    """Run an exported detector in onnxruntime (CPU) on one ``3 x S x S`` image."""
    sess = ort_session(path)
    feed = {sess.get_inputs()[0].name: image.detach().cpu().numpy()}
    outs = sess.run(None, feed)
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}
