"""The trainer: loss goes down, masks stay exact, NaN stops cleanly, kill-and-resume, DDP, seeds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from cli.train_options import overrides
from surgery.config.recipe import Recipe, TrainSection, apply_overrides, recipe_from_dict
from surgery.detectors.builders import ModelSpec, build_model
from surgery.errors import RecipeError, TrainingError
from surgery.pruning.masked import (
    AGPSchedule,
    magnitude_masks,
    prunable_parameters,
    prune_masked,
    pruned_count,
)
from surgery.storage.checkpoint import load, load_checkpoint, read_checkpoint
from surgery.training.train import (
    HookBase,
    LoggingHook,
    MaskHook,
    StepInfo,
    build_trainer,
    init_distributed,
    lr_factor,
)

SIZE = 64
SPEC = ModelSpec("fcos_resnet18_slim", {"num_classes": 3, "min_size": SIZE, "max_size": SIZE})


class Shapes(Dataset):
    """Bright rectangles (class 1) and squares (class 2) on a dark background; fixed per index."""

    num_classes = 3

    def __init__(self, n: int = 8, size: int = SIZE, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 10_000 + i)
        img = torch.rand(3, self.size, self.size, generator=g) * 0.2
        boxes, labels = [], []
        for _ in range(1 + i % 2):
            w = int(torch.randint(12, 28, (1,), generator=g))
            label = int(torch.randint(1, 3, (1,), generator=g))
            h = w if label == 2 else w // 2
            x = int(torch.randint(0, self.size - w, (1,), generator=g))
            y = int(torch.randint(0, self.size - h, (1,), generator=g))
            img[label - 1, y : y + h, x : x + w] = 1.0
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
        return img, {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": i,
        }


def _cfg(**kw) -> TrainSection:
    base = dict(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, schedule="constant", checkpoint_every=0, log_every=1)
    return TrainSection(**{**base, **kw})


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(SPEC)


class Recorder(HookBase):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.steps: list[int] = []

    def after_step(self, trainer) -> None:
        self.losses.append(sum(trainer.last_losses.values()))
        self.steps.append(trainer.step)


class Kill(HookBase):
    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, trainer) -> None:
        if trainer.step == self.at:
            raise KeyboardInterrupt("simulated kill")


def reference_and_killed(cfg: TrainSection, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """The uninterrupted run of ``cfg`` (6 steps, checkpoints every 2) and the checkpoint a run
    killed during step 5 left: it holds step 4."""
    ref = _model()
    build_trainer(ref, SPEC, Shapes(12), cfg, out=tmp_path / "ref.pt").train()
    out = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        build_trainer(_model(), SPEC, Shapes(12), cfg, out=out, hooks=[Kill(5)]).train()
    assert read_checkpoint(out).train_state["step"] == 4
    return ref, out


def test_lr_schedule():
    cfg = TrainSection(steps=100, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)
    step = TrainSection(steps=100, warmup_steps=0, schedule="step", step_milestones=[0.5, 0.8])
    assert [lr_factor(s, 100, step) for s in (0, 49, 50, 80)] == pytest.approx([1, 1, 0.1, 0.01])


def test_loss_goes_down_on_a_tiny_set():
    rec = Recorder()
    infos: list[StepInfo] = []
    cfg = _cfg(steps=14, lr=2e-3, log_every=7)
    result = build_trainer(_model(), SPEC, Shapes(8), cfg, hooks=[rec, LoggingHook(infos.append)]).train()
    assert result.steps == 14 and rec.steps == list(range(1, 15))
    first, last = sum(rec.losses[:3]) / 3, sum(rec.losses[-3:]) / 3
    assert last < 0.8 * first, rec.losses
    assert [i.step for i in infos] == [7, 14]
    assert set(infos[0].losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert infos[-1].images_per_s > 0 and infos[-1].lr == pytest.approx(2e-3)
    assert result.images_per_s > 0 and result.checkpoint is None


def test_pruned_models_retrain_at_pruned_lr_and_dense_ones_at_lr():
    """retrain.pruned_lr: a structured or masked model's peak lr; a dense one (the sweep's control)
    keeps lr; the --lr flag sets both."""
    cfg = _cfg(steps=1, warmup_steps=0, lr=1e-3, pruned_lr=4e-3)

    def peak_lr(kind: str, masks=None) -> float:
        infos: list[StepInfo] = []
        build_trainer(_model(), SPEC, Shapes(4), cfg, kind=kind, masks=masks, hooks=[LoggingHook(infos.append)]).train()
        return infos[-1].lr

    assert peak_lr("dense") == pytest.approx(1e-3)
    assert peak_lr("structured") == pytest.approx(4e-3)
    masks = magnitude_masks(_model(), 0.5, "layer")
    assert peak_lr("dense", masks) == pytest.approx(4e-3)  # dense weights masked here: a pruned model
    assert _cfg().pruned_lr is None and _cfg().for_kind("structured").lr == pytest.approx(1e-3)
    flagged = apply_overrides(Recipe(retrain=cfg), overrides("retrain", lr=2e-3)).retrain
    assert flagged.for_kind("structured").lr == flagged.for_kind("dense").lr == pytest.approx(2e-3)
    with pytest.raises(RecipeError, match="retrain.pruned_lr"):
        recipe_from_dict({"version": 1, "retrain": {"pruned_lr": -1.0}}, "bad.yaml")


def test_epochs_convert_to_steps():
    cfg = _cfg(epochs=1.5, batch_size=4)  # 8 images -> 2 batches per epoch -> 3 steps
    assert build_trainer(_model(), SPEC, Shapes(8), cfg).train().steps == 3


def test_same_seed_same_losses():
    def run(seed: int) -> list[float]:
        rec = Recorder()
        build_trainer(_model(0), SPEC, Shapes(8), _cfg(steps=3, seed=seed), hooks=[rec]).train()
        return rec.losses

    a, b = run(0), run(0)
    assert a == b
    assert run(1) != a  # the seed drives the data order


def test_masked_zeros_stay_zero_and_checkpoint_keeps_masks(tmp_path: Path):
    model = _model()
    result = prune_masked(model, 0.7, "layer")
    out = tmp_path / "masked.pt"
    start = {name: p.detach().clone() for name, p in prunable_parameters(model).items()}
    build_trainer(model, SPEC, Shapes(8), _cfg(steps=3, lr=5e-3), out=out, masks=result.masks).train()
    moved = 0
    for name, p in prunable_parameters(model).items():
        assert torch.all(p[~result.masks[name]] == 0), name
        moved += int((p[result.masks[name]] != start[name][result.masks[name]]).sum())
    # some kept weights did move (the zeros staying zero would be trivial otherwise)
    assert moved > 0.5 * sum(int(m.sum()) for m in result.masks.values()), moved
    ckpt = read_checkpoint(out)
    assert ckpt.kind == "masked" and set(ckpt.masks) == set(result.masks)
    assert ckpt.metrics["train"]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    reloaded = load(out)
    for name, p in prunable_parameters(reloaded).items():
        assert torch.all(p[~ckpt.masks[name]] == 0)
        assert torch.equal(ckpt.masks[name], result.masks[name].cpu())


def test_agp_raises_sparsity_and_never_unprunes(tmp_path: Path):
    history: list[dict[str, torch.Tensor]] = []

    class Snap(HookBase):
        def after_step(self, trainer) -> None:
            history.append({k: v.clone() for k, v in trainer.masks.items()})
            for name, p in prunable_parameters(trainer.module).items():
                assert torch.all(p[~trainer.masks[name]] == 0)

    agp = AGPSchedule(initial_sparsity=0.2, final_sparsity=0.6, start_step=0, end_step=4, frequency=2)
    out = tmp_path / "agp.pt"
    trainer = build_trainer(_model(), SPEC, Shapes(8), _cfg(steps=5), out=out, hooks=[MaskHook(agp), Snap()])
    trainer.train()
    for before, after in zip(history, history[1:], strict=False):
        for name in before:
            assert not torch.any(after[name] & ~before[name]), "a pruned weight came back"
    params = prunable_parameters(trainer.module)
    for name, m in history[-1].items():
        assert int((~m).sum()) == pruned_count(params[name].numel(), 0.6)
    sp = [sum(int((~m).sum()) for m in h.values()) for h in history]
    assert sp == sorted(sp) and sp[0] < sp[-1]
    assert read_checkpoint(out).kind == "masked"


def test_retrain_keeps_structure_of_a_cut_model(tmp_path: Path):
    model = _model()
    # cut the first conv of the classification tower from 128 to 64 channels, by hand
    tower = model.head.classification_head.conv
    with torch.no_grad():
        c0, gn, c3 = tower[0], tower[1], tower[3]
        c0.weight = torch.nn.Parameter(c0.weight[:64].clone())
        c0.bias = torch.nn.Parameter(c0.bias[:64].clone())
        c0.out_channels = 64
        gn.weight = torch.nn.Parameter(gn.weight[:64].clone())
        gn.bias = torch.nn.Parameter(gn.bias[:64].clone())
        gn.num_channels = 64
        c3.weight = torch.nn.Parameter(c3.weight[:, :64].clone())
        c3.in_channels = 64
    out = tmp_path / "cut.pt"
    build_trainer(model, SPEC, Shapes(8), _cfg(steps=2), out=out, kind="structured", recipe={"note": 1}).train()
    rebuilt, ckpt = load_checkpoint(out)
    assert ckpt.kind == "structured" and ckpt.recipe == {"note": 1}
    assert rebuilt.head.classification_head.conv[0].weight.shape[0] == 64
    assert ckpt.train_state["step"] == 2 and ckpt.train_state["finished"]


class Poison(HookBase):
    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, trainer) -> None:
        if trainer.step == self.at:
            with torch.no_grad():
                trainer.module.head.classification_head.cls_logits.weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path):
    out = tmp_path / "run.pt"
    # the update of step 3 destroys the model: step 2's state was proven finite by step 3's loss
    trainer = build_trainer(_model(), SPEC, Shapes(8), _cfg(steps=6, checkpoint_every=2), out=out, hooks=[Poison(3)])
    with pytest.raises(TrainingError, match=r"step 4/6.*classification") as err:
        trainer.train()
    assert "last good checkpoint" in str(err.value)
    good = out.read_bytes()
    ckpt = read_checkpoint(out)
    assert ckpt.train_state["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values() if v.is_floating_point())
    assert out.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name != "run.pt"]  # no temporary files left


def test_divergence_never_keeps_the_destroying_update(tmp_path: Path):
    # the update of step 2 destroys the model: the weights saved at step 2 were never evaluated
    out = tmp_path / "run.pt"
    trainer = build_trainer(_model(), SPEC, Shapes(8), _cfg(steps=6, checkpoint_every=2), out=out, hooks=[Poison(2)])
    with pytest.raises(TrainingError, match=r"step 3/6.*was not written"):
        trainer.train()
    assert not out.exists() and not list(tmp_path.iterdir())


def test_kill_and_resume_matches_uninterrupted_run(tmp_path: Path):
    cfg = _cfg(steps=6, checkpoint_every=2, schedule="cosine", warmup_steps=2)
    ref, out = reference_and_killed(cfg, tmp_path)
    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    rec = Recorder()
    trainer = build_trainer(resumed, SPEC, Shapes(12), cfg, out=out, hooks=[rec])
    result = trainer.train(resume=True)
    assert result.start_step == 4 and result.steps == 6 and rec.steps == [5, 6]
    assert read_checkpoint(out).train_state["step"] == 6
    # optimizer state restored (AdamW step counter continues) and the weights match the reference
    assert all(int(s["step"]) == 6 for s in trainer.optimizer.state.values())
    ref_sd, res_sd = ref.state_dict(), resumed.state_dict()
    for k in ref_sd:
        assert torch.allclose(ref_sd[k].float(), res_sd[k].float(), atol=1e-5), k
    # resuming a finished run does no steps
    assert build_trainer(_model(), SPEC, Shapes(12), cfg, out=out).train(resume=True).start_step == 6


class RandomDraws(HookBase):
    """Draws from the torch, Python and numpy generators inside every step (as augmentation or
    dropout would), keyed by the step being taken."""

    def __init__(self) -> None:
        self.draws: dict[int, tuple[float, float, float]] = {}

    def loss_terms(self, trainer, images, targets) -> dict:
        import random

        import numpy as np

        self.draws[trainer.step + 1] = (float(torch.rand(1)), random.random(), float(np.random.rand()))
        return {}


def test_resume_continues_the_random_streams(tmp_path: Path):
    """The steps after a resume draw the same random numbers as the uninterrupted run's (the
    checkpoint restores the torch, Python and numpy generators): a resume that re-seeded or kept
    the process's streams would augment differently from the run it continues."""
    cfg = _cfg(steps=6, checkpoint_every=2)
    ref = RandomDraws()
    build_trainer(_model(), SPEC, Shapes(12), cfg, out=tmp_path / "ref.pt", hooks=[ref]).train()
    out = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        build_trainer(_model(), SPEC, Shapes(12), cfg, out=out, hooks=[RandomDraws(), Kill(5)]).train()
    torch.manual_seed(123)  # the process's streams move on; only the checkpoint can bring them back
    resumed = RandomDraws()
    build_trainer(_model(seed=123), SPEC, Shapes(12), cfg, out=out, hooks=[resumed]).train(resume=True)
    assert sorted(resumed.draws) == [5, 6]
    assert resumed.draws == {k: ref.draws[k] for k in (5, 6)}


