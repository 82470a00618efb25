"""Evaluation: COCO scoring core, VOC AP, evaluate() on fake and real detectors, `surgery eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from surgery.data import CocoDetection, VOCDetection, build_dataset, synthesize
from surgery.measure.evaluate import (
    BBOX_KEYS,
    EvalResult,
    coco_map_from_detections,
    evaluate,
    metric_keys,
    reference_ground_truth,
    voc_ap,
    voc_map50,
)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("ev") / "shapes", images=4, size=64, seed=1, val_images=6).root


@pytest.fixture(scope="module")
def val_ds(synth_root: Path):
    return build_dataset(f"coco:{synth_root}", "val", train=False, with_masks=True)


def _gt_detections(coco, shift: float = 0.0) -> list[dict]:
    """Ground truth as detections, boxes moved right by ``shift`` of their width."""
    dets = []
    for a in coco.dataset["annotations"]:
        if a.get("iscrowd"):
            continue
        x, y, w, h = a["bbox"]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + shift * w, y, w, h], "score": 1.0})  # fmt: skip
    return dets


class Oracle(nn.Module):
    """Returns, in evaluation order, the ground truth of ``dataset`` (optionally without some)."""

    def __init__(self, dataset, drop_every: int = 0, masks: bool = False) -> None:
        super().__init__()
        self.masks = masks
        self.w = nn.Parameter(torch.zeros(1))
        self.targets = [dataset[i][1] for i in range(len(dataset))]
        self.drop_every = drop_every
        self.calls = 0
        self.seen_training: list[bool] = []

    def forward(self, images):
        self.seen_training.append(self.training)
        out = []
        for img in images:
            t = self.targets[self.calls]
            self.calls += 1
            n = len(t["boxes"])
            keep = torch.ones(n, dtype=torch.bool)
            if self.drop_every:
                keep[:: self.drop_every] = False
            out.append({"boxes": t["boxes"][keep], "labels": t["labels"][keep], "scores": torch.ones(int(keep.sum()))})
            if self.masks:  # torchvision's Mask R-CNN layout: [N, 1, H, W] probabilities
                out[-1]["masks"] = t["masks"][keep][:, None].float() * 0.9
            assert img.shape[0] == 3
        return out


class Empty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)} for _ in images]


# --------------------------------------------------------------------------------------------
# scoring core


def test_ground_truth_scores_one_and_shifted_boxes_score_lower(val_ds) -> None:
    gt = val_ds.coco
    perfect = coco_map_from_detections(gt, _gt_detections(gt))
    assert list(perfect) == list(BBOX_KEYS)
    assert perfect["mAP"] == pytest.approx(1.0) and perfect["mAP50"] == pytest.approx(1.0)
    assert perfect["AR100"] == pytest.approx(1.0)
    shifted = coco_map_from_detections(gt, _gt_detections(gt, shift=0.25))
    assert shifted["mAP"] < 0.5 * perfect["mAP"]
    assert shifted["mAP75"] == pytest.approx(0.0)  # IoU 0.6: never matched at 0.75...
    assert shifted["mAP50"] == pytest.approx(1.0)  # ...always at 0.5
    assert coco_map_from_detections(gt, _gt_detections(gt, shift=0.6))["mAP50"] == pytest.approx(0.0)


def test_zero_detections_give_zeros(val_ds) -> None:
    assert coco_map_from_detections(val_ds.coco, []) == dict.fromkeys(BBOX_KEYS, 0.0)
    assert coco_map_from_detections(val_ds.coco, [], iou_type="segm") == dict.fromkeys(metric_keys("segm"), 0.0)


def test_voc_ap_and_map() -> None:
    rec, prec = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)

    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0, "difficult": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "area": 400, "iscrowd": 1, "difficult": 1},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0, "difficult": 0},
        ],
    }
    gt.createIndex()
    dets = _gt_detections(gt)
    assert voc_map50(gt, dets) == pytest.approx(1.0)
    # a detection on the difficult object is not a false positive
    on_difficult = dets + [{"image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "score": 1.0}]
    assert voc_map50(gt, on_difficult) == pytest.approx(1.0)
    # a confident false positive ranked first halves precision at full recall for class a
    fp = dets + [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 2.0}]
    assert voc_map50(gt, fp) == pytest.approx((voc_ap(np.array([0.0, 1.0]), np.array([0.0, 0.5])) + 1.0) / 2)
    assert voc_map50(gt, dets[:1]) == pytest.approx(0.5)  # class b missed


# --------------------------------------------------------------------------------------------
# evaluate()


def test_evaluate_oracle_and_partial_recall(val_ds, tmp_path: Path) -> None:
    model = Oracle(val_ds)
    model.train()
    calls = []
    res = evaluate(model, val_ds, batch_size=4, progress=lambda d, t: calls.append((d, t)), results_file=tmp_path / "r.json")
    assert isinstance(res, EvalResult) and res.num_images == 6
    assert model.training and model.seen_training == [False, False]  # eval mode inside, restored after
    assert calls == [(4, 6), (6, 6)]
    assert res.metrics["mAP"] == pytest.approx(1.0) and res.iou_types == ["bbox"]
    assert res.num_detections == sum(len(t["boxes"]) for t in model.targets)
    assert json.loads((tmp_path / "r.json").read_text())[0].keys() >= {"image_id", "category_id", "bbox", "score"}
    d = res.to_dict()
    assert d["metrics"]["mAP"] == pytest.approx(1.0) and d["num_images"] == 6
    assert json.dumps(d)  # JSON-able

    half = evaluate(Oracle(val_ds, drop_every=2), val_ds, batch_size=4)
    assert 0.2 < half.metrics["AR100"] < 0.8 and half.metrics["mAP"] < 0.8

    # what COCOeval reported as -1 matches what is predicted without running it (zero detections)
    assert res.undefined and set(res.undefined) == set(evaluate(Empty(), val_ds).undefined)

    few = evaluate(Oracle(val_ds), val_ds, max_images=2)  # only those images count
    assert few.num_images == 2 and few.metrics["mAP"] == pytest.approx(1.0)


def test_evaluate_masks_adds_segm(val_ds, tmp_path: Path) -> None:
    res = evaluate(Oracle(val_ds, masks=True), val_ds, results_file=tmp_path / "r.json")
    assert res.iou_types == ["bbox", "segm"]
    assert set(metric_keys("segm")) <= set(res.metrics)
    assert res.metrics["segm_mAP"] == pytest.approx(1.0, abs=0.02) and res.metrics["mAP"] == pytest.approx(1.0)
    assert "counts" in json.loads((tmp_path / "r.json").read_text())[0]["segmentation"]
    only_box = evaluate(Oracle(val_ds, masks=True), val_ds, iou_types=("bbox",))
    assert only_box.iou_types == ["bbox"] and "segm_mAP" not in only_box.metrics


def test_evaluate_zero_detections(val_ds, tmp_path: Path) -> None:
    model = Empty().eval()
    res = evaluate(model, val_ds, results_file=tmp_path / "none.json")
    assert all(res.metrics[k] == 0.0 for k in BBOX_KEYS)
    # 64 px images only hold small objects: COCOeval would say -1 for medium / large
    assert set(res.undefined) == {"mAP_medium", "mAP_large", "AR_medium", "AR_large"}
    assert not model.training
    assert json.loads((tmp_path / "none.json").read_text()) == []


def _coco_folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(root / "images" / name)
    coco = {
        "images": [{"id": 10, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 20, "file_name": "b.png", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [4, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [30, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 20, "category_id": 3, "bbox": [10, 12, 16, 20], "area": 320, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }  # fmt: skip
    (root / "ann.json").write_text(json.dumps(coco))
    return root / "ann.json"


def test_results_file_maps_back_sparse_category_ids(tmp_path: Path) -> None:
    ds = CocoDetection(tmp_path / "c" / "images", _coco_folder(tmp_path / "c"))
    assert ds.label_to_cat_id == {1: 3, 2: 7}
    res = evaluate(Oracle(ds), ds, results_file=tmp_path / "out" / "results.json")
    assert res.metrics["mAP"] == pytest.approx(1.0)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    got = sorted((r["image_id"], r["category_id"], tuple(r["bbox"])) for r in written)
    assert got == [(10, 3, (30, 10, 30, 30)), (10, 7, (4, 5, 20, 10)), (20, 3, (10, 12, 16, 20))]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "results.json"]  # no temp files left


class FixedBoxes(nn.Module):
    """The same detections on every image, whatever it shows (``shift`` moves them right)."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.shift = shift

    def forward(self, images):
        boxes = torch.tensor([[4.0, 5.0, 24.0, 15.0], [30.0, 10.0, 60.0, 40.0], [10.0, 12.0, 26.0, 32.0]])
        boxes[:, 0::2] += self.shift
        return [{"boxes": boxes.clone(), "labels": torch.tensor([2, 1, 1]), "scores": torch.tensor([0.9, 0.6, 0.1])}
                for _ in images]


