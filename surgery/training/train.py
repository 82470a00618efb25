"""A small detection trainer with hooks (in the style of detectron2's ``SimpleTrainer``).

:class:`Trainer` runs a step-based loop over a :class:`~torch.utils.data.Dataset` of
``(image, target)`` items: SGD or AdamW, linear warm-up then cosine (or step, or constant) decay,
gradient clipping, AMP on CUDA, ``torchrun`` data parallelism and NaN/inf detection. Everything
else is a hook (:mod:`surgery.training.hooks`), called in registration order: masks, evaluation,
checkpoints and resume, logging, extra loss terms and the modules they train (distillation).
:func:`build_trainer` assembles the usual hooks for a model to be saved as a surgery checkpoint.

The library never prints.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..config.recipe import TrainSection
from ..data import make_loader
from ..detectors.builders import ModelSpec
from ..errors import DataError, TrainingError
from ..pruning.masked import masks_sparsity, unwrap
from ..pruning.plan import Plan
from .distributed import DistInfo, average_gradients, current_dist, destroy_distributed, init_distributed
from .ema import EMAHook
from .hooks import CheckpointHook, EvalHook, HookBase, LoggingHook, MaskHook, StepInfo, checkpoint_hooks


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


class Trainer:
    """Train a detector for ``cfg.steps`` (or ``cfg.epochs``), calling ``hooks`` in order.

    Args:
        model: the detector (torchvision interface: a dict of losses in train mode).
        train_set: ``(image, target)`` items.
        cfg: optimizer, schedule, batch size, clipping, AMP, seed.
        hooks: see :mod:`surgery.training.hooks`; :func:`build_trainer` gives the usual ones.
        device: ``cpu`` or ``cuda`` (``cuda:LOCAL_RANK`` under torchrun).
        dist_info: the process group (default: the current one).
        num_workers: data loader worker processes.
        find_unused_parameters: passed to DDP (heads that skip a branch for an image).

    State hooks may read or set: ``module`` (the unwrapped model), ``step``, ``total_steps``,
    ``masks`` (kept by :class:`~surgery.training.hooks.MaskHook`), ``kind``, ``metrics``, ``history``,
    ``last_losses``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        cfg: TrainSection,
        *,
        hooks: Sequence[HookBase] = (),
        device: str | torch.device = "cpu",
        dist_info: DistInfo | None = None,
        num_workers: int = 0,
        find_unused_parameters: bool = True,
    ) -> None:
        self.dist = dist_info or current_dist()
        self.device = self.dist.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for but CUDA is not available")
        self.module = unwrap(model).to(self.device)
        self.model: nn.Module = self.module
        self.train_set = train_set
        self.cfg = cfg
        self.hooks = list(hooks)
        self.num_workers = num_workers
        self.find_unused_parameters = find_unused_parameters
        self.extra_modules = [m.to(self.device) for h in self.hooks for m in h.modules()]

        self.kind = "dense"
        self.masks: dict[str, torch.Tensor] | None = None
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
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else self.cfg.lr

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world_size

    @property
    def use_amp(self) -> bool:
        return bool(self.cfg.amp) and self.device.type == "cuda"

    @property
    def checkpoint_path(self) -> Path | None:
        ck = next((h for h in self.hooks if isinstance(h, CheckpointHook)), None)
        return ck.path if ck is not None else None

    # ---------------------------------------------------------------- setup

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        decay, no_decay = [], []
        params = [p for m in [self.module, *self.extra_modules] for p in m.parameters()]
        for p in params:
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
        for m in self.extra_modules:
            m.train()
        if self.dist.distributed and dist.is_initialized():
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            if not self.dist.is_main:  # DDP's find_unused_parameters notice: once (rank 0), not once per rank
                import warnings

                warnings.filterwarnings("ignore", message=".*find_unused_parameters=True.*")
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

    def state_dict(self, full_state: bool = True) -> dict[str, Any]:
        """The training state a checkpoint records for ``--resume`` (weights are saved apart)."""
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

    def load_state_dict(self, ts: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: step, optimizer, scheduler, RNG, history, hook states."""
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
            if hook_states.get(key) is not None:
                h.load_state_dict(hook_states[key])

    def mean_losses(self) -> dict[str, float]:
        """Each loss term averaged over the last ``cfg.log_every`` steps."""
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
                h.on_divergence(self)
            out = self.checkpoint_path
            saved = next((h.last_saved for h in self.hooks if isinstance(h, CheckpointHook)), None)
            kept = (
                f"; the last good checkpoint {out} (step {saved}) was kept"
                if saved is not None
                else (f"; {out} was not written" if out else "")
            )
            raise TrainingError(
                f"training diverged at step {step}/{self.total_steps}: non-finite loss {what}{kept}. "
                "Try a lower --lr, a longer warm-up or gradient clipping."
            )
        return values

    def _train_step(self, images: Any, targets: Any) -> None:
        assert self.optimizer is not None and self.scheduler is not None and self.scaler is not None
        images, targets = _to_device(images, targets, self.device)
        images, targets = list(images), list(targets)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            losses = self.model(images, targets)
            if not isinstance(losses, dict) or not losses:
                raise TrainingError(f"the model returned {type(losses).__name__} in training mode, not a dict of losses")
            for h in self.hooks:
                losses = {**losses, **h.loss_terms(self, images, targets)}
        values = self._check_finite(losses)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.use_amp:
            self.scaler.unscale_(self.optimizer)
        average_gradients((p for m in self.extra_modules for p in m.parameters()), self.dist)
        for h in self.hooks:
            h.after_backward(self)
        if self.cfg.clip_grad:
            params = [p for m in [self.module, *self.extra_modules] for p in m.parameters()]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.last_losses = values
        self._recent.append(values)

    def train(self, resume: bool = False) -> TrainResult:
        """Run to ``total_steps``. With ``resume`` the hook that owns the checkpoint restores the
        saved state first (weights, step, optimizer, scheduler, RNG, masks, data position)."""
        self._setup()
        self.step = 0
        if resume:
            for h in self.hooks:
                h.resume(self)
        if self.step == 0:
            _seed_everything(self.cfg.seed + self.dist.rank)
        self.start_step = self.step
        for h in self.hooks:
            h.before_train(self)
        t0 = time.perf_counter()
        batches = self._batches()
        try:
            while self.step < self.total_steps:
                images, targets = next(batches)[:2]
                self._train_step(images, targets)
                self.step += 1
                for h in self.hooks:
                    h.after_step(self)
        except BaseException:  # Ctrl-C, a divergence, a full disk: hooks drop their temporaries
            for h in self.hooks:
                if hasattr(h, "on_abort"):
                    h.on_abort(self)
            raise
        self.seconds = time.perf_counter() - t0
        for h in self.hooks:
            h.after_train(self)
        if self.dist.distributed and dist.is_initialized():
            dist.barrier()
        done = self.step - self.start_step
        out = self.checkpoint_path
        return TrainResult(
            steps=self.step,
            start_step=self.start_step,
            seconds=self.seconds,
            images_per_s=done * self.global_batch / self.seconds if self.seconds > 0 else 0.0,
            s_per_step=self.seconds / done if done else 0.0,
            losses=self.mean_losses(),
            metrics=dict(self.metrics),
            checkpoint=out if out is not None and self.dist.is_main else None,
            kind=self.kind,
            sparsity=masks_sparsity(self.masks) if self.masks else None,
            history=list(self.history),
        )


def build_trainer(
    model: nn.Module,
    spec: ModelSpec,
    train_set: Dataset,
    cfg: TrainSection,
    *,
    val_set: Dataset | None = None,
    out: str | Path | None = None,
    hooks: Sequence[HookBase] = (),
    masks: dict[str, torch.Tensor] | None = None,
    kind: str = "dense",
    plan: Plan | None = None,
    recipe: Any = None,
    metrics: dict[str, Any] | None = None,
    eval_batch_size: int = 8,
    eval_max_images: int | None = None,
    best_path: str | Path | None = None,
    **trainer_kw: Any,
) -> Trainer:
    """A :class:`Trainer` with the usual hooks, in this order: masks (a :class:`MaskHook` for
    ``masks`` unless ``hooks`` has one), evaluation on ``val_set`` (unless ``hooks`` has an
    :class:`EvalHook`), the checkpoint at ``out`` recording ``spec``/``kind``/``plan``/``recipe``
    (unless ``hooks`` has a :class:`CheckpointHook`; ``best_path`` receives the best evaluated
    weights by validation mAP), then the rest of ``hooks`` as given.
    ``trainer_kw`` goes to :class:`Trainer` (``device``, ``dist_info``, ``num_workers``...)."""
    hooks = list(hooks)
    trained_kind = "masked" if masks and kind == "dense" else kind
    cfg = cfg.for_kind(trained_kind)  # a pruned model retrains at retrain.pruned_lr, the dense control at lr
    # hooks that change the weights after each step (masks, sparse training's proximal step) run
    # first, so a checkpoint written in the same step holds the weights they produced
    mask_hooks = [h for h in hooks if isinstance(h, MaskHook) or getattr(h, "edits_weights", False)]
    if masks is not None and not any(isinstance(h, MaskHook) for h in mask_hooks):
        mask_hooks = [MaskHook(masks), *mask_hooks]
    if cfg.ema > 0 and not any(isinstance(h, EMAHook) for h in hooks):
        mask_hooks.append(EMAHook(cfg.ema))  # after the masks: it averages masked weights
    ordered: list[HookBase] = list(mask_hooks)
    given_eval = [h for h in hooks if isinstance(h, EvalHook)]
    if given_eval:
        ordered += given_eval
    elif val_set is not None:
        ordered.append(EvalHook(val_set, cfg.eval_every, batch_size=eval_batch_size, max_images=eval_max_images))
    given_ck = [h for h in hooks if isinstance(h, CheckpointHook)]
    if given_ck:
        ordered += given_ck
    elif out is not None:
        ordered += checkpoint_hooks(out, spec, cfg.checkpoint_every, kind=kind, plan=plan, recipe=recipe,
                                    metrics=metrics, class_names=getattr(train_set, "class_names", None),
                                    best_path=best_path)
    ordered += [h for h in hooks if h not in ordered]
    trainer = Trainer(model, train_set, cfg, hooks=ordered, **trainer_kw)
    trainer.kind = trained_kind
    trainer.masks = dict(masks) if masks else None
    return trainer


__all__ = [
    "CheckpointHook", "DistInfo", "EvalHook", "HookBase", "LoggingHook", "MaskHook", "StepInfo", "TrainResult",
    "Trainer", "build_trainer", "destroy_distributed", "init_distributed", "lr_factor",
]  # fmt: skip
