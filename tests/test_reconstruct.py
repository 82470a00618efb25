"""Label-free recovery (surgery.pruning.reconstruct): images only, the dense model as teacher."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from surgery.config.recipe import PruneSection, recipe_from_dict
from surgery.data.image_folder import image_batches, image_files
from surgery.detectors.builders import build_model
from surgery.errors import PruningError, RecipeError
from surgery.pruning.calibrate import calibration_data
from surgery.pruning.prune import prune_model
from surgery.pruning.reconstruct import matched_layers, reconstruct
from surgery.pruning.recover import recover
from surgery.storage.checkpoint import load_checkpoint
from surgery.storage.safety import OutputError

SIZE = 64


def _images(n: int, seed: int, size: int = SIZE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


def _head_error(model: nn.Module, dense: nn.Module, names: list[str], batches: list[list[torch.Tensor]]) -> float:
    """Independent oracle: relative squared error of the named layers' outputs (every call), measured
    with plain forward hooks on images the recovery never saw, summed over layers and batches."""
    def grab(m: nn.Module) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        mods = dict(m.named_modules())
        hs = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: out.setdefault(n, []).append(o.detach()))
              for n in names]
        with torch.no_grad():
            for b in batches:
                m.eval()(b)
        for h in hs:
            h.remove()
        return out

    p, d = grab(model), grab(dense)
    num = sum(float(((a - b) ** 2).sum()) for n in names for a, b in zip(p[n], d[n]))
    den = sum(float((b**2).sum()) for n in names for b in d[n])
    return num / den


def _cut_slim(ckpt: Path, ratio: float = 0.5):
    model, ck = load_checkpoint(ckpt)
    model.eval()
    dense = copy.deepcopy(model)
    result = prune_model(model, PruneSection(ratio=ratio), trace_size=SIZE)
    return model, dense, result, ck


def test_reconstruction_lowers_held_out_head_error_below_the_refit(trained_slim: Path):
    """Oracle: on images neither stage saw, the head outputs of the reconstructed model are closer
    to the dense model's than after the least-squares re-fit alone (same calibration images)."""
    model, dense, result, _ = _cut_slim(trained_slim)
    calib = [_images(4, seed=s) for s in range(4)]
    fresh = [_images(4, seed=100 + s) for s in range(2)]
    refit_only = copy.deepcopy(model)
    recover(refit_only, dense, calib, kept=result.kept, batches=3)  # the batches reconstruct steps on
    report = reconstruct(dense, model, calib, kept=result.kept, batches=4, steps=20, eval_every=10, lr=1e-4)
    heads = matched_layers(model, dense)
    dense_mods = dict(dense.named_modules())
    assert report.layers == heads and heads  # the first layers after the cut whose outputs kept their width
    for n, m in model.named_modules():
        if n in heads:
            assert m.out_channels == dense_mods[n].out_channels and m.in_channels < dense_mods[n].in_channels
    assert report.steps == 20 and report.best_step > 0, report.history
    assert report.error_best < report.error_refit < report.error_cut, report.summary()
    e_refit, e_rec = _head_error(refit_only, dense, heads, fresh), _head_error(model, dense, heads, fresh)
    assert e_rec < 0.9 * e_refit, (e_refit, e_rec)
    assert report.summary()["seconds"] > 0 and report.held_out_images == 4 and report.calibration_images == 12


