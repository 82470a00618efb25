"""ONNX files and ONNX Runtime sessions: every session in the project is made here, and the
``surgery.*`` metadata an exported detector carries is written and read here (used by export,
runtime, quantize and measure).

ONNX Runtime's intra-op thread pool spin-waits by default, which on a 2-core machine shared with
other work made a dense detector 9x slower (102 ms instead of 11.8 ms) - the same trap as OpenMP's
spin-waiting (``OMP_WAIT_POLICY=PASSIVE`` for torch): :func:`ort_session` switches it off.
Nothing here imports torch; onnx and onnxruntime are imported when first needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import CheckpointError, SurgeryError


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
    file being written, e.g. inside :func:`surgery.atomic.atomic_path`)."""
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
