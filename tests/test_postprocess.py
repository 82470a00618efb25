"""The vectorised post-processing (surgery.detectors.postprocess) returns torchvision's detections: same
boxes, scores and labels (up to the order of tied scores), for FCOS, RetinaNet-style, SSDlite and
the YOLO adapter, in PyTorch and in the exported ONNX file; the one-call class-aware NMS equals a
loop of per-class NMS."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from surgery.detectors.builders import build_model
from surgery.detectors.postprocess import batched_nms, fast_postprocess
from tests.extras import require


def _unmatched(ref: dict, got: dict, atol: float = 1e-4) -> int:
    """Reference detections without a counterpart (same label, score and box within ``atol``),
    not counting those tied with the lowest kept score (which of them survive is arbitrary)."""
    assert len(ref["boxes"]) == len(got["boxes"])
    used = torch.zeros(len(got["boxes"]), dtype=torch.bool)
    low = ref["scores"].min() if len(ref["scores"]) else 0.0
    bad = 0
    for i in torch.argsort(-ref["scores"]):
        ok = (~used & (got["labels"] == ref["labels"][i]) & ((got["scores"] - ref["scores"][i]).abs() <= atol)
              & ((got["boxes"] - ref["boxes"][i]).abs().amax(1) <= atol * 100))
        j = torch.where(ok)[0]
        if len(j):
            used[j[0]] = True
        elif abs(float(ref["scores"][i] - low)) > atol:
            bad += 1
    return bad


def _spread(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Untrained weights give many exactly tied scores: perturb them so the order is defined."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


FAMILIES = [
    ("fcos_resnet18_slim", {"num_classes": 5, "min_size": 128, "max_size": 128}, 128),
    ("retinanet_resnet50_fpn", {"num_classes": 4, "min_size": 96, "max_size": 96, "weights_backbone": None}, 96),
    ("ssdlite320_mobilenet_v3_large", {"num_classes": 21, "weights_backbone": None}, 320),
]


@pytest.mark.usefixtures("serial_threads")  # SSDlite at 1 thread: one near-tied detection flips (conftest)
@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("score_thresh,nms_thresh", [(0.0, 1.0), (0.0, 0.5), (0.05, 0.6)])
def test_detections_equal_torchvision(name: str, kwargs: dict, size: int, score_thresh: float, nms_thresh: float) -> None:
    model = _spread(build_model(name, **kwargs), seed=len(name))
    model.score_thresh, model.nms_thresh = score_thresh, nms_thresh
    model.detections_per_img = 50
    model.topk_candidates = 200  # smaller than the largest level at these sizes: per-level top-k matters
    images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.no_grad():
        ref = model(images)
        with fast_postprocess(model) as used:
            got = model(images)
    assert used
    assert "postprocess_detections" not in vars(model)  # restored
    for r, o in zip(ref, got):
        assert len(r["boxes"]) == len(o["boxes"])
        assert _unmatched(r, o) == 0


def _per_class_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    keep = [torch.where(labels == c)[0][nms(boxes[labels == c], scores[labels == c], iou)] for c in labels.unique()]
    keep = torch.cat(keep)
    return keep[torch.argsort(scores[keep], descending=True)]


@pytest.mark.parametrize("n,classes,iou,cap", [(50, 3, 0.5, None), (3000, 7, 0.5, 100), (3000, 7, 0.9, 100),
                                               (2000, 90, 0.3, 20), (400, 2, 0.0, 300)])
def test_batched_nms_equals_per_class_nms(n: int, classes: int, iou: float, cap: int | None) -> None:
    g = torch.Generator().manual_seed(n + classes)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    want = _per_class_nms(boxes, scores, labels, iou)
    got = batched_nms(boxes, scores, labels, iou, cap)
    assert torch.equal(got, want[:cap] if cap is not None else want)


def test_capped_nms_falls_back_when_the_prefix_keeps_too_few() -> None:
    # 600 copies of one box per class: NMS keeps one per class, so any prefix keeps fewer than the
    # cap and the full NMS must run (a lone low-scoring box of another class must still come out)
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    boxes = torch.cat([box.repeat(600, 1), torch.tensor([[100.0, 100.0, 120.0, 120.0]])])
    scores = torch.cat([torch.linspace(1.0, 0.5, 600), torch.tensor([0.01])])
    labels = torch.cat([torch.zeros(600, dtype=torch.long), torch.ones(1, dtype=torch.long)])
    got = batched_nms(boxes, scores, labels, 0.5, max_kept=10)
    assert got.tolist() == [0, 600]


def test_exported_file_matches_torchvision(tmp_path) -> None:  # noqa: ANN001
    require("onnxruntime")
    from surgery.deployment.export import export_onnx, run_onnx

    model = _spread(build_model("ssdlite320_mobilenet_v3_large", num_classes=21, weights_backbone=None), seed=3)
    model.score_thresh, model.nms_thresh, model.detections_per_img = 0.0, 0.5, 40
    path = tmp_path / "m.onnx"
    res = export_onnx(model, path, 320, verify=True)  # verify: against torchvision's own post-processing
    assert res.verified
    assert any("post-processing" in n for n in res.notes)
    image = torch.rand(3, 320, 320, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model([image])[0]
    got = {k: torch.as_tensor(v) for k, v in run_onnx(path, image).items()}
    assert _unmatched(ref, got, atol=1e-3) == 0
    import onnx

    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "NonMaxSuppression"]
    assert len(nodes) == 1  # one NMS, not one per class


def test_yolo_adapter_uses_the_capped_nms() -> None:
    require("ultralytics")
    from torchvision.ops import batched_nms as tv_batched_nms

    from surgery.yolo.interface import YoloInterface

    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(1, 800, 2, generator=g) * 100
    boxes = torch.cat([boxes, boxes + 5 + 20 * torch.rand(1, 800, 2, generator=g)], -1)
    scores = torch.rand(1, 800, 3, generator=g)
    yi = YoloInterface.__new__(YoloInterface)
    torch.nn.Module.__init__(yi)
    yi.score_thresh, yi.nms_thresh, yi.detections_per_img, yi.topk_candidates = 0.001, 0.7, 100, 1000
    got = yi._postprocess(boxes[0], scores[0], (1.0, 1000, 1000))
    flat = scores[0].flatten()
    top, idx = flat.topk(1000)
    b = boxes[0][idx // 3]
    want = tv_batched_nms(b, top, idx % 3, 0.7)[:100]
    assert torch.allclose(got["scores"], top[want])
    assert torch.equal(got["labels"], idx[want] % 3 + 1)


@pytest.mark.parametrize("name", ["fcos_resnet18_slim", "retinanet_resnet18_slim"])
@pytest.mark.parametrize("short_prefix", [False, True])  # True: NMS prefixes of D boxes, which keep too few
def test_a_batch_of_different_sizes_is_post_processed_at_once(monkeypatch, name: str, short_prefix: bool) -> None:
    """Eager, a batch's detections come from one NMS call (one host read per batch, not per image:
    what the GPU needs) and equal torchvision's per image, images of different sizes clipped each
    to its own; an image whose NMS prefix kept too few is done again alone, as batched_nms does."""
    import surgery.detectors.postprocess as pp

    model = _spread(build_model(name, num_classes=5, min_size=128, max_size=160), seed=3)
    model.score_thresh, model.nms_thresh, model.detections_per_img = 0.0, 0.5, 50
    if short_prefix:
        monkeypatch.setattr(pp, "PREFIX_FACTOR", 1)
        monkeypatch.setattr(pp, "PREFIX_MIN", 1)
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in ((128, 128), (96, 160), (112, 80))]
    with torch.no_grad():
        ref = model(images)
        calls = []
        real = torch.ops.torchvision.nms
        monkeypatch.setattr(torch.ops.torchvision, "nms", lambda *a: calls.append(len(a[0])) or real(*a))
        with fast_postprocess(model):
            got = model(images)
    # one batched call; with short prefixes each image again alone (its prefix, then all its candidates)
    assert len(calls) == (1 + 2 * len(images) if short_prefix else 1), calls
    for r, o in zip(ref, got):
        assert len(r["boxes"]) == len(o["boxes"]) == 50
        assert _unmatched(r, o) == 0


def _post_nodes(model: torch.nn.Module, path, vectorized: bool) -> tuple[int, int]:  # noqa: ANN001
    """(network nodes, post-processing nodes) of a static export once ONNX Runtime has folded its
    constants (what a deployment runs)."""
    import onnx
    import onnxruntime as ort

    from surgery.deployment.export import export_onnx

    export_onnx(model, path, 96, vectorized_postprocess=vectorized, verify=False)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(path.with_suffix(".folded.onnx"))
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(opts.optimized_model_filepath).graph.node
    net = sum(n.name.startswith(("/model/backbone", "/model/head")) for n in nodes)
    return net, len(nodes) - net


def test_the_exported_fcos_post_processing_is_a_fifth_of_torchvisions_nodes(tmp_path) -> None:  # noqa: ANN001
    """Each node is a fixed cost the cut does not shrink (docs/benchmarks/runtimes.md): the decode,
    clip, candidate indexing and box scaling of the fast path fold into a handful of nodes."""
    require("onnxruntime")
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", fpn_channels=64, min_size=96, max_size=96).eval()
    model.score_thresh = 0.0
    net_fast, fast = _post_nodes(model, tmp_path / "fast.onnx", vectorized=True)
    net_tv, torchvision_own = _post_nodes(model, tmp_path / "tv.onnx", vectorized=False)
    assert net_fast == net_tv > 0
    assert 0 < fast * 5 <= torchvision_own
