"""surgery: physical structured pruning for object detectors.

The library returns typed results and never prints; the ``surgery`` CLI renders them. Importing
the package sets nothing in the environment and imports torch only when one of the names below is
first used, so entry points (the CLI, ``python -m surgery``, the tests, the benchmarks) can set
``OMP_WAIT_POLICY`` before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use)
_EXPORTS = {
    "load": "storage.checkpoint",
    "load_checkpoint": "storage.checkpoint",
    "save_checkpoint": "storage.checkpoint",
    "SurgeryError": "errors",
    "ModelSpec": "detectors.builders",
    "build_model": "detectors.builders",
    "list_models": "detectors.builders",
    "register_model": "detectors.builders",
    "prune_to": "pruning.prune",
    "CutRatio": "pruning.budget",
    "KeepMacs": "pruning.budget",
    "KeepParams": "pruning.budget",
    "KeepLatency": "pruning.budget",
    "Sensitivity": "pruning.budget",
    "Rounding": "pruning.budget",
    "Recovery": "pruning.budget",
}

if TYPE_CHECKING:
    from .detectors.builders import ModelSpec, build_model, list_models, register_model
    from .errors import SurgeryError
    from .pruning.budget import CutRatio, KeepLatency, KeepMacs, KeepParams, Recovery, Rounding, Sensitivity
    from .pruning.prune import prune_to
    from .storage.checkpoint import load, load_checkpoint, save_checkpoint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "CutRatio",
    "KeepLatency",
    "KeepMacs",
    "KeepParams",
    "ModelSpec",
    "Recovery",
    "Rounding",
    "Sensitivity",
    "SurgeryError",
    "build_model",
    "list_models",
    "load",
    "load_checkpoint",
    "prune_to",
    "register_model",
    "save_checkpoint",
]
