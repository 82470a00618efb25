"""A small detection trainer with hooks (in the style of detectron2's ``HookBase``).

:class:`Trainer` runs a step-based loop over a :class:`~torch.utils.data.Dataset` of
``(image, target)`` items: SGD or AdamW, linear warm-up then cosine (or step, or constant) decay,
gradient clipping, AMP on CUDA, ``torchrun`` data parallelism, exact resume and NaN/inf detection.
Everything around the step lives in hooks:

- :class:`MaskHook` keeps masked (unstructured) weights exactly zero, optionally raising the
  sparsity on an :class:`~surgery.masked.AGPSchedule`;
- :class:`EvalHook` evaluates on a validation set;
- :class:`CheckpointHook` writes atomic checkpoints (rank 0 only) that ``--resume`` continues from;
- :class:`LoggingHook` hands a :class:`StepInfo` to a callback (the CLI draws a progress bar).

The library never prints.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoint import read_checkpoint, save_checkpoint
from .errors import CheckpointError, DataError, TrainingError
from .masked import AGPSchedule, apply_masks, magnitude_masks, mask_gradients, masks_sparsity, unwrap
from .models import ModelSpec
from .recipe import TrainSection
from .safety import check_output

# --------------------------------------------------------------------------------------------
# distributed


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


def _current_dist() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            backend=dist.get_backend(),
        )
    return DistInfo()


# --------------------------------------------------------------------------------------------
# hooks


@dataclass
class StepInfo:
    """What :class:`LoggingHook` reports (losses and speed averaged since the previous report)."""

    step: int
    total: int
    losses: dict[str, float]
    lr: float
    images_per_s: float
    epoch: int = 0
    seconds: float = 0.0  # since training (re)started
    eta_s: float = 0.0

    @property
    def loss(self) -> float:
        return sum(self.losses.values())


class HookBase:
    """Called around the loop. ``trainer.step`` counts completed optimizer steps."""

    def before_train(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has restored the state)."""

    def after_backward(self, trainer: Trainer) -> None:
        """After the gradients exist (unscaled), before clipping and the optimizer step."""

    def after_step(self, trainer: Trainer) -> None:
        """After each optimizer step; ``trainer.step`` is already incremented."""

    def after_train(self, trainer: Trainer) -> None:
        """After the last step (not called when training stops with an error)."""

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints for ``--resume``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class LoggingHook(HookBase):
    """Every ``every`` steps (default ``cfg.log_every``) and at the last step, on rank 0, call
    ``callback(StepInfo)``."""

    def __init__(self, callback: Callable[[StepInfo], None], every: int | None = None) -> None:
        self.callback = callback
        self.every = every
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._sums: dict[str, float] = {}
        self._n = 0
        self._t = now

    def before_train(self, trainer: Trainer) -> None:
        self._reset(time.perf_counter())
        self._t0 = self._t

    def after_step(self, trainer: Trainer) -> None:
        for k, v in trainer.last_losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1
        every = self.every or trainer.cfg.log_every or 1
        if not trainer.dist.is_main or (trainer.step % every and trainer.step != trainer.total_steps):
            return
        now = time.perf_counter()
        elapsed = max(now - self._t, 1e-9)
        done = trainer.step - trainer.start_step
        run_s = now - self._t0
        eta = run_s / max(done, 1) * (trainer.total_steps - trainer.step)
        self.callback(
            StepInfo(
                step=trainer.step,
                total=trainer.total_steps,
                losses={k: v / self._n for k, v in self._sums.items()},
                lr=trainer.lr,
                images_per_s=self._n * trainer.global_batch / elapsed,
                epoch=trainer.epoch,
                seconds=run_s,
                eta_s=eta,
            )
        )
        self._reset(now)