def test_reference_ground_truth_scores_agreement_with_the_reference_and_reads_no_annotation(tmp_path: Path) -> None:
    """Label-free scoring: the reference's own detections (score >= min_score) are the ground
    truth, so the reference scores 1 and a model that moves its boxes scores less; garbage
    annotations change nothing, although they change the labelled mAP."""
    ds = CocoDetection(tmp_path / "c" / "images", _coco_folder(tmp_path / "c"))
    garbage_json = tmp_path / "garbage.json"
    coco = json.loads((tmp_path / "c" / "ann.json").read_text())
    for a in coco["annotations"]:
        a["bbox"], a["category_id"] = [40, 30, 5, 5], 3
    garbage_json.write_text(json.dumps(coco))
    garbage = CocoDetection(tmp_path / "c" / "images", garbage_json)

    def boxes(gt):  # (COCOeval adds fields to the annotations it scores against)
        return [(a["image_id"], a["category_id"], a["bbox"]) for a in gt.dataset["annotations"]]

    ref = reference_ground_truth(FixedBoxes(), ds, min_score=0.25)
    assert len(boxes(ref)) == 2 * 2  # two images, the 0.1-score box left out
    assert evaluate(FixedBoxes(), ds, ground_truth=ref).metrics["mAP"] == pytest.approx(1.0)
    moved = evaluate(FixedBoxes(shift=6.0), ds, ground_truth=ref).metrics["mAP"]
    assert moved < 0.5

    ref_g = reference_ground_truth(FixedBoxes(), garbage, min_score=0.25)
    assert boxes(ref_g) == boxes(ref)
    assert evaluate(FixedBoxes(shift=6.0), garbage, ground_truth=ref_g).metrics["mAP"] == pytest.approx(moved)
    labelled = evaluate(FixedBoxes(), ds).metrics["mAP"]
    assert evaluate(FixedBoxes(), garbage).metrics["mAP"] != pytest.approx(labelled)  # the labels would have mattered


