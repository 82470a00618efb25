"""Where this process sits in a ``torchrun`` launch, and joining / leaving the process group."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import TrainingError

T = TypeVar("T")

@dataclass
class DistInfo:
    """Where this process sits in a ``torchrun`` launch (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str | torch.device) -> torch.device:
        """The device this rank uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
        d = torch.device(device)
        if d.type == "cuda" and d.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return d


def init_distributed(device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` set).

    Uses NCCL for CUDA and gloo for CPU. Without those variables (or with a world of one) this
    returns ``DistInfo()`` and initialises nothing. Call :func:`destroy_distributed` at the end.
    """
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return DistInfo()
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_RANK", rank))
    if world <= 1:
        return DistInfo(rank=rank, world_size=world, local_rank=local)
    if dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, backend=dist.get_backend())
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for but CUDA is not available")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, backend=backend)


def destroy_distributed() -> None:
    """Leave the process group (a no-op when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_dist() -> DistInfo:
    """The process group this process already belongs to (``DistInfo()`` outside one)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            backend=dist.get_backend(),
        )
    return DistInfo()




def main_process_first(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first, then on the other ranks (building a cached dataset once)."""
    if not (info.distributed and dist.is_initialized()):
        return fn()
    if info.is_main:
        result = fn()
    dist.barrier()
    if not info.is_main:
        result = fn()
    return result


def average_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """All-reduce (mean) the gradients of parameters that DDP does not own (a hook's modules)."""
    if not (info.distributed and dist.is_initialized()):
        return
    for p in params:
        if p.grad is None:  # unused on this rank (no objects on a level): every rank must reduce
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(info.world_size)
