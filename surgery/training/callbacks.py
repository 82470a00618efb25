"""How a workflow reports progress (:class:`Callbacks`), and the training hook that warns when the
warm-up is as long as the run (:class:`WarmupCheck`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .hooks import HookBase, StepInfo


@dataclass
class Callbacks:
    """How a workflow reports progress (all optional; called on rank 0 only)."""

    on_step: Callable[[StepInfo], None] | None = None  # every cfg.log_every steps
    on_eval_progress: Callable[[int, int], None] | None = None  # images evaluated, total
    on_eval: Callable[[int, dict[str, Any]], None] | None = None  # step, metrics
    on_note: Callable[[str], None] | None = None  # one-line notes (adjusted settings, resume)
    on_stage: Callable[[str], None] | None = None  # "preparing data", "training"...
    on_warning: Callable[[str], None] | None = None  # settings that defeat themselves (else on_note)

    def note(self, text: str) -> None:
        if self.on_note is not None:
            self.on_note(text)

    def warn(self, text: str) -> None:
        if self.on_warning is not None:
            self.on_warning(text)
        else:
            self.note(text)

    def stage(self, text: str) -> None:
        if self.on_stage is not None:
            self.on_stage(text)


class WarmupCheck(HookBase):
    """Says so when the warm-up is as long as the run: the learning rate would never reach its peak
    (``--steps 40`` with the default 100-step warm-up trains at a fraction of ``lr`` throughout)."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn

    def before_train(self, trainer: Any) -> None:
        cfg, total = trainer.cfg, trainer.total_steps
        if trainer.dist.is_main and cfg.warmup_steps >= total:
            peak = cfg.lr * min(1.0, total / max(1, cfg.warmup_steps))
            self.warn(f"warm-up ({cfg.warmup_steps} steps) >= the run ({total} steps): the learning rate never "
                      f"reaches lr {cfg.lr:g} (at most {peak:.3g}); pass --warmup-steps below {total}")
