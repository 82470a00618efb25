"""Deployment runtimes: ONNX Runtime sessions configured for a shared CPU.

Every ONNX Runtime session in the project is made here, so the one setting that matters on a
busy machine is never forgotten: ONNX Runtime's intra-op thread pool spin-waits by default, which
on a 2-core machine shared with other work made a dense detector 9x slower (102 ms instead of
11.8 ms) - the same trap as OpenMP's spin-waiting (``OMP_WAIT_POLICY=PASSIVE`` for torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SurgeryError


class RuntimeUnavailable(SurgeryError):
    """A runtime the user asked for is not installed or cannot load the model."""


def import_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeUnavailable("onnxruntime is not installed (pip install 'surgery[export]')") from e
    return ort


def ort_session(path: str | Path, threads: int | None = None, *, spinning: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU with ``threads`` intra-op threads (``None``:
    onnxruntime's default) and spin-waiting off unless ``spinning``."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeUnavailable(f"onnxruntime cannot load {path}: {first}") from e