def test_evaluate_voc_reports_voc_map(tmp_path: Path) -> None:
    year = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / sub).mkdir(parents=True)
    objs = {"a": [("dog", 0, 10, 10, 40, 30), ("cat", 1, 50, 5, 70, 50)], "b": [("car", 0, 1, 1, 60, 50)]}
    for stem, items in objs.items():
        Image.fromarray(np.zeros((60, 80, 3), dtype=np.uint8)).save(year / "JPEGImages" / f"{stem}.jpg")
        body = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
            f"<xmax>{c}</xmax><ymax>{e}</ymax></bndbox></object>"
            for n, d, a, b, c, e in items
        )
        (year / "Annotations" / f"{stem}.xml").write_text(f"<annotation><size><width>80</width><height>60</height></size>{body}</annotation>")
    (year / "ImageSets" / "Main" / "test.txt").write_text("a\nb\n")
    ds = VOCDetection(tmp_path, "test")
    res = evaluate(Oracle(ds), ds)
    assert res.metrics["voc_mAP50"] == pytest.approx(1.0)
    assert res.metrics["mAP"] == pytest.approx(1.0)  # the difficult cat is ignored, not missed


def test_evaluate_real_detector(synth_root: Path) -> None:
    from surgery.detectors.builders import build_model

    ds = build_dataset(f"coco:{synth_root}", "val", train=False)
    # untrained: a low score threshold so that its (poor) detections reach the scoring
    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=64, max_size=64, score_thresh=0.0)
    model.train()
    res = evaluate(model, ds, batch_size=2, max_images=4)
    assert model.training
    assert res.num_images == 4 and res.iou_types == ["bbox"] and res.num_detections > 0
    assert set(BBOX_KEYS) <= set(res.metrics)
    assert all(0.0 <= v <= 1.0 for v in res.metrics.values())
    assert res.seconds > 0


def test_cli_eval(synth_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from surgery.detectors.builders import ModelSpec, build_model
    from surgery.storage.checkpoint import save_checkpoint

    spec = ModelSpec("fcos_resnet18_slim", {"num_classes": 5, "min_size": 64, "max_size": 64, "fpn_channels": 32})
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(spec), spec)
    out = tmp_path / "res.json"
    res = CliRunner().invoke(
        app, ["eval", str(ckpt), "--data", f"coco:{synth_root}", "--max-images", "2", "--batch-size", "2", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "mAP50" in res.output and "AR100" in res.output
    saved = json.loads(out.read_text())  # --json: the metrics; detections have their own option
    assert set(BBOX_KEYS) <= set(saved["metrics"]) and saved["num_images"] == 2


def test_evaluate_keypoints(tmp_path: Path) -> None:
    root = tmp_path / "kp"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(root / "images" / "p.png")
    rng = np.random.default_rng(0)
    kps = np.concatenate([rng.uniform(12, 58, size=(17, 2)), np.full((17, 1), 2.0)], 1)
    coco = {
        "images": [{"id": 1, "file_name": "p.png", "width": 80, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500,
                         "iscrowd": 0, "num_keypoints": 17, "keypoints": kps.reshape(-1).tolist()}],
        "categories": [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(17)], "skeleton": []}],
    }  # fmt: skip
    (root / "ann.json").write_text(json.dumps(coco))
    ds = build_dataset(str(root / "ann.json"), "val", train=False)
    assert ds.has_keypoints

    class KeypointOracle(nn.Module):
        def forward(self, images):
            return [{"boxes": torch.tensor([[10.0, 10, 60, 60]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9]),
                     "keypoints": torch.tensor(kps, dtype=torch.float32)[None]} for _ in images]  # fmt: skip

    res = evaluate(KeypointOracle(), ds)
    assert res.iou_types == ["bbox", "keypoints"]
    assert res.metrics["kp_mAP"] == pytest.approx(1.0) and res.metrics["mAP"] == pytest.approx(1.0)
    assert set(metric_keys("keypoints")) <= set(res.metrics)
