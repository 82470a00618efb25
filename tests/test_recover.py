"""Recovery without retraining (surgery.pruning.recover), sensitivity analysis and allocation (surgery.pruning.sensitivity)."""

from __future__ import annotations

import copy
import dataclasses
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from surgery.config.recipe import PruneSection, recipe_from_dict
from surgery.detectors.builders import ModelSpec, build_model
from surgery.errors import RecipeError
from surgery.pruning.prune import prune_model
from surgery.pruning.recover import DEFAULT_RECOVER_BATCHES, recover
from surgery.pruning.sensitivity import (
    DENSE,
    SensitivityRow,
    allocate_by_sensitivity,
    analyse,
    plot_table,
    read_table,
)
from surgery.storage.checkpoint import load_checkpoint
from tests.extras import require

SIZE = 64


def _images(n: int = 4, size: int = SIZE, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


def _outputs(model: nn.Module, names: list[str], batches: list[list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Every call's output of each named layer over the batches (eval mode)."""
    mods = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: out[n].append(o.detach().clone())) for n in names]
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return out


def _layer_errors(pruned, dense, names, kept, batches) -> dict[str, float]:
    """Oracle: relative squared distance between each pruned layer's output and the dense layer's
    output on the kept channels, over all positions of the images."""
    p, d = _outputs(pruned, names, batches), _outputs(dense, names, batches)
    errors = {}
    for n in names:
        num = den = 0.0
        for a, b in zip(p[n], d[n]):
            if n in kept:
                b = b[:, kept[n]]
            num += float(((a - b) ** 2).sum())
            den += float((b**2).sum())
        errors[n] = num / den
    return errors


@pytest.fixture(scope="module")
def trained_fcos(tmp_path_factory) -> Path:
    """The slim FCOS trained briefly at 64 px on a small synthetic set (a checkpoint)."""
    from surgery.workflows import train_from_recipe

    root = tmp_path_factory.mktemp("recover")
    rec = recipe_from_dict({
        "model": {"name": "fcos_resnet18_slim", "kwargs": {"num_classes": 5, "min_size": SIZE, "max_size": SIZE}},
        "data": {"root": str(root / "synth"), "images": 64, "size": SIZE},
        "train": {"steps": 60, "batch_size": 8, "lr": 0.002, "warmup_steps": 5, "checkpoint_every": 0},
        "bench": {"input_size": SIZE},
    }, "test")  # fmt: skip
    train_from_recipe(rec, root / "dense.pt")
    return root / "dense.pt"


def _cut(model: nn.Module, ratio: float = 0.5):
    dense = copy.deepcopy(model).eval()
    result = prune_model(model, PruneSection(ratio=ratio), trace_size=SIZE)
    return dense, result


# ------------------------------------------------------------------------------------------
# recovery


def test_refit_lowers_the_error_of_every_refit_layer():
    """Oracle: each re-fit layer's output is closer to the dense layer's output (kept channels)
    on the calibration images after the re-fit than right after the cut; the reported errors agree."""
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=SIZE, max_size=SIZE).eval()
    dense, result = _cut(model)
    batches = [_images(4, seed=s) for s in range(3)]
    refit_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    before = _layer_errors(model, dense, refit_names, result.kept, batches)
    rec = recover(model, dense, batches, kept=result.kept, batches=3, batchnorm=False)
    assert len(rec.refit) >= 20 and not rec.skipped
    after = _layer_errors(model, dense, rec.refit, result.kept, batches)
    for f in rec.layers:
        assert f.refit and f.error_after < f.error_before, f
        assert after[f.name] < before[f.name], (f.name, before[f.name], after[f.name])
    # and by far, not a token step: the median layer's error falls more than tenfold (the solver's
    # own median is 0.027; a ridge 10^4 times the default, which pulls the fit back towards the
    # cut weights, leaves 0.24 here)
    assert statistics.median(after[n] / before[n] for n in rec.refit) < 0.1
    # the dense model is untouched
    assert all(p.shape == q.shape for p, q in zip(dense.parameters(), build_model(
        "fcos_resnet18_slim", num_classes=5, min_size=SIZE, max_size=SIZE).parameters()))


