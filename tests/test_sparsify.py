"""Prune-aware sparse training (surgery.pruning.sparsify): the channels the cut removes are driven to zero,
the cut then costs less, the run resumes after a kill, recipes and sweep techniques validate."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from surgery.config.recipe import PruneSection, SparsifySection, recipe_from_dict
from surgery.errors import RecipeError
from surgery.pruning.prune import prune_model
from surgery.pruning.sparsify import (
    SparsityHook,
    channel_norms,
    coupled_groups,
    group_lasso,
    growing_fraction,
)
from surgery.storage.checkpoint import read_checkpoint
from surgery.sweep import parse_technique
from surgery.training.train import build_trainer
from tests.test_train import SIZE, SPEC, Kill, Shapes, _cfg, _model

PRUNE = PruneSection(method="l1", ratio=0.5)


def _train(hooks=(), steps: int = 6, out: Path | None = None, model=None):
    model = model if model is not None else _model()
    build_trainer(model, SPEC, Shapes(12), _cfg(steps=steps, checkpoint_every=2), hooks=list(hooks), out=out).train(
        resume=out is not None and out.exists()
    )
    return model


def test_growing_fraction_sums_to_one_after_warmup():
    shares = [growing_fraction(t, 20, 5) for t in range(20)]
    assert shares[:5] == [0.0] * 5
    assert all(b > a for a, b in zip(shares[5:], shares[6:]))  # grows
    assert sum(shares) == pytest.approx(1.0)


def test_targeted_sparse_training_drives_the_cut_channels_down():
    plain = _train()
    hook = SparsityHook(_model(), SparsifySection(steps=6, warmup_steps=1), prune=PRUNE, ratio=0.5)
    sparse = _train([hook], model=hook._model)
    assert hook.targeted and len(hook.groups) > 5
    for g in hook.groups:
        assert g.targets is not None and g.targets.numel() > 0
        keep = torch.ones(g.channels, dtype=torch.bool)
        keep[g.targets] = False
        n_sparse, n_plain = channel_norms(sparse, g), channel_norms(plain, g)
        # the channels the cut removes are (near) zero; without the penalty they are not
        assert float(n_sparse[g.targets].max()) <= 0.05 * float(n_plain[g.targets].mean()), g.root
        assert float(n_sparse[keep].mean()) > 0.5 * float(n_plain[keep].mean()), g.root
    # and the cut at that ratio removes exactly those channels: it changes the outputs less
    images = [Shapes(2)[i][0] for i in range(2)]

    def head_out(m):
        with torch.no_grad():
            out = m.head(list(m.backbone(m.transform(images)[0].tensors).values()))
        return torch.cat([out["cls_logits"].flatten(), out["bbox_regression"].flatten()])

    def cut_change(m):  # relative change of the head's outputs (their shapes do not change)
        m = copy.deepcopy(m).eval()
        before = head_out(m)
        prune_model(m, PRUNE, trace_size=SIZE)
        return float((head_out(m) - before).abs().mean() / before.abs().mean())

    # (not 0: GroupNorm statistics in the head still see the removed channels' small values)
    assert cut_change(sparse) < 0.6 * cut_change(plain)


def test_untargeted_group_lasso_lowers_the_penalty_relative_to_no_penalty():
    plain = _train()
    _, groups = coupled_groups(plain, trace_size=SIZE)
    hook = SparsityHook(_model(), SparsifySection(steps=6, warmup_steps=0, weight=0.5, norm_weight=0.5))
    sparse = _train([hook], model=hook._model)
    assert not hook.targeted
    for g in groups:  # the same start scale for both runs
        g.scale = next(h.scale for h in hook.groups if h.root == g.root)
    assert group_lasso(sparse, hook.groups) < 0.8 * group_lasso(plain, groups)


def test_sparse_training_resumes_after_a_kill(tmp_path: Path):
    scfg = SparsifySection(steps=6, warmup_steps=1)
    ref_hook = SparsityHook(_model(), scfg, prune=PRUNE, ratio=0.5)
    ref = _train([ref_hook], out=tmp_path / "ref.pt", model=ref_hook._model)

    out = tmp_path / "run.pt"
    hook = SparsityHook(_model(), scfg, prune=PRUNE, ratio=0.5)
    with pytest.raises(KeyboardInterrupt):
        _train([hook, Kill(5)], out=out, model=hook._model)
    assert read_checkpoint(out).train_state["step"] == 4
    resumed_model = _model(seed=123)  # everything must come from the checkpoint, targets included
    hook2 = SparsityHook(resumed_model, scfg, prune=PRUNE, ratio=0.5)
    _train([hook2], out=out, model=resumed_model)
    ref_sd, res_sd = ref.state_dict(), resumed_model.state_dict()
    for k in ref_sd:
        assert torch.allclose(ref_sd[k].float(), res_sd[k].float(), atol=1e-5), k
    assert [g.targets.tolist() for g in hook2.groups] == [g.targets.tolist() for g in ref_hook.groups]


def test_recipe_section_and_technique_validate():
    r = recipe_from_dict({"prune": {"sparsify": {"steps": 50, "weight": 2.0}}})
    assert r.prune.sparsify == SparsifySection(steps=50, weight=2.0)
    with pytest.raises(RecipeError, match=r"prune\.sparsify.*an integer >= 0"):
        recipe_from_dict({"prune": {"sparsify": {"steps": 5, "warmup_steps": -1}}})
    with pytest.raises(RecipeError, match=r"prune\.sparsify.*> 0 \(or norm_weight > 0\)"):
        recipe_from_dict({"prune": {"sparsify": {"weight": 0.0}}})
    with pytest.raises(RecipeError, match=r"prune\.sparsify.*did you mean 'weight'"):
        recipe_from_dict({"prune": {"sparsify": {"wieght": 1}}})
    t = parse_technique("l1+sparse+distill")
    assert t.sparse and t.distill and t.criterion == "l1"
    with pytest.raises(RecipeError, match="'\\+sparse'"):
        parse_technique("sparse")


def test_sweep_sparse_variant_is_budget_fair(tmp_path: Path):
    """'+sparse': N sparse steps from the dense model + (budget - N) retraining steps; the row says
    whether the MACs target was met."""
    import csv

    from surgery.sweep import run_sweep

    recipe = recipe_from_dict({
        "model": {"name": "fcos_resnet18_slim", "kwargs": {"num_classes": 5, "min_size": 64, "max_size": 64}},
        "data": {"source": "synthetic", "images": 16, "size": 64, "root": str(tmp_path / "data")},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "retrain": {"steps": 3, "batch_size": 4, "warmup_steps": 0},
        "prune": {"min_channels": 4, "sparsify": {"steps": 1, "warmup_steps": 0}},
        "sweep": {"ratios": [], "target_macs": [0.5], "techniques": ["l1+sparse"], "sparsities": [],
                  "match_masked": False, "out": str(tmp_path / "out")},
        "bench": {"input_size": 64, "batch_sizes": [1], "runs": 1, "warmup": 0},
    })
    res = run_sweep(recipe)
    row = next(r for r in res.rows if r["variant"] == "l1+sparse-keep-macs0.5")
    out = res.out
    assert read_checkpoint(out / "l1+sparse-keep-macs0.5.sparse.pt").train_state["step"] == 1
    assert read_checkpoint(out / "l1+sparse-keep-macs0.5.pt").train_state["step"] == 2  # 1 + 2 = the 3-step budget
    assert read_checkpoint(out / "control.pt").train_state["step"] == 3
    assert row["sparse_steps"] == 1 and row["map_sparse"] is not None
    assert row["target_met"] is True and abs(row["achieved_macs_ratio"] - 0.5) <= 0.01
    with open(res.csv) as f:
        written = next(r for r in csv.DictReader(f) if r["variant"] == "l1+sparse-keep-macs0.5")
    assert written["target_met"] == "True" and written["sparse_steps"] == "1"
    # the pruned model came from the sparse checkpoint, and a rerun reuses every step
    assert read_checkpoint(out / "l1+sparse-keep-macs0.5.pruned.pt").plan.source.endswith("l1+sparse-keep-macs0.5.sparse.pt")
    again = run_sweep(recipe)
    assert "l1+sparse-keep-macs0.5:sparse" in again.skipped and "l1+sparse-keep-macs0.5:retrain" in again.skipped
