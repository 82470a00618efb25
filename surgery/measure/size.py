"""File sizes: the weights alone, plain and gzipped."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import torch
from torch import nn


def file_size(path: str | Path) -> tuple[int, int]:
    """``(bytes, gzip_bytes)`` of a file; the gzip size is computed in memory (level 6)."""
    data = Path(path).read_bytes()
    return len(data), len(gzip.compress(data, compresslevel=6))


def state_dict_size(model: nn.Module) -> tuple[int, int]:
    """``(bytes, gzip_bytes)`` of ``torch.save(model.state_dict())``: the deployable weights alone,
    without a checkpoint's masks, plan or optimizer state."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    return len(data), len(gzip.compress(data, compresslevel=6))