def test_replaying_finished_modules_gives_the_same_fit_with_fewer_passes():
    """Oracle: the re-fit with the outputs of finished modules replayed (the default) gives exactly the
    weights of the re-fit that recomputes every pass; the stem then runs once per batch, not once per
    layer and batch; a memory bound too small for any output gives the same weights too."""
    from unittest import mock

    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=SIZE, max_size=SIZE).eval()
    dense, result = _cut(model)
    batches = [_images(4, seed=s) for s in range(3)]
    fitted, stem_runs = {}, {}
    for budget in (0, 1, 1 << 30):
        m = copy.deepcopy(model)
        stem = m.backbone.body.conv1
        with mock.patch.object(stem, "forward", wraps=stem.forward) as runs:
            rec = recover(m, dense, batches, kept=result.kept, batches=3, replay_bytes=budget)
        assert "forward" not in vars(stem) and "forward" not in vars(m.backbone)  # every replay undone
        fitted[budget], stem_runs[budget] = m.state_dict(), runs.call_count
        assert len(rec.refit) >= 20
    for budget in (1, 1 << 30):
        assert fitted[budget].keys() == fitted[0].keys()
        assert all(torch.equal(fitted[budget][k], fitted[0][k]) for k in fitted[0]), budget
    layers = len(rec.layers)
    assert stem_runs[0] >= layers * len(batches)  # one pass per layer and batch (+ capture and BatchNorm)
    assert stem_runs[1] == stem_runs[0] + 1  # nothing fits in one byte: all recomputed (+ the pass that times calls)
    assert stem_runs[1 << 30] <= stem_runs[0] / 5, stem_runs


