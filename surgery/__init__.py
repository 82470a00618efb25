"""surgery: physical structured pruning for object detectors.

The library returns typed results and never prints; the ``surgery`` CLI renders them.
"""

from __future__ import annotations

import os

# OpenMP spin-waiting makes torch 10-40x slower on a busy 2-core machine; this only has an effect
# if it is set before torch is first imported (the CLI and the tests set it even earlier).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from .checkpoint import load, load_checkpoint, save_checkpoint  # noqa: E402
from .errors import SurgeryError  # noqa: E402
from .models import ModelSpec, build_model, list_models, register_model  # noqa: E402

__all__ = [
    "ModelSpec",
    "SurgeryError",
    "build_model",
    "list_models",
    "load",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
]