def test_reconstruction_keeps_the_refit_when_no_step_helps(trained_slim: Path):
    """A learning rate far too large makes every step worse on the held-out images (or the loss
    non-finite): the weights kept are the re-fit's (best_step 0), and the steps stop early."""
    model, dense, result, _ = _cut_slim(trained_slim)
    calib = [_images(4, seed=s) for s in range(3)]
    ref = copy.deepcopy(model)
    report = reconstruct(dense, model, calib, kept=result.kept, batches=3, steps=50, lr=0.5, eval_every=2, patience=2,
                         restarts=0)
    assert report.best_step == 0 and report.steps <= 4, report.history
    assert report.stopped in ("no improvement", "non-finite loss") and report.error_best == report.error_refit
    recover(ref, dense, calib[:2], kept=result.kept, batches=2)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_reconstruction_restarts_at_a_smaller_learning_rate_when_no_step_helps(trained_slim: Path):
    """At a learning rate far too large no step helps: the steps start again from the re-fit's
    weights at the rate divided by ``backoff`` until one does, and the kept weights come from the
    smaller rate, closer to the teacher on held-out images than the re-fit."""
    model, dense, result, _ = _cut_slim(trained_slim)
    calib = [_images(4, seed=s) for s in range(4)]
    report = reconstruct(dense, model, calib, kept=result.kept, batches=4, steps=30, lr=0.5, eval_every=5,
                         restarts=2, backoff=50.0)
    assert report.best_step > 0 and report.lr == pytest.approx(0.5 / 50**2), report.history
    assert report.error_best < report.error_refit, report.history
    assert report.history[1][1] >= report.error_refit  # the first evaluation, at lr 0.5, was no better


def _garble_labels(root: Path) -> None:
    """Every annotation of the COCO set replaced by a random box of a random class."""
    rng = random.Random(7)
    for ann_file in (root / "annotations").glob("instances_*.json"):
        doc = json.loads(ann_file.read_text())
        sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
        cats = [c["id"] for c in doc["categories"]]
        for a in doc["annotations"]:
            w, h = sizes[a["image_id"]]
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            a["bbox"] = [x, y, rng.uniform(2, w / 2), rng.uniform(2, h / 2)]
            a["category_id"] = rng.choice(cats)
            a["area"] = a["bbox"][2] * a["bbox"][3]
        ann_file.write_text(json.dumps(doc))


def test_reconstruction_never_reads_annotations(trained_slim: Path, synthetic_shapes, tmp_path: Path):
    """The same images with garbage labels give bit-identical recovered weights."""
    garbage = tmp_path / "garbage"
    shutil.copytree(synthetic_shapes.root, garbage)
    _garble_labels(garbage)
    outs = []
    for root in (synthetic_shapes.root, garbage):
        model, dense, result, _ = _cut_slim(trained_slim)
        rec = recipe_from_dict({"data": {"source": f"coco:{root}"}}, "test")
        torch.manual_seed(0)
        reconstruct(dense, model, calibration_data(rec.data, batches=2, batch_size=4), kept=result.kept, batches=2,
                    steps=6, eval_every=3, lr=1e-4)
        outs.append(model.state_dict())
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_image_files_take_images_only_from_folders_and_datasets(synthetic_shapes, tmp_path: Path):
    files = image_files(synthetic_shapes.train_dir)
    assert files and all(f.suffix == ".jpg" or f.suffix == ".png" for f in files)
    # a COCO dataset: its train images, never the annotation json
    coco = image_files(f"coco:{synthetic_shapes.root}")
    assert sorted(coco) == sorted(files)
    nested = tmp_path / "deploy" / "cam1"
    nested.mkdir(parents=True)
    for f in files[:3]:
        shutil.copy(f, nested / f.name)
    (tmp_path / "deploy" / "notes.txt").write_text("not an image")
    found = image_files(tmp_path / "deploy")
    assert [f.name for f in found] == sorted(f.name for f in files[:3])
    batches = list(image_batches(found, batch_size=2))
    assert [len(b) for b in batches] == [2, 1] and batches[0][0].dtype == torch.float32
    assert 0.0 <= float(batches[0][0].min()) and float(batches[0][0].max()) <= 1.0