def test_resume_keeps_agp_masks(tmp_path: Path):
    cfg = _cfg(steps=6, checkpoint_every=2)
    agp = AGPSchedule(0.0, 0.5, 0, 6, 2)
    out = tmp_path / "agp.pt"
    with pytest.raises(KeyboardInterrupt):
        build_trainer(_model(), SPEC, Shapes(8), cfg, out=out, hooks=[MaskHook(agp), Kill(3)]).train()
    saved = read_checkpoint(out).masks
    assert saved is not None
    trainer = build_trainer(_model(seed=5), SPEC, Shapes(8), cfg, out=out, hooks=[MaskHook(AGPSchedule(0.0, 0.5, 0, 6, 2))])
    trainer.train(resume=True)
    for name, m in saved.items():
        assert not torch.any(trainer.masks[name].cpu() & ~m)
    assert read_checkpoint(out).metrics["train"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_init_distributed_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed()
    assert not info.distributed and info.is_main


# ------------------------------------------------------------------------------------------
# two-process DDP with gloo


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import surgery.training.hooks as hooks_mod
    import surgery.training.train as train_mod

    saves = []
    real_save = hooks_mod.save_checkpoint

    def counting_save(path, *a, **kw):
        saves.append(str(path))
        return real_save(path, *a, **kw)

    hooks_mod.save_checkpoint = counting_save
    info = train_mod.init_distributed()
    try:
        model = _model()
        if rank == 1:  # rank 1 starts from other weights: DDP and the mask broadcast must fix it
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
        masks = magnitude_masks(model, 0.3)  # computed per rank, broadcast from rank 0
        agp = AGPSchedule(0.3, 0.6, 0, 2, 1)
        out = Path(tmp) / "ddp.pt"
        cfg = _cfg(steps=3, batch_size=2, checkpoint_every=2)
        trainer = build_trainer(model, SPEC, Shapes(8), cfg, out=out, masks=masks, hooks=[MaskHook(agp)], dist_info=info)
        trainer.train()
        torch.save(
            {
                "saves": saves,
                "initial": masks,
                "masks": trainer.masks,
                "weights": {k: v.detach().clone() for k, v in trainer.module.named_parameters()},
                "dist": (info.rank, info.world_size),
            },
            Path(tmp) / f"rank{rank}.pt",
        )
    finally:
        train_mod.destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["dist"] == (0, 2) and r1["dist"] == (1, 2)
    assert len(r0["saves"]) == 2 and r1["saves"] == []  # periodic (step 2) + final, rank 0 only
    for name in r0["masks"]:
        assert torch.equal(r0["initial"][name], r1["initial"][name])
        assert torch.equal(r0["masks"][name], r1["masks"][name])
    for k in r0["weights"]:  # parameters (BN running stats are per rank between broadcasts)
        assert torch.allclose(r0["weights"][k].float(), r1["weights"][k].float(), atol=1e-6), k
    ckpt = read_checkpoint(tmp_path / "ddp.pt")
    assert ckpt.kind == "masked" and ckpt.train_state["step"] == 3 and ckpt.train_state["world_size"] == 2
    for name, m in ckpt.masks.items():
        assert torch.equal(m, r0["masks"][name])


def test_eval_hook_records_metrics_in_history_and_checkpoint(tmp_path: Path):
    from surgery.data import build_dataset

    kw = dict(synth_root=tmp_path / "synth", images=16, size=SIZE)
    train_set = build_dataset("synthetic", "train", train=True, **kw)
    val_set = build_dataset("synthetic", "val", train=False, **kw)
    spec = ModelSpec(SPEC.name, {**SPEC.kwargs, "num_classes": train_set.num_classes})
    torch.manual_seed(0)
    out = tmp_path / "run.pt"
    cfg = _cfg(steps=3, eval_every=2)
    result = build_trainer(
        build_model(spec), spec, train_set, cfg, val_set=val_set, out=out, eval_max_images=4
    ).train()
    assert [h["step"] for h in result.history] == [2, 3]
    assert {"mAP", "mAP50"} <= set(result.metrics)
    ckpt = read_checkpoint(out)
    assert ckpt.metrics["mAP50"] == result.metrics["mAP50"]
    assert [h["step"] for h in ckpt.train_state["history"]] == [2, 3]


def test_cli_train_then_retrain_with_agp(tmp_path: Path):
    from typer.testing import CliRunner

    from cli.main import app
    from surgery.pruning.masked import sparsity_report

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: fcos_resnet18_slim, kwargs: {min_size: 64, max_size: 64}}\n"
        f"data: {{source: synthetic, root: {tmp_path / 'synth'}, images: 16, size: 64}}\n"
        "train: {steps: 2, batch_size: 4, warmup_steps: 1, log_every: 1}\n"
        "retrain: {steps: 3, batch_size: 4, warmup_steps: 1, log_every: 1}\n"
    )
    dense = tmp_path / "dense.pt"
    runner = CliRunner()
    r = runner.invoke(app, ["train", "-r", str(recipe), "--out", str(dense), "--no-eval"])
    assert r.exit_code == 0, r.output
    ckpt = read_checkpoint(dense)
    assert ckpt.kind == "dense" and ckpt.spec.kwargs["num_classes"] == 5 and ckpt.train_state["step"] == 2
    out = tmp_path / "rt.pt"
    r = runner.invoke(app, ["retrain", str(dense), "--out", str(out), "--sparsity", "0.5", "--agp", "--no-eval"])
    assert r.exit_code == 0, r.output
    model, ckpt = load_checkpoint(out)
    assert ckpt.kind == "masked" and ckpt.train_state["step"] == 3  # the recipe came from the checkpoint
    assert sparsity_report(model).sparsity == pytest.approx(0.5, abs=1e-3)
    r = runner.invoke(app, ["retrain", str(dense), "--agp"])
    assert r.exit_code != 0
