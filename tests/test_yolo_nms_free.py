"""NMS-free Ultralytics heads (YOLOv10's v10Detect, YOLO26's end-to-end Detect), the shipped
detection yamls (each works or is refused in one line) and the hand-back to Ultralytics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from surgery.detectors.builders import ModelSpec, build_model
from surgery.errors import UnknownModelError
from surgery.measure import count_params
from surgery.storage.checkpoint import load
from tests.yolo_helpers import SIZE, images, prune_with_cli, train_step

NMS_FREE = ["yolo26n.yaml", "yolov10n.yaml"]










def _vary(model: nn.Module) -> None:
    """Trained-looking BatchNorm statistics and distinct head outputs (an untrained YOLO ties)."""
    head = model.net.model[-1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        for name in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
            for seq in getattr(head, name, None) or []:
                seq[-1].weight.copy_(torch.randn(seq[-1].weight.shape, generator=g) * 0.01)
                seq[-1].bias.copy_(torch.randn(seq[-1].bias.shape, generator=g) * 0.5 - 2)


def _branches(model: nn.Module) -> dict[str, torch.Tensor]:
    """Raw outputs of both head branches (boxes and class logits per anchor) in eval mode: exact
    comparisons, no top-k ties."""
    model.eval()
    with torch.no_grad():
        batch, _, _ = model.transform(images())
        model._sync_widths()
        _, raw = model.net(batch)
    if "one2one" not in raw:  # a Detect head without a one-to-one branch
        raw = {"one2many": raw}
    return {f"{b}.{k}": v[k] for b, v in raw.items() for k in ("boxes", "scores")}


def _neck_widths(model: nn.Module) -> list[int]:
    """Channels of the feature maps the head reads, measured by running the network."""
    head = model.net.model[-1]
    widths: list[int] = []
    hook = head.register_forward_pre_hook(lambda _m, args: widths.extend(int(x.shape[1]) for x in args[0]))
    try:
        _branches(model)
    finally:
        hook.remove()
    return widths


def _check_head_matches_neck(model: nn.Module) -> None:
    """Every conv of both branches chains, their first convs read the neck's (new) widths, and the
    output convs keep 4 * reg_max box and nc class channels."""
    head = model.net.model[-1]
    widths = _neck_widths(model)
    assert len(widths) == head.nl
    for name, out_ch in (("cv2", 4 * head.reg_max), ("cv3", head.nc), ("one2one_cv2", 4 * head.reg_max),
                         ("one2one_cv3", head.nc)):  # fmt: skip
        for level, seq in enumerate(getattr(head, name)):
            convs = [x for x in seq.modules() if isinstance(x, nn.Conv2d)]
            assert convs[0].in_channels == widths[level], (name, level)
            for a, b in zip(convs, convs[1:]):
                assert b.in_channels == a.out_channels, (name, level)
            assert convs[-1].out_channels == out_ch, (name, level)


@pytest.mark.parametrize("yaml", [*NMS_FREE, pytest.param("yolo26s.yaml", marks=pytest.mark.slow)])
def test_nms_free_prune_cli_eval_train_reload_export(yaml: str, tmp_path, ultralytics) -> None:
    from surgery.deployment.export import export_onnx

    dense, model, out = prune_with_cli(yaml, tmp_path)
    assert _neck_widths(model) != _neck_widths(dense)  # the neck was cut...
    _check_head_matches_neck(model)  # ...and both branches with it
    assert not model.nms  # one-to-one outputs, no NMS
    model.score_thresh = 0.0
    outs = model.eval()(images())
    assert [len(o["boxes"]) for o in outs] == [model.detections_per_img] * 2  # the head's own top-k, no NMS
    for o, img in zip(outs, images()):
        assert torch.isfinite(o["boxes"]).all() and o["labels"].min() >= 1 and o["labels"].max() <= 4
        assert o["boxes"][:, 2].max() <= img.shape[-1] and o["boxes"][:, 3].max() <= img.shape[-2]
        assert torch.all(o["scores"][:-1] >= o["scores"][1:])
    again = load(out)
    for k, v in _branches(model).items():
        assert torch.equal(v, _branches(again)[k]), k
    losses = train_step(model)
    assert set(losses) == {"loss_box", "loss_cls", "loss_l1" if model.net.model[-1].reg_max == 1 else "loss_dfl"}
    _vary(again)
    export = export_onnx(again, tmp_path / "m.onnx", SIZE)
    assert export.verified, export.notes
    assert export.num_detections == again.detections_per_img


def test_nms_free_one_to_many_with_nms(ultralytics) -> None:
    """``end2end=False`` predicts with the one-to-many branch and NMS, as Ultralytics' nms=True does."""
    model = build_model(ModelSpec("ultralytics:yolo26n.yaml", {"nc": 4, "size": SIZE, "end2end": False}))
    _vary(model)
    assert model.nms and not model.net.model[-1].end2end
    boxes, scores = model.eval().predict(model.transform(images())[0])
    anchors = sum((SIZE // s) ** 2 for s in (8, 16, 32))
    assert boxes.shape == (2, anchors, 4) and scores.shape == (2, anchors, 4)
    raw = _branches(model)
    torch.testing.assert_close(scores.transpose(1, 2), raw["one2many.scores"].sigmoid())


@pytest.mark.parametrize("yaml", [*NMS_FREE, "yolo12n.yaml", "yolov8n-ghost.yaml"])
def test_nms_free_zeroed_channels_equivalence(yaml: str, ultralytics) -> None:
    """Zero the channels that will be cut (filters and their BatchNorm) first: cutting them must leave
    both branches' outputs unchanged. Without the trace seeing through the one-to-one branch's
    detach, its input convs keep the old widths and the cut model does not even run. (YOLO12n: its
    area attention, whose trace used to grow past 6 GB, cut the same way as C2PSA.)"""
    from surgery.pruning.graph import trace

    model = build_model(ModelSpec(f"ultralytics:{yaml}", {"nc": 4, "size": SIZE}))
    _vary(model)
    graph = trace(model, trace_size=SIZE)
    head = f"net.model.{len(model.net.model) - 1}"
    if not hasattr(model.net.model[-1], "one2one_cv2"):
        _cut_zeroed_and_compare(model, graph)
        return
    firsts = {b: {f"{head}.{b}.{lvl}.0.conv" for lvl in range(3)} for b in ("cv2", "one2one_cv2")}
    coupled = [g for g in graph.groups if set(g.consumers) & (firsts["cv2"] | firsts["one2one_cv2"])]
    assert len(coupled) == 3 and all(set(g.consumers) & firsts["cv2"] and set(g.consumers) & firsts["one2one_cv2"]
                                      for g in coupled)  # each neck output's group reaches both branches
    _cut_zeroed_and_compare(model, graph)


def _cut_zeroed_and_compare(model: nn.Module, graph, max_params: float = 0.5) -> None:
    """Zero what the ratio-0.5 plan cuts, cut it, compare the head's raw outputs."""
    from surgery.config.recipe import PruneSection
    from surgery.pruning.prune import apply_channel_plan, plan_channels

    params_before = count_params(model).total
    plan = plan_channels(graph, PruneSection(ratio=0.5))
    assert len(plan) > 20
    with torch.no_grad():
        for idx, cut in plan.items():
            for item in graph.groups[idx].tp_group:
                layer = item.dep.target.module
                if not graph.dg.is_out_channel_pruning_fn(item.dep.handler) or not isinstance(layer, nn.Module):
                    continue
                zero = [i for i, r in zip(item.idxs, item.root_idxs) if r in set(cut)]
                if isinstance(layer, nn.Conv2d):
                    layer.weight[zero] = 0
                    if layer.bias is not None:
                        layer.bias[zero] = 0
                elif isinstance(layer, nn.BatchNorm2d):  # bias + gamma * (x - mean) / std = 0
                    layer.weight[zero] = 0
                    layer.bias[zero] = 0
    before = _branches(model)
    apply_channel_plan(graph, plan)
    after = _branches(model)
    assert count_params(model).total < max_params * params_before
    if hasattr(model.net.model[-1], "one2one_cv2"):
        _check_head_matches_neck(model)
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-4, rtol=1e-4, msg=k)


def _head_widths(model: nn.Module) -> dict[str, int]:
    """Output widths of the Detect head's convs, depthwise ones left out (a depthwise conv at a branch's
    entry passes the neck's width through, so it follows the neck's cut)."""
    head = model.net.model[-1]
    return {n: m.out_channels for n, m in head.named_modules()
            if isinstance(m, nn.Conv2d) and not (m.groups > 1 and m.groups == m.in_channels)}  # fmt: skip


@pytest.mark.parametrize("yaml", ["yolo26n.yaml", "yolov8n.yaml"])
def test_keep_head_keeps_detect_widths_and_meets_a_75pct_macs_cut(yaml: str, tmp_path, ultralytics) -> None:
    """``--keep-head``: every conv of the Detect branches (YOLO26: both, one-to-one included) keeps its
    width, the neck and backbone are cut more so that the MACs target is still met (within 2%), and
    the branches read the neck's new widths."""
    from surgery.storage.checkpoint import read_checkpoint

    out = tmp_path / "pruned.pt"
    res = CliRunner().invoke(
        app, ["prune", "--model", f"ultralytics:{yaml}", "-k", "nc=4", "-k", f"size={SIZE}", "--keep-macs", "0.25",
              "--keep-head", "--round-to", "8", "--macs-size", str(SIZE), "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    dense = build_model(ModelSpec(f"ultralytics:{yaml}", {"nc": 4, "size": SIZE}))
    model = load(out)
    plan = read_checkpoint(out).plan
    assert abs(plan.achieved_macs_ratio - 0.25) <= 0.02, plan.achieved_macs_ratio
    assert plan.skip == ["@head"]
    assert _head_widths(model) == _head_widths(dense)
    assert all(a < b for a, b in zip(_neck_widths(model), _neck_widths(dense)))  # the neck outputs are cut
    if hasattr(model.net.model[-1], "one2one_cv2"):
        _check_head_matches_neck(model)
    boxes, scores = model.eval().predict(model.transform(images())[0])
    assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()


def test_keep_head_zeroed_channels_equivalence(ultralytics) -> None:
    """With the head kept (YOLO26n), zeroing what the cut removes, then cutting, leaves both branches'
    raw outputs unchanged: the neck groups the head's entry depthwise convs share are cut consistently."""
    from surgery.pruning.graph import HEAD, trace

    model = build_model(ModelSpec("ultralytics:yolo26n.yaml", {"nc": 4, "size": SIZE}))
    _vary(model)
    widths = _head_widths(model)
    graph = trace(model, trace_size=SIZE, skip=(HEAD,))
    kept = [g for g in graph.groups if g.reason == "detection head (keep_head)"]
    assert len(kept) == 24  # 2 inner groups per branch (cv2, cv3, one2one_cv2, one2one_cv3) and level (3)
    _cut_zeroed_and_compare(model, graph, max_params=0.6)
    assert _head_widths(model) == widths


# --------------------------------------------------------------------------------------------
# the package's other detection yamls


def test_detection_yamls_listed_and_refusals_are_one_line(ultralytics) -> None:
    from surgery.yolo.ultralytics_adapter import list_ultralytics_detection_yamls

    rows = {r.name: r for r in list_ultralytics_detection_yamls()}
    for name in ("yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov10n.yaml", "yolo26n-p2.yaml"):
        assert rows[name].supported, name
    refused = [r for r in rows.values() if not r.supported]
    assert {r.head for r in refused} >= {"WorldDetect", "YOLOEDetect", "RTDETRDecoder"}
    for r in rows.values():  # every listed name resolves to its own file
        assert ultralytics.tasks.yaml_model_load(r.name)["yaml_file"] == r.name
    for r in refused:
        with pytest.raises(UnknownModelError) as e:
            build_model(ModelSpec(f"ultralytics:{r.name}", {"nc": 4}))
        msg = str(e.value)
        assert "\n" not in msg and "{" not in msg and len(msg) < 400 and r.head in msg, msg
    for name, task in (("yolov8n-seg.yaml", "segment"), ("yolo26n-pose.yaml", "pose"), ("yolo11n-obb.yaml", "obb")):
        assert build_model(ModelSpec(f"ultralytics:{name}", {"nc": 4, "size": 64})).task == task  # task heads build
    with pytest.raises(UnknownModelError, match="head Classify: [^{]*$"):  # no config dict in the line
        build_model(ModelSpec("ultralytics:yolov8n-cls.yaml", {"nc": 4}))


def _shipped_detection_yamls() -> list:
    """One test per detection yaml of the installed package (none without it)."""
    from surgery.yolo.ultralytics_adapter import list_ultralytics_detection_yamls

    try:
        return [pytest.param(row, id=row.name) for row in list_ultralytics_detection_yamls()]
    except UnknownModelError:
        return [pytest.param(None, marks=pytest.mark.skip(reason="ultralytics is not installed"))]


@pytest.mark.slow
@pytest.mark.parametrize("row", _shipped_detection_yamls())
def test_every_shipped_detection_yaml_prunes_or_is_refused(row, ultralytics) -> None:
    """Every detection yaml of the installed package (smallest scale): the supported ones build,
    prune at ratio 0.5 (fewer parameters), predict and take a training step; the others are refused
    in one line naming the head."""
    from surgery.config.recipe import PruneSection
    from surgery.pruning.prune import prune_model

    spec = ModelSpec(f"ultralytics:{row.name}", {"nc": 4, "size": 64})
    if not row.supported:
        with pytest.raises(UnknownModelError, match=f"head {row.head}: [^{{\\n]*$"):
            build_model(spec)
        return
    model = build_model(spec)
    before = count_params(model).total
    prune_model(model, PruneSection(ratio=0.5))
    assert count_params(model).total < 0.6 * before
    if getattr(model.net.model[-1], "one2one_cv2", None) is not None:
        _check_head_matches_neck(model)
    with torch.no_grad():
        assert len(model.eval()(images())) == 2
    train_step(model)


# --------------------------------------------------------------------------------------------
# hand-back to Ultralytics


def test_coco_to_yolo_txt_labels_match_the_annotations(tmp_path) -> None:
    import json

    from surgery.data import synthesize
    from surgery.data.yolo_txt import coco_to_yolo_txt

    synthesize(tmp_path / "coco", images=6, size=96, seed=3, val_images=4)
    ds = coco_to_yolo_txt(tmp_path / "coco", tmp_path / "yolo")
    coco = json.loads((tmp_path / "coco/annotations/instances_val.json").read_text())
    cats = sorted(c["id"] for c in coco["categories"])
    assert ds.names == [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    assert ds.images == {"train": 6, "val": 4} and ds.objects["val"] == len(coco["annotations"])
    for im in coco["images"]:
        rows = [list(map(float, ln.split())) for ln in
                (tmp_path / "yolo/labels/val" / (Path(im["file_name"]).stem + ".txt")).read_text().splitlines()]  # fmt: skip
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(rows) == len(anns)
        for row, a in zip(rows, anns):
            x, y, w, h = a["bbox"]
            want = [cats.index(a["category_id"]), (x + w / 2) / im["width"], (y + h / 2) / im["height"],
                    w / im["width"], h / im["height"]]  # fmt: skip
            assert row == pytest.approx(want, abs=1e-5)
        assert (tmp_path / "yolo/images/val" / Path(im["file_name"]).name).is_file()
    with pytest.raises(Exception, match="not an empty folder"):
        coco_to_yolo_txt(tmp_path / "coco", tmp_path / "yolo")


@pytest.mark.parametrize("yaml", ["yolov8n.yaml", "yolo26n.yaml"])
def test_export_ultralytics_round_trip(yaml: str, tmp_path, ultralytics) -> None:
    """A pruned checkpoint goes back to Ultralytics: YOLO(file) has the pruned parameter count and
    layer shapes, computes what surgery's network computes, predicts and validates on a yaml dataset
    (the synthetic set converted to the YOLO txt layout), offline."""
    from ultralytics import YOLO

    from surgery.data import synthesize
    from surgery.data.yolo_txt import coco_to_yolo_txt

    pruned, handed = tmp_path / "pruned.pt", tmp_path / "back.pt"
    res = CliRunner().invoke(
        app, ["prune", "--model", f"ultralytics:{yaml}", "-k", "nc=4", "-k", f"size={SIZE}", "--ratio", "0.5",
              "--macs-size", str(SIZE), "--out", str(pruned)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["export", str(pruned), "--format", "ultralytics", "--out", str(handed)])
    assert res.exit_code == 0, res.output
    ours = load(pruned)
    dense = build_model(ModelSpec(f"ultralytics:{yaml}", {"nc": 4, "size": SIZE}))
    theirs = YOLO(str(handed))
    n = sum(p.numel() for p in theirs.model.parameters())
    assert n == count_params(ours.net).total < 0.5 * count_params(dense.net).total
    assert {k: v.shape for k, v in theirs.model.state_dict().items()} == {k: v.shape for k, v in ours.net.state_dict().items()}
    batch = ours.transform(images())[0]
    ours._sync_widths()
    with torch.no_grad():
        ours.net.model[-1].__dict__.pop("_end2end", None)  # Ultralytics' default branch for both
        theirs.model.eval()
        torch.testing.assert_close(theirs.model(batch)[0], ours.net.eval()(batch)[0])
    synthesize(tmp_path / "coco", images=8, size=SIZE, seed=0, val_images=8)
    ds = coco_to_yolo_txt(tmp_path / "coco", tmp_path / "yolo")
    preds = theirs.predict(str(tmp_path / "yolo/images/val"), imgsz=SIZE, device="cpu", verbose=False, save=False)
    assert len(preds) == 8 and all(p.boxes.data.shape[-1] == 6 for p in preds)
    metrics = theirs.val(data=str(ds.data_yaml), imgsz=SIZE, batch=4, device="cpu", plots=False, workers=0,
                         verbose=False, project=str(tmp_path / "runs"))  # fmt: skip
    assert 0.0 <= metrics.box.map <= 1.0 and metrics.box.nc == 4
    assert sum(p.numel() for p in theirs.model.parameters()) <= n  # val fused Conv+BN: never wider
    # Ultralytics' trainer rebuilds from model.yaml (the original widths) unless given the model itself:
    # the trainer docs/benchmarks/yolo-nms-free.md shows keeps the pruned widths through training and its own save
    from ultralytics.models.yolo.detect import DetectionTrainer

    class KeepPrunedWidths(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            return weights

    again = YOLO(str(handed))
    again.train(data=str(ds.data_yaml), trainer=KeepPrunedWidths, epochs=1, imgsz=SIZE, batch=4, workers=0,
                plots=False, device="cpu", amp=False, verbose=False, project=str(tmp_path / "runs"), name="t")  # fmt: skip
    assert sum(p.numel() for p in again.model.parameters()) == n
    assert sum(p.numel() for p in YOLO(str(tmp_path / "runs/t/weights/last.pt")).model.parameters()) == n


def test_export_ultralytics_refuses_other_models_and_bad_formats(tmp_path) -> None:
    from surgery.deployment.export import ExportError
    from surgery.storage.checkpoint import save_checkpoint

    spec = ModelSpec("yolov2_darknet19", {"num_classes": 5, "width": 0.25, "size": SIZE})
    ckpt = save_checkpoint(tmp_path / "v2.pt", build_model(spec), spec)
    res = CliRunner().invoke(app, ["export", str(ckpt), "--format", "ultralytics", "--out", str(tmp_path / "u.pt")])
    assert isinstance(res.exception, ExportError) and "ultralytics:" in str(res.exception)
    assert not (tmp_path / "u.pt").exists()
    res = CliRunner().invoke(app, ["export", str(ckpt), "--format", "tflite"])
    assert res.exit_code != 0 and "expected onnx or ultralytics" in str(res.exception)
