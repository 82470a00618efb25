"""Exponential moving average of the weights while training (what Ultralytics and timm evaluate).

:class:`EMAHook` keeps a shadow copy of the model's floating-point state (parameters and norm
statistics), updated after every optimizer step with decay ``min(decay, (1 + t) / (10 + t))``
(the ramp keeps the first steps' random or freshly cut weights from dominating a short run), and
puts the shadow into the model when training ends, so evaluation and the saved checkpoint use the
averaged weights. Periodic checkpoints keep the raw weights and the shadow in the hook's state,
so ``--resume`` continues both exactly. Recipe key: ``train.ema`` / ``retrain.ema`` (0: off).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .hooks import HookBase

if TYPE_CHECKING:
    from .train import Trainer


class EMAHook(HookBase):
    edits_weights = True  # build_trainer runs it before evaluation and checkpoints

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] | None = None
        self.updates = 0
        self._restored: dict[str, Any] | None = None

    def before_train(self, trainer: Trainer) -> None:
        state = trainer.module.state_dict()
        if self._restored is not None and self._restored.get("shadow"):
            self.shadow = {k: v.to(state[k].device) for k, v in self._restored["shadow"].items()}
            self.updates = int(self._restored.get("updates", 0))
        else:
            self.shadow = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        assert self.shadow is not None
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in trainer.module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)

    @torch.no_grad()
    def after_train(self, trainer: Trainer) -> None:
        if self.shadow is None or trainer.step == trainer.start_step:
            return  # a finished run resumed: the model already holds the averaged weights
        trainer.module.load_state_dict({**trainer.module.state_dict(), **self.shadow})

    def state_dict(self) -> dict[str, Any]:
        shadow = {k: v.detach().cpu() for k, v in self.shadow.items()} if self.shadow else None
        return {"decay": self.decay, "updates": self.updates, "shadow": shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state)


__all__ = ["EMAHook"]
