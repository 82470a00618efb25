"""Hooks around the training loop (detectron2's ``HookBase`` style), each owning one concern.

The :class:`~surgery.training.train.Trainer` calls every hook in the order it was registered:

- ``resume(trainer)`` once, when ``train(resume=True)`` is asked for, before anything else;
- ``before_train(trainer)``;
- per step: ``loss_terms(trainer, images, targets)`` after the model's forward (extra loss terms,
  e.g. distillation), ``after_backward(trainer)`` before clipping and the optimizer step,
  ``after_step(trainer)`` after it;
- ``after_train(trainer)``.

A hook may also bring ``modules()`` whose parameters the optimizer trains with the model (the
adaptation layers of feature imitation): they are moved to the trainer's device, averaged across
ranks under DDP and saved in the hook's own ``state_dict`` (never in the model's checkpoint).

:func:`surgery.training.train.build_trainer` assembles the usual list: masks, evaluation, checkpoints,
then the caller's hooks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..detectors.builders import ModelSpec
from ..errors import CheckpointError, TrainingError
from ..measure.evaluate import evaluate
from ..pruning.masked import AGPSchedule, apply_masks, magnitude_masks, mask_gradients, masks_sparsity, unwrap
from ..pruning.plan import Plan
from ..storage.checkpoint import read_checkpoint, save_checkpoint
from ..storage.safety import check_output, clean_stale_temporaries

if TYPE_CHECKING:
    from .train import Trainer


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

    def resume(self, trainer: Trainer) -> None:
        """Restore saved training state (only the hook that owns checkpoints does)."""

    def before_train(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has restored the state)."""

    def loss_terms(self, trainer: Trainer, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Extra loss terms for this step, added to the model's losses (and logged by name)."""
        return {}

    def after_backward(self, trainer: Trainer) -> None:
        """After the gradients exist (unscaled), before clipping and the optimizer step."""

    def after_step(self, trainer: Trainer) -> None:
        """After each optimizer step; ``trainer.step`` is already incremented."""

    def after_train(self, trainer: Trainer) -> None:
        """After the last step (not called when training stops with an error)."""

    def on_abort(self, trainer: Trainer) -> None:
        """Training stopped by an exception or Ctrl-C: drop what is not finished (temporaries)."""

    def on_divergence(self, trainer: Trainer) -> None:
        """A loss was not finite: training stops with an error after this."""

    def modules(self) -> list[nn.Module]:
        """Extra modules the optimizer trains along with the model."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints for ``--resume``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class TeacherHook(HookBase):
    """What the distillation hooks share (:class:`surgery.training.distill.FeatureImitation`,
    :class:`surgery.yolo.distill.YoloDistillation`): a frozen teacher in eval mode, 1x1 adaptation
    layers (student width -> teacher width, per feature level) the optimizer trains with the
    student, and forward hooks on the student that record what it saw each step (``_seen``),
    registered by the subclass in ``before_train`` and removed after training."""

    def __init__(self, teacher: nn.Module, cfg: Any, *, teacher_path: str | None = None) -> None:
        self.cfg = cfg
        self.teacher_path = teacher_path
        self.teacher = unwrap(teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self._handles: list[Any] = []
        self._seen: dict[str, Any] = {}

    def set_adapters(self, widths: dict[str, tuple[int, int]]) -> None:
        """One 1x1 convolution per level: ``{level: (student channels, teacher channels)}``."""
        self.adapters = nn.ModuleDict({lv: nn.Conv2d(s, t, kernel_size=1) for lv, (s, t) in widths.items()})

    def modules(self) -> list[nn.Module]:
        return [self.adapters]

    def before_train(self, trainer: Trainer) -> None:
        self.teacher.to(trainer.device)

    def after_train(self, trainer: Trainer) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen.clear()


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
        self.callback(
            StepInfo(
                step=trainer.step,
                total=trainer.total_steps,
                losses={k: v / self._n for k, v in self._sums.items()},
                lr=trainer.lr,
                images_per_s=self._n * trainer.global_batch / elapsed,
                epoch=trainer.epoch,
                seconds=run_s,
                eta_s=run_s / max(done, 1) * (trainer.total_steps - trainer.step),
            )
        )
        self._reset(now)


class EvalHook(HookBase):
    """Evaluate on ``dataset`` every ``every`` steps (0: only at the end) and after training.

    Runs on rank 0 with :func:`surgery.measure.evaluate.evaluate`; each result is appended to
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


class CheckpointWriter:
    """What the checkpoint hooks share: the file, what it records (``spec``, ``kind``, ``plan``,
    ``recipe``, ``metrics``, ``class_names``, so :func:`surgery.storage.checkpoint.load` rebuilds the same
    structure), the last step written and the best evaluation so far. Rank 0 writes; writes are
    atomic."""

    def __init__(
        self, path: str | Path, spec: ModelSpec, *, kind: str = "dense", plan: Plan | None = None, recipe: Any = None,
        metrics: dict[str, Any] | None = None, class_names: list[str] | None = None,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        self.spec = spec
        self.kind = kind
        self.plan = plan
        self.recipe = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
        self.base_metrics = dict(metrics or {})
        self.class_names = class_names
        self.last_saved: int | None = None
        self.best: dict[str, Any] | None = None  # {"step": ..., "mAP": ...} of the best checkpoint

    def save(self, trainer: Trainer, full_state: bool = True, path: Path | None = None) -> Path | None:
        """Write the checkpoint to ``path`` (default: the writer's; rank 0 only, other ranks
        return ``None``)."""
        if not trainer.dist.is_main:
            return None
        masks = trainer.masks
        metrics = {**self.base_metrics, **trainer.metrics}
        metrics["train"] = {
            "steps": trainer.step,
            "losses": trainer.mean_losses(),
            **({"sparsity": masks_sparsity(masks)} if masks else {}),
            **({"best": dict(self.best)} if self.best else {}),
        }
        written = save_checkpoint(
            path or self.path, trainer.module, self.spec, kind=trainer.kind, plan=self.plan, masks=masks,
            recipe=self.recipe, metrics=metrics, train_state=trainer.state_dict(full_state), class_names=self.class_names,
        )  # fmt: skip
        if path is None:
            self.last_saved = trainer.step
        return written


class CheckpointHook(HookBase):
    """A hook that writes through a shared :class:`CheckpointWriter` (``path`` and ``last_saved``
    are the writer's). :func:`checkpoint_hooks` gives the usual four: resume, hold-until-finite,
    best, periodic."""

    def __init__(self, writer: CheckpointWriter) -> None:
        self.writer = writer

    @property
    def path(self) -> Path:
        return self.writer.path

    @property
    def last_saved(self) -> int | None:
        return self.writer.last_saved


class ResumeHook(CheckpointHook):
    """On ``resume``: restore the model, masks and training state from the writer's file."""

    def resume(self, trainer: Trainer) -> None:
        path = self.writer.path
        if not path.exists():
            return
        ckpt = read_checkpoint(path)
        ts = ckpt.train_state
        if not ts or "step" not in ts:
            raise CheckpointError(f"{path} has no training state to resume from")
        try:
            trainer.module.load_state_dict(ckpt.state_dict, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"cannot resume from {path}: it does not match this model ({str(e).splitlines()[0]})"
            ) from e
        if ckpt.masks:
            trainer.masks = dict(ckpt.masks)
        trainer.load_state_dict(ts)
        self.writer.last_saved = trainer.step


class HoldUntilFiniteHook(CheckpointHook):
    """The weights after step N have not been evaluated yet: a periodic save writes them to a
    pending file (:meth:`hold`) that replaces the checkpoint only once step N+1's loss on them is
    finite. A divergence therefore keeps the last state that was proven finite, never the update
    that destroyed the model; after training, non-finite weights are one clear error."""

    def __init__(self, writer: CheckpointWriter) -> None:
        super().__init__(writer)
        self.pending: tuple[int, Path] | None = None

    def hold(self, trainer: Trainer) -> None:
        self.discard()
        if not _params_finite(trainer.module):
            return  # the next loss check reports the divergence
        path = self.writer.path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.pending.tmp")
        if self.writer.save(trainer, full_state=True, path=tmp) is not None:
            self.pending = (trainer.step, tmp)

    def after_backward(self, trainer: Trainer) -> None:
        # this step's loss, computed on the pending weights, was finite: they are the last good state
        if self.pending is not None:
            step, tmp = self.pending
            self.pending = None
            check_output(self.writer.path)
            os.replace(tmp, self.writer.path)
            self.writer.last_saved = step

    def on_divergence(self, trainer: Trainer) -> None:
        self.discard()  # unproven weights of the step that diverged

    def on_abort(self, trainer: Trainer) -> None:
        self.discard()  # stopped by an error or Ctrl-C: the pending file is not a checkpoint

    def discard(self) -> None:
        if self.pending is not None:
            self.pending[1].unlink(missing_ok=True)
            self.pending = None

    def after_train(self, trainer: Trainer) -> None:
        self.discard()
        if not _params_finite(trainer.module):
            path, last = self.writer.path, self.writer.last_saved
            kept = f"{path} (step {last}) was kept" if last is not None else f"{path} was not written"
            raise TrainingError(f"training diverged in the last step: the weights are not finite; {kept}")


class BestCheckpointHook(CheckpointHook):
    """Write ``best_path`` whenever a step's evaluation (the EvalHook runs first) beats the best
    validation mAP so far."""

    def __init__(self, writer: CheckpointWriter, best_path: str | Path) -> None:
        super().__init__(writer)
        self.best_path = Path(best_path)

    def _keep_best(self, trainer: Trainer) -> None:
        last = trainer.history[-1] if trainer.history else None
        if last is None or last.get("step") != trainer.step or "mAP" not in last:
            return
        best = self.writer.best
        if best is not None and (best["step"] == trainer.step or last["mAP"] <= best["mAP"]):
            return
        self.writer.best = {"step": trainer.step, "mAP": float(last["mAP"])}
        self.writer.save(trainer, full_state=False, path=self.best_path)

    def after_step(self, trainer: Trainer) -> None:
        self._keep_best(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._keep_best(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.writer.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.writer.best = state.get("best")


class PeriodicCheckpointHook(CheckpointHook):
    """Every ``every`` steps save the full training state (for ``--resume``; through ``hold``, the
    :class:`HoldUntilFiniteHook`, when given), and the final checkpoint after training."""

    def __init__(self, writer: CheckpointWriter, every: int = 200, hold: HoldUntilFiniteHook | None = None) -> None:
        super().__init__(writer)
        self.every = every
        self.hold = hold

    def before_train(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            check_output(self.writer.path, what="training output")  # before the first step, not after the last
            clean_stale_temporaries(self.writer.path.parent, self.writer.path.name)  # a killed run's pending checkpoint

    def after_step(self, trainer: Trainer) -> None:
        if self.every > 0 and trainer.step % self.every == 0 and trainer.step < trainer.total_steps:
            if self.hold is not None:
                self.hold.hold(trainer)
            elif _params_finite(trainer.module):
                self.writer.save(trainer, full_state=True)

    def after_train(self, trainer: Trainer) -> None:
        self.writer.save(trainer, full_state=False)


def checkpoint_hooks(
    path: str | Path, spec: ModelSpec, every: int = 200, *, best_path: str | Path | None = None, **record: Any,
) -> list[CheckpointHook]:
    """The checkpoint at ``path``, in this order: resume from it, hold each periodic save until
    it is proven finite, the best by validation mAP at ``best_path`` (when given), the periodic and
    final saves. ``record``: ``kind``, ``plan``, ``recipe``, ``metrics``, ``class_names``."""
    writer = CheckpointWriter(path, spec, **record)
    hold = HoldUntilFiniteHook(writer)
    best = [BestCheckpointHook(writer, best_path)] if best_path is not None else []
    return [ResumeHook(writer), hold, *best, PeriodicCheckpointHook(writer, every, hold)]


def _params_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class MaskHook(HookBase):
    """Keep masked weights exactly zero: re-apply the masks after every optimizer step (and zero
    their gradients before it). The masks live in ``trainer.masks``, which this hook keeps.

    Given an :class:`~surgery.pruning.masked.AGPSchedule` instead of masks, recompute magnitude masks at
    the scheduled steps; the sparsity never decreases and pruned weights stay pruned (masks
    already in ``trainer.masks``, e.g. those of a masked checkpoint, are the starting point).
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
        if trainer.masks is not None and (self.masks is None or self._restored):
            self.masks = dict(trainer.masks)  # a masked checkpoint's or a resumed run's masks
        if self.masks is not None:
            params = dict(trainer.module.named_parameters())
            self.masks = {n: m.to(params[n].device, torch.bool) if n in params else m for n, m in self.masks.items()}
        if self.schedule is not None and not self._restored and self.schedule.should_update(trainer.step):
            self._update(trainer)
        self._apply(trainer)

    def _update(self, trainer: Trainer) -> None:
        assert self.schedule is not None
        target = self.schedule.sparsity_at(trainer.step)
        if self.masks is None and target <= 0.0:
            self.last_update = trainer.step
            return
        self.masks = magnitude_masks(trainer.module, target, self.scope, self.names, previous=self.masks)
        self.last_update = trainer.step

    def _apply(self, trainer: Trainer) -> None:
        if self.masks:
            apply_masks(trainer.module, self.masks)
            trainer.masks = self.masks
            if trainer.kind == "dense":
                trainer.kind = "masked"

    def after_backward(self, trainer: Trainer) -> None:
        if self.masks:
            mask_gradients(trainer.module, self.masks)

    def after_step(self, trainer: Trainer) -> None:
        if self.schedule is not None and self.schedule.should_update(trainer.step):
            self._update(trainer)
        self._apply(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_update": self.last_update,
            "sparsity": self.sparsity,
            "schedule": self.schedule.to_dict() if self.schedule else None,
            "scope": self.scope,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update = state.get("last_update")
        self._restored = True


__all__ = ["CheckpointHook", "EvalHook", "HookBase", "LoggingHook", "MaskHook", "StepInfo"]
