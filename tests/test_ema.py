"""EMA of the weights (surgery.training.ema): the saved model is the moving average of the raw weights,
with the documented decay ramp, and a killed run resumes to the same average."""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.storage.checkpoint import load_checkpoint
from surgery.training.train import HookBase, build_trainer
from tests.test_train import SPEC, Shapes, _cfg, _model, reference_and_killed


class RawWeights(HookBase):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def after_step(self, trainer) -> None:
        self.states.append({k: v.detach().clone() for k, v in trainer.module.state_dict().items()})


def test_ema_weights_are_the_moving_average_of_the_raw_weights(tmp_path: Path):
    model = _model()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rec = RawWeights()
    build_trainer(model, SPEC, Shapes(8), _cfg(steps=4, ema=0.5), hooks=[rec], out=tmp_path / "m.pt").train()
    expected = {k: v.clone() for k, v in start.items() if v.is_floating_point()}
    for t, raw in enumerate(rec.states, start=1):
        d = min(0.5, (1 + t) / (10 + t))
        for k in expected:
            expected[k] = expected[k] * d + raw[k] * (1 - d)
    saved, _ = load_checkpoint(tmp_path / "m.pt")
    for k, v in expected.items():
        torch.testing.assert_close(saved.state_dict()[k], v, atol=1e-6, rtol=1e-5)
    k = "head.classification_head.cls_logits.weight"
    assert not torch.allclose(saved.state_dict()[k], rec.states[-1][k])  # not the raw weights


def test_ema_run_resumes_after_a_kill(tmp_path: Path):
    cfg = _cfg(steps=6, checkpoint_every=2, ema=0.9)
    ref, out = reference_and_killed(cfg, tmp_path)
    resumed = _model(seed=123)
    build_trainer(resumed, SPEC, Shapes(12), cfg, out=out).train(resume=True)
    for k, v in ref.state_dict().items():
        assert torch.allclose(v.float(), resumed.state_dict()[k].float(), atol=1e-5), k