def test_cli_recover_writes_a_checkpoint_and_refuses_to_overwrite(trained_slim: Path, synthetic_shapes, tmp_path: Path):
    runner = CliRunner()
    pruned, out = tmp_path / "p.pt", tmp_path / "r.pt"
    r = runner.invoke(app, ["prune", "--model", str(trained_slim), "--ratio", "0.5", "--out", str(pruned)])
    assert r.exit_code == 0, r.output
    args = ["recover", str(pruned), "--teacher", "auto", "--images", str(synthetic_shapes.train_dir), "--out", str(out),
            "--batches", "2", "--batch-size", "4", "--steps", "4"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"teacher {trained_slim}" in r.output and "held-out head-output error" in r.output
    model, ck = load_checkpoint(out)
    assert ck.kind == "structured" and ck.metrics["recovery"]["method"] == "reconstruct"
    assert ck.metrics["recovery"]["calibration_images"] == 4 and ck.metrics["recovery"]["held_out_images"] == 4
    before, _ = load_checkpoint(pruned)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    stamp = out.stat().st_mtime_ns
    r = runner.invoke(app, args)
    assert isinstance(r.exception, OutputError) and "--overwrite" in str(r.exception) and out.stat().st_mtime_ns == stamp
    r = runner.invoke(app, ["recover", str(trained_slim), "--images", str(synthetic_shapes.train_dir),
                            "--out", str(tmp_path / "x.pt")])
    assert isinstance(r.exception, PruningError) and "dense checkpoint" in str(r.exception), r.output
    assert not (tmp_path / "x.pt").exists()


def test_recipe_chooses_the_recovery_method():
    rec = recipe_from_dict({"prune": {"recover": 4, "recover_method": "reconstruct", "recover_steps": 50,
                                      "recover_seconds": 60}}, "x")
    assert rec.prune.recover_method == "reconstruct" and rec.prune.recover_steps == 50
    assert recipe_from_dict({}, "x").prune.recover_method == "refit"
    with pytest.raises(RecipeError, match="prune.recover_method"):
        recipe_from_dict({"prune": {"recover_method": "distill"}}, "x")
    with pytest.raises(RecipeError, match="prune.recover_seconds"):
        recipe_from_dict({"prune": {"recover_seconds": 0}}, "x")


def test_reconstruction_runs_on_a_two_stage_detector_and_yolo(ultralytics):
    """Faster R-CNN (box head compared on the teacher's proposals) and YOLOv8n (DFL constants untouched)."""
    for name, kwargs in (("fasterrcnn_mobilenet_v3_large_320_fpn",
                          {"num_classes": 5, "min_size": 96, "max_size": 96, "rpn_post_nms_top_n_test": 32,
                           "box_detections_per_img": 10}),
                         ("ultralytics:yolov8n.yaml", {"nc": 4, "size": 96})):
        torch.manual_seed(0)
        model = build_model(name, **kwargs).eval()
        dense = copy.deepcopy(model)
        result = prune_model(model, PruneSection(ratio=0.5), trace_size=96)
        fixed = {n: p.detach().clone() for n, p in model.named_parameters()
                 if any(n.startswith(f + ".") for f in getattr(model, "fixed_weights", lambda: [])())}
        report = reconstruct(dense, model, [_images(2, seed=s, size=96) for s in range(3)], kept=result.kept,
                             batches=3, steps=4, eval_every=2, lr=1e-4)
        assert report.steps >= 2 and report.error_best <= report.error_refit, (name, report.history)
        if name.startswith("fasterrcnn"):
            assert "roi_heads.box_predictor.cls_score" in report.layers
        else:
            assert fixed and all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fixed.items())



