"""BatchNorm recalibration after a cut: statistics re-estimated, weights untouched, modes restored."""

from __future__ import annotations

import torch

from surgery.data import build_dataset
from surgery.models import build_model
from surgery.prune import prune_model
from surgery.recipe import PruneSection
from surgery.train import recalibrate_batchnorm


def test_recalibration_reestimates_running_stats(tmp_path) -> None:
    ds = build_dataset("synthetic", "train", train=False, synth_root=tmp_path, images=12, size=64, seed=3)
    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=64, max_size=64)
    prune_model(model, PruneSection(ratio=0.5))
    model.eval()
    bn = model.backbone.body.layer2[0].bn1
    stale_mean = bn.running_mean.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    used = recalibrate_batchnorm(model, ds, 2, batch_size=4)
    assert used == 2
    assert not torch.allclose(bn.running_mean, stale_mean)
    assert bn.momentum == 0.1 and not model.training
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    # the statistics are what the layer sees now: a second run on the same batches agrees
    again = bn.running_mean.clone()
    recalibrate_batchnorm(model, ds, 2, batch_size=4)
    torch.testing.assert_close(bn.running_mean, again)