class _InPlaceSkips(nn.Module):
    """a -> (in place x2) -> b -> c(b + a) -> d(c + a): a's output is changed in place by the parent
    and read again after b and c, so a replayed output that is not a copy would drift."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.c, self.d = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        h = self.a(torch.stack(images))
        h.mul_(2)
        k = self.c(torch.relu(self.b(h)) + h)
        return self.d(torch.relu(k) + h)


def test_replayed_outputs_are_copies_that_in_place_ops_downstream_cannot_change():
    torch.manual_seed(0)
    dense, keep = _InPlaceSkips(8).eval(), torch.tensor([0, 2, 5, 7])
    cut = _InPlaceSkips(4).eval()
    with torch.no_grad():
        for n in "abc":  # the same channels cut from a, b and c (they are added together)
            getattr(cut, n).bias.copy_(getattr(dense, n).bias[keep])
        cut.a.weight.copy_(dense.a.weight[keep])
        cut.b.weight.copy_(dense.b.weight[keep][:, keep])
        cut.c.weight.copy_(dense.c.weight[keep][:, keep])
        cut.d.weight.copy_(dense.d.weight[:, keep])
        cut.d.bias.copy_(dense.d.bias)
    kept = {n: keep.tolist() for n in "abc"}
    batches = [_images(2, seed=s) for s in range(3)]
    fitted = {}
    for budget in (0, 1 << 30):
        m = copy.deepcopy(cut)
        rec = recover(m, dense, batches, kept=kept, batches=3, replay_bytes=budget, batchnorm=False)
        assert rec.refit == ["b", "c", "d"]
        fitted[budget] = m.state_dict()
    assert all(torch.equal(fitted[1 << 30][k], fitted[0][k]) for k in fitted[0])


def test_default_calibration_size_generalises_better_than_four_batches():
    """The default number of calibration batches re-fits layers that reproduce the dense layers'
    outputs better on images the fit never saw than 4 batches do (the deep layers' systems are
    under-determined on few images and over-fit them). Oracle: the held-out error measured with
    hooks, not the solver's own accounting. Batches of 2 images here (the recipes' are 8)."""
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=SIZE, max_size=SIZE).eval()
    dense, result = _cut(model)
    assert DEFAULT_RECOVER_BATCHES > 4
    calib = [_images(2, seed=s) for s in range(DEFAULT_RECOVER_BATCHES)]
    held_out = [_images(2, seed=1000 + s) for s in range(3)]
    few, many = copy.deepcopy(model), copy.deepcopy(model)
    rec_few = recover(few, dense, calib, kept=result.kept, batches=4, batchnorm=False)
    rec_many = recover(many, dense, calib, kept=result.kept, batchnorm=False)  # the default
    assert rec_few.batches == 4 and rec_many.batches == DEFAULT_RECOVER_BATCHES
    names = rec_many.refit
    assert len(names) >= 20
    e_few = _layer_errors(few, dense, names, result.kept, held_out)
    e_many = _layer_errors(many, dense, names, result.kept, held_out)
    better = [n for n in names if e_many[n] < e_few[n]]
    assert sum(e_many.values()) < 0.95 * sum(e_few.values()), (e_few, e_many)
    # most layers, and the last re-fit one (a head output), are closer on held-out images (not
    # every layer: on this random model the 2x2 maps of layer4/P6/P7 are ridge-dominated either way)
    assert len(better) > 0.5 * len(names), sorted(set(names) - set(better))
    assert e_many[names[-1]] < e_few[names[-1]]


def test_recovery_raises_map_on_a_trained_model(trained_fcos: Path, tmp_path: Path):
    from surgery.data import dataset_for
    from surgery.measure.evaluate import evaluate
    from surgery.pruning.calibrate import calibration_data

    model, ck = load_checkpoint(trained_fcos)
    rec = recipe_from_dict(ck.recipe, "ckpt")
    val = dataset_for(rec.data, "val", train=False)
    dense_map = evaluate(model, val).metrics["mAP"]
    dense, result = _cut(model)
    cut_map = evaluate(model, val).metrics["mAP"]
    recover(model, dense, calibration_data(rec.data, batches=4, batch_size=8), kept=result.kept, batches=4)
    recovered_map = evaluate(model, val).metrics["mAP"]
    assert recovered_map > cut_map, (dense_map, cut_map, recovered_map)


@pytest.mark.parametrize("name,kwargs", [
    ("ssdlite320_mobilenet_v3_large", {"num_classes": 5}),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 5, "min_size": SIZE, "max_size": SIZE,
                                               "rpn_post_nms_top_n_test": 64, "box_detections_per_img": 20}),
    ("retinanet_resnet50_fpn", {"num_classes": 5, "min_size": SIZE, "max_size": SIZE}),
])  # fmt: skip
def test_recovery_runs_on_every_family(name: str, kwargs: dict):
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    if name.startswith("retinanet"):
        _freeze_norms(model.backbone.body)  # as with pretrained weights
    dense, result = _cut(model)
    res = recover(model, dense, [_images(2, size=96)], kept=result.kept, batches=1, positions=256)
    assert res.refit, res.skipped
    assert all(f.error_after <= f.error_before for f in res.layers)
    if name.startswith("fasterrcnn"):
        # the box head's first layer reads the cut FPN through RoIAlign: re-fit on the dense proposals
        assert "roi_heads.box_head.fc6" in res.refit
    if name.startswith("retinanet"):
        # FrozenBatchNorm2d is left as it is; the conv before it is re-fit to the dense pre-norm output
        assert "backbone.body.layer1.0.bn1" in res.frozen_norms and "backbone.body.layer1.0.bn1" not in res.bn_reestimated
        assert "backbone.body.layer1.0.conv2" in res.refit
    with torch.no_grad():
        out = model(_images(1, size=96))
    assert set(out[0]) >= {"boxes", "scores", "labels"}


def _freeze_norms(module: nn.Module) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(module, name, frozen)
        else:
            _freeze_norms(child)


def test_recovery_runs_on_yolov8n():
    require("ultralytics")
    torch.manual_seed(0)
    model = build_model(ModelSpec("ultralytics:yolov8n.yaml", {"nc": 4, "size": 96})).eval()
    dense, result = _cut(model)
    res = recover(model, dense, [_images(2, size=96)], kept=result.kept, batches=1, positions=256)
    assert len(res.refit) > 20 and res.bn_reestimated
    assert not set(res.refit) & set(model.fixed_weights())  # DFL's constants are never re-fit
    assert all(f.error_after < f.error_before for f in res.layers if f.refit)


def test_cli_prune_recover_and_recipe_key(trained_fcos: Path, tmp_path: Path):
    r = CliRunner().invoke(app, ["prune", "--model", str(trained_fcos), "--ratio", "0.5", "--recover", "1",
                                 "--out", str(tmp_path / "p.pt")])
    assert r.exit_code == 0, r.output
    assert "layers re-fit by least squares" in r.output
    _, ck = load_checkpoint(tmp_path / "p.pt")
    assert ck.metrics["recovery"]["layers_refit"] > 0 and ck.plan.extra["recovery"]["batches"] == 1
    with pytest.raises(RecipeError, match="prune.recover"):
        recipe_from_dict({"prune": {"recover": -1}}, "x")
    with pytest.raises(RecipeError, match="prune.allocation"):
        recipe_from_dict({"prune": {"allocation": "sensitive"}}, "x")
    with pytest.raises(RecipeError, match="prune.sensitivity"):
        recipe_from_dict({"prune": {"allocation": "sensitivity", "target_macs": 0.5}}, "x")



@pytest.mark.slow
def test_ridges_chosen_on_held_out_batches_generalise_better_than_a_near_zero_ridge():
    """``recover(ridges=...)`` picks each layer's ridge (or keeps its cut weights) by the error on
    every fourth calibration batch, which the candidate fits did not see: on 4 batches of 2 images
    the deep layers' systems are under-determined, and a near-zero ridge over-fits them. Oracle:
    the layers' errors on images neither fit saw, measured with hooks. The near-zero ridge is one of
    the candidates, so a selection that ignored the held-out batches could not do better."""
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=SIZE, max_size=SIZE).eval()
    dense, result = _cut(model)
    calib = [_images(2, seed=s) for s in range(4)]
    unseen = [_images(2, seed=1000 + s) for s in range(3)]
    fixed, chosen = copy.deepcopy(model), copy.deepcopy(model)
    rec_fixed = recover(fixed, dense, calib, kept=result.kept, batches=4, ridge=1e-8, batchnorm=False)
    rec_chosen = recover(chosen, dense, calib, kept=result.kept, batches=4, ridges=[1e-8, 1e-2, 1.0, 100.0],
                         batchnorm=False)
    assert all(f.ridge == 1e-8 for f in rec_fixed.layers)
    picked = [f.ridge for f in rec_chosen.layers]
    assert len({r for r in picked if r is not None}) >= 2, picked  # not one ridge for every layer
    names = [f.name for f in rec_chosen.layers]
    e_fixed = _layer_errors(fixed, dense, names, result.kept, unseen)
    e_chosen = _layer_errors(chosen, dense, names, result.kept, unseen)
    assert sum(e_chosen.values()) < 0.8 * sum(e_fixed.values()), (e_fixed, e_chosen)


# ------------------------------------------------------------------------------------------
# sensitivity and allocation


def _silence_group(model: nn.Module, root: str) -> None:
    """Make the group rooted at ``root`` (a ResNet block's conv1) irrelevant: its consumer (conv2)
    reads nothing from it, so cutting any of its channels leaves every output unchanged."""
    consumer = dict(model.named_modules())[root.replace("conv1", "conv2")]
    with torch.no_grad():
        consumer.weight.zero_()


def test_sensitivity_irrelevant_group_keeps_the_dense_map_and_resumes(trained_fcos: Path, tmp_path: Path):
    from surgery.data import dataset_for
    from surgery.measure.evaluate import evaluate

    model, ck = load_checkpoint(trained_fcos)
    rec = recipe_from_dict(ck.recipe, "ckpt")
    val = torch.utils.data.Subset(dataset_for(rec.data, "val", train=False), list(range(12)))
    silent, loud = "backbone.body.layer2.1.conv1", "backbone.body.layer1.0.conv1"
    _silence_group(model, silent)
    calls = []

    def score(m):
        calls.append(1)
        r = evaluate(m, val).metrics
        return {"mAP": r["mAP"], "mAP50": r["mAP50"]}

    kw = dict(key="k1", calib_data=None, recover_batches=0, ratios=(0.25, 0.75), macs_input_size=SIZE,
              trace_size=SIZE, groups=[silent, loud], score=score)
    full, resumed = analyse(model, csv_path=tmp_path / "full.csv", **kw)
    assert resumed == 0 and len(full) == 5
    dense = next(r for r in full if r.group == DENSE)
    for r in full:
        if r.group == silent:  # zero-weight consumer: the cut changes nothing (oracle)
            assert r.map == pytest.approx(dense.map, abs=1e-9) and r.macs < dense.macs
    loud_rows = sorted((r for r in full if r.group == loud), key=lambda r: r.ratio)
    assert loud_rows[-1].macs < loud_rows[0].macs < dense.macs
    # kill after two rows, then resume: the same table as the uninterrupted run
    calls.clear()

    def dying(m):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score(m)

    with pytest.raises(KeyboardInterrupt):
        analyse(model, csv_path=tmp_path / "part.csv", **{**kw, "score": dying})
    assert len(read_table(tmp_path / "part.csv")[1]) == 2
    rows, resumed = analyse(model, csv_path=tmp_path / "part.csv", **kw)
    assert resumed == 2
    assert len(rows) == len(full)

    def table(path):  # the files, but the seconds each row took
        return sorted((dataclasses.replace(r, seconds=0.0) for r in read_table(path)[1]), key=lambda r: (r.group, r.ratio))

    assert table(tmp_path / "part.csv") == table(tmp_path / "full.csv")
    with pytest.raises(RecipeError, match="another checkpoint"):
        analyse(model, csv_path=tmp_path / "part.csv", **{**kw, "key": "other"})
    assert plot_table(rows, tmp_path / "s.png").stat().st_size > 1000


def test_a_recovered_table_compares_each_cut_with_the_model_recovered_uncut(trained_fcos: Path, tmp_path: Path):
    """The recovery re-estimates every BatchNorm on a few images, which moves the score with nothing
    cut. The dense row is that recovered, uncut model: a cut that changes nothing (a group whose
    consumer reads none of it) then loses exactly nothing, whatever the recovery did by itself."""
    from surgery.pruning.calibrate import calibration_data

    model, ck = load_checkpoint(trained_fcos)
    rec = recipe_from_dict(ck.recipe, "ckpt")
    silent = "backbone.body.layer2.1.conv1"
    _silence_group(model, silent)
    calib = list(calibration_data(rec.data, batches=1, batch_size=4, model=model))
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def score(m):  # continuous in the weights: the raw classification logits on one image
        m.eval()
        with torch.no_grad():
            feats = m.backbone(m.transform([image])[0].tensors)
            logits = m.head(list(feats.values()))["cls_logits"]
        return {"mAP": float(logits.mean()), "mAP50": 0.0}

    rows, _ = analyse(model, csv_path=tmp_path / "s.csv", key="k", calib_data=calib, recover_batches=1,
                      ratios=(0.5,), macs_input_size=SIZE, trace_size=SIZE, groups=[silent], score=score)
    dense = next(r for r in rows if r.group == DENSE)
    cut = next(r for r in rows if r.group == silent)
    assert abs(score(model)["mAP"] - dense.map) > 1e-4  # the recovery alone moves the score
    assert cut.macs < dense.macs and cut.map == pytest.approx(dense.map, abs=1e-5)


def test_sensitivity_command_resumes_its_table_and_overwrite_measures_again(trained_fcos: Path, tmp_path: Path):
    """The CLI keeps the table's rows on a re-run (a killed analysis resumes), and --overwrite starts
    it again; the output guard must not refuse the existing table."""
    table = tmp_path / "s.csv"
    first, second = "backbone.body.layer2.1.conv1", "backbone.body.layer1.0.conv1"

    def run(*extra: str):
        res = CliRunner().invoke(app, ["sensitivity", str(trained_fcos), "--ratios", "0.5", "--val-images", "2",
                                       "--recover", "0", "--macs-size", str(SIZE), "--csv", str(table), *extra])
        assert res.exit_code == 0, res.output
        return res.output, {r.group for r in read_table(table)[1]}

    out, groups = run("--group", first, "--plot", str(tmp_path / "s.png"))
    assert "resumed" not in out and groups == {DENSE, first}
    out, groups = run("--group", first, "--group", second, "--plot", str(tmp_path / "s.png"))
    assert "resumed: 2 rows" in out and groups == {DENSE, first, second}
    out, groups = run("--group", second, "--overwrite")
    assert "resumed" not in out and groups == {DENSE, second}


@pytest.mark.slow
def test_label_free_sensitivity_scores_against_the_dense_model_and_reads_no_annotation(trained_fcos: Path, tmp_path: Path):
    """`surgery sensitivity --label-free`: the dense row scores 1 (its own detections are the
    reference), a cut scores below it, and a copy of the data whose annotations are garbage gives
    the same table; the labelled table differs on that copy."""
    import json
    import shutil

    rec = load_checkpoint(trained_fcos)[1].recipe
    src = next(Path(rec["data"]["root"]).rglob("instances_val.json")).parent.parent  # the synthetic set's folder
    bad = tmp_path / "garbage"
    shutil.copytree(src, bad)
    ann = bad / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    for a in coco["annotations"]:
        a["bbox"], a["area"] = [1, 1, 3, 3], 9
    ann.write_text(json.dumps(coco))
    group = "backbone.body.layer2.1.conv1"

    def table(data: str, name: str, *extra: str) -> dict[str, float]:
        res = CliRunner().invoke(app, ["sensitivity", str(trained_fcos), "--data", data, "--ratios", "0.75", "--val-images", "4",
                                       "--recover", "0", "--macs-size", str(SIZE), "--csv", str(tmp_path / name), "--group", group, *extra])
        assert res.exit_code == 0, res.output
        return {r.group: r.map for r in read_table(tmp_path / name)[1]}

    free = table(str(src), "free.csv", "--label-free")
    assert free[DENSE] == pytest.approx(1.0) and free[group] < 0.95
    assert table(str(bad), "free_bad.csv", "--label-free") == pytest.approx(free)
    assert table(str(bad), "bad.csv")[DENSE] != pytest.approx(table(str(src), "good.csv")[DENSE])


@pytest.mark.slow
def test_label_free_allocation_measures_the_table_at_prune_time_and_a_second_cut_reuses_it(trained_fcos: Path, tmp_path: Path):
    """`prune.sensitivity: label-free` (no table given): the prune measures the dense checkpoint's
    label-free table next to its output, allocates per group from it, and a second cut of the same
    checkpoint (another MACs target) reads the same table instead of measuring it again."""
    def prune(name: str, keep: str) -> str:
        res = CliRunner().invoke(app, ["prune", "--model", str(trained_fcos), "--allocation", "sensitivity", "--sensitivity",
                                       "label-free", "--keep-macs", keep, "--macs-size", str(SIZE), "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        return res.output

    prune("a.pt", "0.7")
    tables = list(tmp_path.glob("sensitivity-*.csv"))
    assert len(tables) == 1
    rows = read_table(tables[0])[1]
    assert next(r.map for r in rows if r.group == DENSE) == pytest.approx(1.0) and len(rows) > 5
    plan = load_checkpoint(tmp_path / "a.pt")[1].plan
    assert plan.extra["allocation"]["kind"] == "sensitivity" and plan.extra["allocation"]["table"] == str(tables[0])
    cut = [len(g["pruned"]) / g["channels"] for g in plan.groups if g["pruned"]]
    assert cut and max(cut) - min(cut) > 0.2  # per-group ratios, not one uniform cut
    before = tables[0].stat().st_mtime_ns
    prune("b.pt", "0.5")
    assert list(tmp_path.glob("sensitivity-*.csv")) == tables and tables[0].stat().st_mtime_ns == before


def test_holdout_split_is_training_images_that_neither_the_recovery_nor_the_validation_split_holds(tmp_path: Path):
    """What the label-free table (and compress's proxy) is scored on: training images outside the
    recovery's batches, never the validation images the cut model is finally scored on."""
    from surgery.data import dataset_for
    from surgery.pruning.calibrate import calibration_data
    from surgery.pruning.recover import RECOVER_BATCH_SIZE
    from surgery.workflows import holdout_split

    recipe = recipe_from_dict({"data": {"source": "synthetic", "root": str(tmp_path), "images": 48, "size": 64, "seed": 3}})
    held = [img for img, _ in holdout_split(recipe, 8, recover_batches=2)]
    seen = [img for images, _ in calibration_data(recipe.data, batches=2, batch_size=RECOVER_BATCH_SIZE) for img in images]
    val = [img for img, _ in dataset_for(recipe.data, "val", train=False)]
    train = [img for img, _ in dataset_for(recipe.data, "train", train=False)]
    assert len(held) == 8 and len(seen) == 2 * RECOVER_BATCH_SIZE

    def index(img: torch.Tensor, pool: list[torch.Tensor]) -> list[int]:
        return [i for i, p in enumerate(pool) if p.shape == img.shape and torch.equal(p, img)]

    assert all(len(index(h, train)) == 1 for h in held)
    assert not any(index(h, seen) for h in held) and not any(index(h, val) for h in held)
    assert len(holdout_split(recipe, 1000, recover_batches=2, fewer=True)) == 48 - 2 * RECOVER_BATCH_SIZE


def test_the_label_free_tables_key_is_the_weights_not_the_file_they_came_from():
    """The table of an ``ultralytics:best.pt`` source (not a file path) or a built-in model is keyed by
    its weights: an identical copy has the same digest, one changed value another."""
    from surgery.workflows import weights_digest

    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=SIZE, max_size=SIZE)
    copy_ = copy.deepcopy(model)
    assert weights_digest(copy_) == weights_digest(model)
    with torch.no_grad():
        next(copy_.parameters()).view(-1)[0] += 1e-6
    assert weights_digest(copy_) != weights_digest(model)


@pytest.mark.slow
def test_label_free_allocation_cuts_an_ultralytics_source_that_is_not_a_file_path(ultralytics, tmp_path: Path):
    """``--model ultralytics:PATH`` is not a file path: the table used to be keyed by hashing that
    string as a file, and the prune stopped with a traceback."""
    tiny = Path(__file__).resolve().parent / "data" / "yolo_tiny.yaml"
    res = CliRunner().invoke(app, ["prune", "--model", f"ultralytics:{tiny}", "-k", "nc=4", "-k", "size=64",
                                   "--allocation", "sensitivity", "--sensitivity", "label-free", "--keep-macs", "0.5",
                                   "--macs-size", "64", "--recover", "1", "--data", "synthetic", "--out",
                                   str(tmp_path / "p.pt")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert len(list(tmp_path.glob("sensitivity-*.csv"))) == 1
    assert load_checkpoint(tmp_path / "p.pt")[1].plan.extra["allocation"]["kind"] == "sensitivity"


def _table() -> list[SensitivityRow]:
    d = SensitivityRow(DENSE, 0.0, 0, 0, 1000, 1.0, 0.5, 0.8)
    rows = [d]
    for ratio in (0.25, 0.5, 0.75):  # a: insensitive, b: sensitive; both save the same MACs
        saved = int(400 * ratio)
        rows.append(SensitivityRow("a", ratio, 64, 0, 1000 - saved, (1000 - saved) / 1000, 0.5 - 0.01 * ratio, 0.8))
        rows.append(SensitivityRow("b", ratio, 64, 0, 1000 - saved, (1000 - saved) / 1000, 0.5 - 0.4 * ratio, 0.8))
    return rows


def test_allocation_cuts_the_insensitive_group_first():
    alloc = allocate_by_sensitivity(["a", "b"], _table(), 0.75)
    assert alloc.ratios.get("a", 0) >= 0.6 and alloc.ratios.get("b", 0) == 0 and alloc.met
    alloc = allocate_by_sensitivity(["a", "b"], _table(), 0.6)  # needs more than a can give
    assert alloc.ratios["a"] == pytest.approx(0.75) and alloc.ratios["b"] > 0 and alloc.met
    with pytest.raises(RecipeError, match="another model"):
        allocate_by_sensitivity(["a"], _table(), 0.6)


def test_allocation_weighs_the_loss_by_the_macs_saved():
    """Group ``big`` loses twice ``small``'s mAP per ratio but saves eight times its MACs: per MAC
    saved it is four times cheaper, so it is cut far deeper; an allocator ranking by mAP loss alone
    would cut ``small`` first and deeper."""
    rows = [SensitivityRow(DENSE, 0.0, 0, 0, 1000, 1.0, 0.5, 0.8)]
    for ratio in (0.25, 0.5, 0.75):
        for group, saves, loss in (("big", 800, 0.2), ("small", 100, 0.1)):
            macs = 1000 - int(saves * ratio)
            rows.append(SensitivityRow(group, ratio, 64, 0, macs, macs / 1000, 0.5 - loss * ratio, 0.8))
    alloc = allocate_by_sensitivity(["big", "small"], rows, 0.75)  # 250 MACs to save: big alone gives 600
    assert alloc.met and alloc.ratios.get("big", 0) >= 4 * alloc.ratios.get("small", 0) and alloc.ratios["big"] > 0


def test_a_one_ratio_table_spreads_the_cut_in_inverse_proportion_to_the_loss_per_mac():
    """Measured at 0.8 only, ``a`` loses half of ``b``'s mAP for the same MACs. The loss grows with
    the square of the ratio up to the measured one (a ranked cut removes the least important
    channels first), so the cheapest allocation cuts both, ``a`` twice as deep: 0.4 and 0.2 for 300
    MACs saved. A loss linear from zero would cut ``a`` alone to 0.6 and leave ``b`` whole."""
    rows = [SensitivityRow(DENSE, 0.0, 0, 0, 1000, 1.0, 0.5, 0.8)]
    for group, loss in (("a", 0.02), ("b", 0.04)):
        rows.append(SensitivityRow(group, 0.8, 64, 0, 600, 0.6, 0.5 - loss, 0.8))
    alloc = allocate_by_sensitivity(["a", "b"], rows, 0.7)
    assert alloc.met
    assert alloc.ratios["a"] == pytest.approx(0.4, abs=0.051) and alloc.ratios["b"] == pytest.approx(0.2, abs=0.051)


def test_sensitivity_allocation_meets_the_macs_target(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=SIZE, max_size=SIZE).eval()
    # a table with real MACs (cheap fake scores: mAP falls with the MACs cut, more for the head)
    def score_for(m):
        return {"mAP": 0.0, "mAP50": 0.0}
    groups = ["backbone.body.layer2.0.conv1", "backbone.body.layer2.1.conv1", "backbone.body.layer3.0.conv1",
              "backbone.body.layer3.1.conv1", "head.classification_head.conv.0", "head.regression_head.conv.0"]
    rows, _ = analyse(model, csv_path=tmp_path / "s.csv", key="k", calib_data=None, groups=groups,
                      recover_batches=0, ratios=(0.25, 0.75), macs_input_size=SIZE, trace_size=SIZE,
                      score=score_for)
    dense = next(r for r in rows if r.group == DENSE)
    for r in rows:
        if r.group != DENSE:
            r.map = dense.map - (1 - r.macs_ratio) * (3.0 if r.group.startswith("head") else 1.0)
    from surgery.pruning.sensitivity import _write_table

    _write_table(tmp_path / "s.csv", "k", rows)
    target = 0.8
    cfg = PruneSection(target_macs=target, allocation="sensitivity", sensitivity=str(tmp_path / "s.csv"))
    cfg.validate()
    # the sensitivity allocator runs inside prune_model (not the MACs search)
    res = prune_model(model, cfg, trace_size=SIZE, macs_input_size=SIZE)
    alloc = res.allocation.info["sensitivity"]
    assert alloc.met and target - 0.03 < alloc.measured_macs_ratio <= target
    # the head is costlier per MAC: the backbone is cut deeper
    head = [r for g, r in alloc.ratios.items() if g.startswith("head")]
    body = [r for g, r in alloc.ratios.items() if g.startswith("backbone.body")]
    assert (sum(body) / len(body)) > (sum(head) / len(head) if head else 0.0)
    # the plan's one ratio ("% channels" in the reports) is the fraction of the prunable channels removed
    prunable = [g for g in res.report.groups if g.prunable]
    removed = sum(g.channels_before - g.channels_after for g in prunable) / sum(g.channels_before for g in prunable)
    assert res.report.ratio == pytest.approx(removed, abs=1e-4) and res.plan.ratio == res.report.ratio
    # the real cut lands where the allocator's measurement on a cut copy said
    assert res.report.macs_ratio == pytest.approx(alloc.measured_macs_ratio, abs=1e-6)
    assert res.plan.extra["allocation"]["kind"] == "sensitivity" and res.plan.target_macs == target


def test_sensitivity_allocation_with_keep_head_ignores_the_head_rows_and_keeps_its_widths(tmp_path: Path):
    """A table measured with the head's groups serves a cut that keeps the head (prune.keep_head):
    their rows are left out (they were refused as 'another model'), the rest meets the target."""
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=SIZE, max_size=SIZE).eval()
    dense_widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    groups = ["backbone.body.layer2.0.conv1", "backbone.body.layer3.0.conv1", "backbone.body.layer3.1.conv1",
              "head.classification_head.conv.0", "head.regression_head.conv.0"]
    analyse(model, csv_path=tmp_path / "s.csv", key="k", calib_data=None, groups=groups, recover_batches=0,
            ratios=(0.25, 0.75), macs_input_size=SIZE, trace_size=SIZE, score=lambda m: {"mAP": 0.0, "mAP50": 0.0})
    cfg = PruneSection(target_macs=0.9, allocation="sensitivity", sensitivity=str(tmp_path / "s.csv"), keep_head=True)
    cfg.validate()
    res = prune_model(model, cfg, trace_size=SIZE, macs_input_size=SIZE)
    alloc = res.allocation.info["sensitivity"]
    assert alloc.met and alloc.ratios and not any(g.startswith("head") for g in alloc.ratios)
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert all(widths[n] == w for n, w in dense_widths.items() if n.startswith("head."))
    assert any(widths[n] < w for n, w in dense_widths.items() if n.startswith("backbone.body"))


def test_sweep_records_map_right_after_the_cut_and_after_recovery(tmp_path: Path):
    import csv

    from surgery.sweep import run_sweep

    recipe = recipe_from_dict({
        "model": {"name": "fcos_resnet18_slim", "kwargs": {"num_classes": 5, "min_size": SIZE, "max_size": SIZE}},
        "data": {"source": "synthetic", "images": 16, "size": SIZE, "root": str(tmp_path / "data")},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "retrain": {"steps": 1, "batch_size": 4, "warmup_steps": 0},
        "prune": {"recover": 1, "min_channels": 4},
        "sweep": {"ratios": [0.5], "techniques": ["l1"], "sparsities": [], "match_masked": True, "int8": "none",
                  "out": str(tmp_path / "out")},
        "bench": {"input_size": SIZE, "batch_sizes": [1], "runs": 2, "warmup": 1},
    })  # fmt: skip
    res = run_sweep(recipe)
    with open(res.csv) as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert rows["dense"]["map_recovered"] == ""  # nothing to recover
    assert 0.0 <= float(rows["l1-cut0.5"]["map_recovered"]) <= 1.0 and rows["l1-cut0.5"]["map_pruned"] != ""
    # the saved pruned checkpoint is the recovered one
    _, ck = load_checkpoint(tmp_path / "out" / "l1-cut0.5.pruned.pt")
    assert ck.metrics["recovery"]["layers_refit"] > 0
    # masked variants are not recovered, and the recipe they record stays valid (recover 0 with magnitude)
    masked = [v for v in rows if v.startswith("masked-")]
    assert masked and all(rows[v]["map_recovered"] == "" for v in masked)
    _, mk = load_checkpoint(tmp_path / "out" / f"{masked[0]}.pruned.pt")
    assert recipe_from_dict(mk.recipe).prune.recover == 0