def test_variance_loss_floor_keeps_a_near_constant_channel_from_dominating(trained_slim: Path):
    """The variance-normalised error divides each head channel's error by the teacher's variance of that channel.
    A channel the teacher holds (nearly) constant -- a background logit -- has a variance near zero:
    a student whose only difference is a small offset on that channel must not get an error orders of
    magnitude above the same student without the offset (the variance floor bounds the channel's weight)."""
    model, dense, result, _ = _cut_slim(trained_slim)
    head = matched_layers(model, dense)[0]
    with torch.no_grad():  # channel 0 of the first matched layer: near-constant in the teacher
        dict(dense.named_modules())[head].weight[0].mul_(1e-6)
        dict(model.named_modules())[head].weight[0].mul_(1e-6)
    calib = [_images(4, seed=s) for s in range(3)]
    errors = []
    for offset in (0.0, 0.05):
        student = copy.deepcopy(model)
        with torch.no_grad():
            dict(student.named_modules())[head].bias[0].add_(offset)
        report = reconstruct(dense, student, calib, kept=result.kept, batches=3, steps=0, refit=False, loss="variance")
        errors.append(report.error_cut)
    assert all(math.isfinite(e) for e in errors), errors
    # the offset on one channel of one layer moves the mean error by a bounded amount, not by 1/variance
    assert errors[1] < errors[0] + 0.5, errors
    energy = reconstruct(dense, copy.deepcopy(model), calib, kept=result.kept, batches=3, steps=0, refit=False,
                         loss="energy")
    assert energy.error_cut > 0 and energy.error_cut != errors[0]


def test_augmented_steps_show_teacher_and_student_the_same_new_views(trained_slim: Path):
    """With augmentation (the default) the steps run on crops mixed with other calibration images:
    images that are none of the calibration images, and every one the student is stepped on is one
    the teacher was shown too (function matching needs both to see the same view)."""
    model, dense, result, _ = _cut_slim(trained_slim)
    calib = [_images(4, seed=s) for s in range(3)]
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    dense.register_forward_pre_hook(lambda m, i: seen["teacher"].extend(t.detach().clone() for t in i[0]))
    model.register_forward_pre_hook(lambda m, i: seen["student"].extend(t.detach().clone() for t in i[0]))
    report = reconstruct(dense, model, calib, kept=result.kept, batches=3, steps=4, eval_every=2, refit=False)
    assert report.steps == 4
    originals = [t for b in calib for t in b] + [t.flip(-1) for b in calib for t in b]
    new_views = [s for s in seen["student"] if not any(torch.equal(s, o) for o in originals)]
    assert len(new_views) == 4 * 4, len(new_views)  # every image of every step is a new view
    assert all(any(torch.equal(v, t) for t in seen["teacher"]) for v in new_views)
    plain = copy.deepcopy(model)
    seen["student"].clear()
    reconstruct(dense, plain, calib, kept=result.kept, batches=3, steps=4, eval_every=2, refit=False, augment=False)
    assert all(any(torch.equal(s, o) for o in originals) for s in seen["student"])


def test_response_terms_join_the_error_of_ultralytics_models_only(ultralytics, trained_slim: Path):
    """``response``: the YOLO head's class-score and box-distribution KL against the teacher join the
    matched layers' error (what the steps lower and the held-out rule reads); a detector without a
    Detect head (the FCOS) gets exactly the layer error."""
    torch.manual_seed(0)
    yolo = build_model("ultralytics:yolov8n.yaml", nc=4, size=96).eval()
    dense = copy.deepcopy(yolo)
    result = prune_model(yolo, PruneSection(ratio=0.5), trace_size=96)
    mods = dict(yolo.named_modules())
    with torch.no_grad():  # the student's class logits off the teacher's (an untrained head's differ by ~0)
        for name in matched_layers(yolo, dense):
            if mods[name].out_channels == 4:
                mods[name].bias.add_(3.0)
    data = [_images(2, seed=s, size=96) for s in range(3)]
    errors = [reconstruct(dense, copy.deepcopy(yolo), data, kept=result.kept, batches=3, steps=0, refit=False,
                          response=w).error_cut for w in (0.0, 1.0, 2.0)]
    assert errors[0] < errors[1] < errors[2], errors
    assert errors[2] - errors[0] == pytest.approx(2 * (errors[1] - errors[0]), rel=1e-3)  # linear in the weight
    model, dense, result, _ = _cut_slim(trained_slim)
    calib = [_images(4, seed=s) for s in range(3)]
    plain, weighted = (reconstruct(dense, copy.deepcopy(model), calib, kept=result.kept, batches=3, steps=0,
                                   refit=False, response=w).error_cut for w in (0.0, 1.0))
    assert plain == weighted