class EvalHook(HookBase):
    """Evaluate on ``dataset`` every ``every`` steps (0: only at the end) and after training.

    Runs on rank 0 with :func:`surgery.evaluate.evaluate`; each result is appended to
    ``trainer.history`` (``{"step": ..., **metrics}``) and kept in ``trainer.metrics``.
    """

    def __init__(
        self,
        dataset: Dataset,
        every: int = 0,
        *,
        batch_size: int = 8,
        max_images: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        on_result: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.dataset = dataset
        self.every = every
        self.batch_size = batch_size
        self.max_images = max_images
        self.progress = progress  # (images done, total) during an evaluation
        self.on_result = on_result  # (step, metrics) after each evaluation
        self._last_step = -1

    def _run(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main or self._last_step == trainer.step:
            return
        from .evaluate import evaluate

        module = trainer.module
        was_training = module.training
        try:
            result = evaluate(
                module,
                self.dataset,
                batch_size=self.batch_size,
                device=str(trainer.device),
                max_images=self.max_images,
                progress=self.progress,
            )
        finally:
            module.train(was_training)
        metrics = {k: float(v) if isinstance(v, (int, float)) else v for k, v in dict(result.metrics).items()}
        trainer.metrics = metrics
        trainer.history.append({"step": trainer.step, **metrics})
        self._last_step = trainer.step
        if self.on_result is not None:
            self.on_result(trainer.step, metrics)

    def after_step(self, trainer: Trainer) -> None:
        if self.every > 0 and trainer.step % self.every == 0 and trainer.step < trainer.total_steps:
            self._run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._run(trainer)


class CheckpointHook(HookBase):
    """Every ``every`` steps write ``path`` with the full training state (for ``--resume``); after
    training write the final checkpoint there. Rank 0 only; writes are atomic.

    The weights after step N have not been evaluated yet: they are written to a pending file and
    replace ``path`` only once step N+1's loss on them is finite. A divergence therefore keeps the
    last state that was proven finite, never the update that destroyed the model."""

    def __init__(self, path: str | Path, every: int = 200) -> None:
        self.path = Path(path)
        self.every = every
        self.last_saved: int | None = None
        self.pending: tuple[int, Path] | None = None

    def after_step(self, trainer: Trainer) -> None:
        if self.every > 0 and trainer.step % self.every == 0 and trainer.step < trainer.total_steps:
            self.discard()
            if not _params_finite(trainer.module):
                return  # the next loss check reports the divergence
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.pending.tmp")
            if trainer.save(tmp, full_state=True) is not None:
                self.pending = (trainer.step, tmp)

    def after_backward(self, trainer: Trainer) -> None:
        # this step's loss, computed on the pending weights, was finite: they are the last good state
        if self.pending is not None:
            step, tmp = self.pending
            self.pending = None
            check_output(self.path)
            os.replace(tmp, self.path)
            self.last_saved = step

    def discard(self) -> None:
        if self.pending is not None:
            self.pending[1].unlink(missing_ok=True)
            self.pending = None

    def after_train(self, trainer: Trainer) -> None:
        self.discard()
        if not _params_finite(trainer.module):
            kept = f"{self.path} (step {self.last_saved}) was kept" if self.last_saved is not None else f"{self.path} was not written"
            raise TrainingError(f"training diverged in the last step: the weights are not finite; {kept}")
        trainer.save(self.path, full_state=False)
        self.last_saved = trainer.step


def _params_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class MaskHook(HookBase):
    """Keep masked weights exactly zero: re-apply the masks after every optimizer step (and zero
    their gradients before it).

    Given an :class:`~surgery.masked.AGPSchedule` instead of masks, recompute magnitude masks at
    the scheduled steps; the sparsity never decreases and pruned weights stay pruned (masks
    passed to the trainer, e.g. those of a masked checkpoint, are the starting point).
    """

    def __init__(
        self,
        masks: dict[str, torch.Tensor] | AGPSchedule,
        scope: str = "layer",
        names: list[str] | None = None,
    ) -> None:
        if isinstance(masks, AGPSchedule):
            self.schedule: AGPSchedule | None = masks
            self.masks: dict[str, torch.Tensor] | None = None
        else:
            self.schedule = None
            self.masks = dict(masks)
        self.scope = scope
        self.names = names
        self.last_update: int | None = None
        self._restored = False

    @property
    def sparsity(self) -> float:
        return masks_sparsity(self.masks) if self.masks else 0.0

    def before_train(self, trainer: Trainer) -> None:
        if self.masks is None and trainer.initial_masks:
            self.masks = dict(trainer.initial_masks)
        if self.masks is not None:
            params = dict(trainer.module.named_parameters())
            self.masks = {n: m.to(params[n].device, torch.bool) if n in params else m for n, m in self.masks.items()}
        if self.schedule is not None and not self._restored and self.schedule.should_update(trainer.step):
            self._update(trainer)
        if self.masks:
            apply_masks(trainer.module, self.masks)

    def _update(self, trainer: Trainer) -> None:
        assert self.schedule is not None
        target = self.schedule.sparsity_at(trainer.step)
        if self.masks is None and target <= 0.0:
            self.last_update = trainer.step
            return
        self.masks = magnitude_masks(trainer.module, target, self.scope, self.names, previous=self.masks)
        self.last_update = trainer.step

    def after_backward(self, trainer: Trainer) -> None:
        if self.masks:
            mask_gradients(trainer.module, self.masks)

    def after_step(self, trainer: Trainer) -> None:
        if self.schedule is not None and self.schedule.should_update(trainer.step):
            self._update(trainer)
        if self.masks:
            apply_masks(trainer.module, self.masks)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_update": self.last_update,
            "sparsity": self.sparsity,
            "schedule": self.schedule.to_dict() if self.schedule else None,
            "scope": self.scope,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update = state.get("last_update")
        if state.get("masks"):
            self.masks = dict(state["masks"])
        self._restored = True


# --------------------------------------------------------------------------------------------
# trainer


@dataclass
class TrainResult:
    steps: int  # the step counter at the end (total, also after a resume)
    start_step: int  # 0, or the step a resume continued from
    seconds: float  # wall time of this run
    images_per_s: float  # over all ranks
    s_per_step: float
    losses: dict[str, float]  # mean of the last steps
    metrics: dict[str, Any]  # last evaluation (empty without a validation set)
    checkpoint: Path | None
    kind: str = "dense"
    sparsity: float | None = None  # of the masks, for masked training
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return sum(self.losses.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "start_step": self.start_step,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "s_per_step": self.s_per_step,
            "losses": dict(self.losses),
            "sparsity": self.sparsity,
        }


class _ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that can skip the start of one epoch."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


def _make_loader(dataset: Dataset, batch_size: int, sampler: _ResumableSampler, num_workers: int, seed: int) -> DataLoader:
    from .data import make_loader

    drop_last = len(sampler) >= batch_size
    return make_loader(
        dataset, batch_size, shuffle=False, num_workers=num_workers, sampler=sampler, seed=seed, drop_last=drop_last
    )


def lr_factor(step: int, total: int, cfg: TrainSection) -> float:
    """Multiplier of ``cfg.lr`` for the optimizer step after ``step`` completed steps."""
    warm = cfg.warmup_steps
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return 0.1 ** sum(1 for m in cfg.step_milestones if step >= m * total)
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("numpy"):
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _to_device(images: Sequence[torch.Tensor], targets: Sequence[dict[str, Any]], device: torch.device):
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: v.to(device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


_HOOK_ORDER = {"MaskHook": 0, "EvalHook": 1, "CheckpointHook": 2}


class Trainer:
    """Train a detector (dense, channel-pruned or masked) for ``cfg.steps`` (or ``cfg.epochs``).

    ``out`` is the checkpoint path: periodic checkpoints (every ``cfg.checkpoint_every`` steps, with
    the optimizer/scheduler/RNG state) and the final one are written there, keeping ``spec``,
    ``kind``, ``plan`` and ``recipe`` so :func:`surgery.checkpoint.load` rebuilds the same
    structure. ``masks`` (``{param name: bool}``) are re-applied after every step; a masked model
    is saved as ``kind="masked"`` unless it is also ``structured``.

    Built-in hooks are added when not given: a :class:`MaskHook` for ``masks``, an
    :class:`EvalHook` for ``val_set`` (every ``cfg.eval_every`` steps and at the end) and a
    :class:`CheckpointHook` for ``out``.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        train_set: Dataset,
        cfg: TrainSection,
        *,
        val_set: Dataset | None = None,
        out: str | Path | None = None,
        hooks: Sequence[HookBase] = (),
        device: str | torch.device = "cpu",
        masks: dict[str, torch.Tensor] | None = None,
        kind: str = "dense",
        plan: dict[str, Any] | None = None,
        recipe: Any = None,
        metrics: dict[str, Any] | None = None,
        dist_info: DistInfo | None = None,
        num_workers: int = 0,
        find_unused_parameters: bool = True,
        eval_batch_size: int = 8,
        eval_max_images: int | None = None,
    ) -> None:
        self.dist = dist_info or _current_dist()
        self.device = self.dist.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for but CUDA is not available")
        self.module = unwrap(model).to(self.device)
        self.model: nn.Module = self.module
        self.spec = spec
        self.train_set = train_set
        self.val_set = val_set
        self.cfg = cfg
        self.out = Path(out) if out is not None else None
        self.initial_masks = masks
        self.kind = kind
        self.plan = plan
        self.recipe = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
        self.base_metrics = dict(metrics or {})
        self.num_workers = num_workers
        self.find_unused_parameters = find_unused_parameters

        hooks = list(hooks)
        if masks is not None and not any(isinstance(h, MaskHook) for h in hooks):
            hooks.append(MaskHook(masks))
        if val_set is not None and not any(isinstance(h, EvalHook) for h in hooks):
            hooks.append(EvalHook(val_set, cfg.eval_every, batch_size=eval_batch_size, max_images=eval_max_images))
        if self.out is not None and not any(isinstance(h, CheckpointHook) for h in hooks):
            hooks.append(CheckpointHook(self.out, cfg.checkpoint_every))
        # masks first (everything after sees zeroed weights), then evaluation, then checkpoints
        self.hooks = sorted(hooks, key=lambda h: _HOOK_ORDER.get(type(h).__name__, 3))
        if self.out is None:
            ck = next((h for h in self.hooks if isinstance(h, CheckpointHook)), None)
            self.out = ck.path if ck else None

        self.step = 0
        self.start_step = 0
        self.epoch = 0
        self.total_steps = cfg.steps
        self.history: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}
        self.last_losses: dict[str, float] = {}
        self._recent: deque[dict[str, float]] = deque(maxlen=max(1, cfg.log_every))
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.seconds = 0.0

    # ---------------------------------------------------------------- properties

    @property
    def masks(self) -> dict[str, torch.Tensor] | None:
        for h in self.hooks:
            if isinstance(h, MaskHook) and h.masks is not None:
                return h.masks
        return self.initial_masks

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else self.cfg.lr

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world_size

    @property
    def use_amp(self) -> bool:
        return bool(self.cfg.amp) and self.device.type == "cuda"

    # ---------------------------------------------------------------- setup

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        decay, no_decay = [], []
        for p in self.module.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)  # no decay on biases and norm layers
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        return torch.optim.AdamW(groups, lr=cfg.lr)

    def _setup(self) -> None:
        cfg = self.cfg
        self.sampler = _ResumableSampler(
            self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=cfg.seed
        )
        self.loader = _make_loader(self.train_set, cfg.batch_size, self.sampler, self.num_workers, cfg.seed)
        self.batches_per_epoch = len(self.loader)
        if self.batches_per_epoch == 0:
            raise DataError(f"the training set has {len(self.train_set)} images: not one batch of {cfg.batch_size}")
        if cfg.epochs is not None:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.batches_per_epoch))
        else:
            self.total_steps = cfg.steps
        self.optimizer = self._build_optimizer()
        # reads total_steps at every step: a hook may still set it during the warm-up (time budgets)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, cfg)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.module.train()
        if self.dist.distributed and dist.is_initialized():
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                self.module, device_ids=ids, find_unused_parameters=self.find_unused_parameters
            )

    def _batches(self) -> Iterator[Any]:
        """Cycle over epochs endlessly, starting at the position of ``self.step``."""
        self.epoch, offset = divmod(self.step, self.batches_per_epoch)
        self.sampler.skip = offset * self.cfg.batch_size
        while True:
            self.sampler.set_epoch(self.epoch)
            yield from self.loader
            self.epoch += 1

    # ---------------------------------------------------------------- state

    def _hook_keys(self) -> list[str]:
        """``ClassName:n`` (n-th hook of that class): stable when other hooks are added or removed."""
        seen: dict[str, int] = {}
        keys = []
        for h in self.hooks:
            name = type(h).__name__
            keys.append(f"{name}:{seen.get(name, 0)}")
            seen[name] = seen.get(name, 0) + 1
        return keys

    def train_state(self, full_state: bool = True) -> dict[str, Any]:
        """What a checkpoint records for ``--resume``."""
        state: dict[str, Any] = {
            "step": self.step,
            "epoch": self.epoch,
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "finished": self.step >= self.total_steps,
            "hooks": {k: h.state_dict() for k, h in zip(self._hook_keys(), self.hooks, strict=True)},
            "history": list(self.history),
        }
        if full_state:
            assert self.optimizer is not None and self.scheduler is not None and self.scaler is not None
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
            state["scaler"] = self.scaler.state_dict() if self.use_amp else None
            state["rng"] = _rng_state()
        return state

    def save(self, path: str | Path, full_state: bool = True) -> Path | None:
        """Write a checkpoint (rank 0 only; other ranks return ``None``)."""
        if not self.dist.is_main:
            return None
        masks = self.masks
        kind = self.kind
        if masks and kind == "dense":
            kind = "masked"
        metrics = {**self.base_metrics, **self.metrics}
        metrics["train"] = {
            "steps": self.step,
            "losses": self._mean_losses(),
            **({"sparsity": masks_sparsity(masks)} if masks else {}),
        }
        return save_checkpoint(
            path,
            self.module,
            self.spec,
            kind=kind,
            plan=self.plan,
            masks=masks,
            recipe=self.recipe,
            metrics=metrics,
            train_state=self.train_state(full_state),
        )

    def _resume(self) -> bool:
        """Restore the state saved at ``out``; ``False`` when there is nothing to resume from."""
        if self.out is None or not self.out.exists():
            return False
        ckpt = read_checkpoint(self.out)
        ts = ckpt.train_state
        if not ts or "step" not in ts:
            raise CheckpointError(f"{self.out} has no training state to resume from")
        try:
            self.module.load_state_dict(ckpt.state_dict, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"cannot resume from {self.out}: it does not match this model ({str(e).splitlines()[0]})"
            ) from e
        assert self.optimizer is not None and self.scheduler is not None and self.scaler is not None
        if ts.get("optimizer"):
            self.optimizer.load_state_dict(ts["optimizer"])
        self.step = int(ts["step"])
        if ts.get("scheduler"):
            self.scheduler.load_state_dict(ts["scheduler"])
        else:  # a final checkpoint keeps no optimizer state: continue the schedule from the step
            self.scheduler.last_epoch = self.step
            for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr(), strict=True):
                g["lr"] = lr
        if ts.get("scaler") and self.use_amp:
            self.scaler.load_state_dict(ts["scaler"])
        if ts.get("rng") and self.dist.is_main:
            _set_rng_state(ts["rng"])
        else:  # other ranks: a fresh, distinct stream
            _seed_everything(self.cfg.seed + self.dist.rank + 1000 * self.step)
        self.history = list(ts.get("history") or [])
        if self.history:
            self.metrics = {k: v for k, v in self.history[-1].items() if k != "step"}
        hook_states = ts.get("hooks") or {}
        for key, h in zip(self._hook_keys(), self.hooks, strict=True):
            st = hook_states.get(key)
            if st is not None:
                if isinstance(h, MaskHook):
                    st = {**st, "masks": ckpt.masks}
                h.load_state_dict(st)
        if ckpt.masks and self.initial_masks is None:
            self.initial_masks = ckpt.masks
        return True

    def _mean_losses(self) -> dict[str, float]:
        if not self._recent:
            return {}
        keys = self._recent[-1].keys()
        return {k: sum(r.get(k, 0.0) for r in self._recent) / len(self._recent) for k in keys}

    # ---------------------------------------------------------------- loop

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        values = {k: float(v.detach()) for k, v in losses.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        any_bad = bool(bad)
        if self.dist.distributed and dist.is_initialized():
            flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            any_bad = flag.item() > 0
        if any_bad:
            step = self.step + 1
            what = (
                ", ".join(f"'{k}' = {values[k]}" for k in bad)
                if bad
                else f"a loss on another rank (this is rank {self.dist.rank})"
            )
            for h in self.hooks:
                if isinstance(h, CheckpointHook):
                    h.discard()  # unproven weights of the step that diverged
            saved = next((h.last_saved for h in self.hooks if isinstance(h, CheckpointHook)), None)
            kept = (
                f"; the last good checkpoint {self.out} (step {saved}) was kept"
                if saved is not None
                else (f"; {self.out} was not written" if self.out else "")
            )
            raise TrainingError(
                f"training diverged at step {step}/{self.total_steps}: non-finite loss {what}{kept}. "
                "Try a lower --lr, a longer warm-up or gradient clipping."
            )
        return values

    def _train_step(self, images: Any, targets: Any) -> None:
        assert self.optimizer is not None and self.scheduler is not None and self.scaler is not None
        images, targets = _to_device(images, targets, self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            losses = self.model(list(images), list(targets))
        if not isinstance(losses, dict) or not losses:
            raise TrainingError(
                f"model {self.spec.name!r} returned {type(losses).__name__} in training mode, not a dict of losses"
            )
        values = self._check_finite(losses)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.use_amp:
            self.scaler.unscale_(self.optimizer)
        for h in self.hooks:
            h.after_backward(self)
        if self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.last_losses = values
        self._recent.append(values)

    def train(self, resume: bool = False) -> TrainResult:
        """Run to ``total_steps``. With ``resume`` continue from the checkpoint at ``out`` (when it
        exists): weights, step, optimizer, scheduler, RNG, mask schedule and data position."""
        if self.out is not None and self.dist.is_main:
            check_output(self.out, what="training output")  # before any work, not after it
        self._setup()
        self.step = 0
        resumed = resume and self._resume()
        if not resumed:
            _seed_everything(self.cfg.seed + self.dist.rank)
        self.start_step = self.step
        for h in self.hooks:
            h.before_train(self)
        t0 = time.perf_counter()
        batches = self._batches()
        while self.step < self.total_steps:
            images, targets = next(batches)[:2]
            self._train_step(images, targets)
            self.step += 1
            for h in self.hooks:
                h.after_step(self)
        self.seconds = time.perf_counter() - t0
        for h in self.hooks:
            h.after_train(self)
        if self.dist.distributed and dist.is_initialized():
            dist.barrier()
        done = self.step - self.start_step
        masks = self.masks
        return TrainResult(
            steps=self.step,
            start_step=self.start_step,
            seconds=self.seconds,
            images_per_s=done * self.global_batch / self.seconds if self.seconds > 0 else 0.0,
            s_per_step=self.seconds / done if done else 0.0,
            losses=self._mean_losses(),
            metrics=dict(self.metrics),
            checkpoint=self.out if self.out is not None and self.dist.is_main else None,
            kind="masked" if masks and self.kind == "dense" else self.kind,
            sparsity=masks_sparsity(masks) if masks else None,
            history=list(self.history),
        )
