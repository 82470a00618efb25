"""The YOLO family: Ultralytics detectors (optional extra) and the project's yolov2_darknet19."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery.config.recipe import PruneSection
from surgery.detectors.builders import ModelSpec, build_model
from surgery.errors import UnknownModelError
from surgery.pruning.prune import prune_model
from surgery.storage.checkpoint import load, save_checkpoint
from tests.extras import require
from tests.yolo_helpers import SIZE, images, prune_with_cli, train_step

ROOT = Path(__file__).resolve().parents[1]
YOLOS = ["yolov8n.yaml", "yolo11n.yaml"]








def _eval(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Detections with the score threshold at 0 (an untrained YOLO may score below the default)."""
    model.eval()
    thresh, model.score_thresh = model.score_thresh, 0.0
    try:
        with torch.no_grad():
            return model(images())
    finally:
        model.score_thresh = thresh


def _check_outputs(outs: list[dict[str, torch.Tensor]], num_classes: int) -> None:
    assert len(outs) == 2
    for out, img in zip(outs, images()):
        n = out["boxes"].shape[0]
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].shape == (n,)
        assert torch.isfinite(out["boxes"]).all() and torch.isfinite(out["scores"]).all()
        assert n > 0  # _eval keeps every score: the checks below must not be vacuous
        assert out["labels"].min() >= 1 and out["labels"].max() <= num_classes
        assert out["boxes"][:, 2].max() <= img.shape[-1] and out["boxes"][:, 3].max() <= img.shape[-2]


# --------------------------------------------------------------------------------------------
# Ultralytics




def _vary(model: nn.Module) -> None:
    """An untrained YOLO gives every anchor nearly the same score and box: random BatchNorm
    statistics and head outputs make detections distinct, so comparisons do not hinge on ties."""
    head = model.net.model[-1]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for seq in list(head.cv2) + list(head.cv3):
            seq[-1].weight.normal_(0, 0.01)
            seq[-1].bias.normal_(-2, 0.5)


def _raw(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's decoded boxes and scores before NMS (exact comparisons without NMS ties)."""
    model.eval()
    with torch.no_grad():
        batch, _, _ = model.transform(images())
        return model.predict(batch)


def _check_yolo_blocks(model: nn.Module) -> None:
    """Every C2f/C3k2 splits cv1 into equal halves its bottlenecks and cv2 agree with; every Detect
    branch chains; the box/class output convs and DFL keep their widths."""
    net = model.net
    found = 0
    for m in net.modules():
        if type(m).__name__ in ("C2f", "C3k2"):
            found += 1
            c1 = m.cv1.conv.out_channels
            assert c1 % 2 == 0
            half = c1 // 2
            first = m.m[0]
            conv_in = next(x for x in first.modules() if isinstance(x, nn.Conv2d)).in_channels
            assert conv_in == half
            assert m.cv2.conv.in_channels == half * (2 + len(m.m))
    assert found >= 4
    head = net.model[-1]
    for branch, out_ch in ((head.cv2, 4 * head.reg_max), (head.cv3, head.nc)):
        for seq in branch:
            convs = [x for x in seq.modules() if isinstance(x, nn.Conv2d)]
            for a, b in zip(convs, convs[1:]):
                assert b.in_channels == a.out_channels
            assert convs[-1].out_channels == out_ch
    assert head.dfl.conv.in_channels == head.reg_max


@pytest.mark.parametrize("yaml", YOLOS)
def test_ultralytics_prune_cli_reload_train_export(yaml: str, tmp_path, ultralytics) -> None:
    from surgery.deployment.export import export_onnx

    _, model, out = prune_with_cli(yaml, tmp_path)
    _check_yolo_blocks(model)
    _check_outputs(_eval(model), 4)
    again = load(out)
    for a, b in zip(_raw(model), _raw(again)):
        assert torch.equal(a, b)
    assert sum(train_step(model).values()) > 0
    _vary(again)
    # NMS of heavily overlapping random boxes flips on IoUs within float error of the threshold
    # between torchvision and onnxruntime; with NMS a no-op the whole graph (letterbox, network,
    # decoding, top-k, the NMS op) is compared detection by detection.
    again.nms_thresh = 1.0
    export = export_onnx(again, tmp_path / "m.onnx", SIZE)
    assert export.verified, export.notes


# The zeroed-channel oracle for YOLOv8n / YOLO11n is in test_equivalence.py.


def test_ultralytics_missing_package_is_one_clear_line(monkeypatch) -> None:
    from surgery.yolo import ultralytics_adapter

    ultralytics_adapter._ultralytics.cache_clear()
    for name in [n for n in sys.modules if n == "ultralytics" or n.startswith("ultralytics.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # as if not installed
    try:
        with pytest.raises(UnknownModelError, match=r"pip install 'surgery\[yolo\]'"):
            build_model(ModelSpec("ultralytics:yolov8n.yaml", {"nc": 4}))
    finally:
        ultralytics_adapter._ultralytics.cache_clear()
    code = (
        "import sys; sys.modules['ultralytics'] = None; from cli.main import main; "
        "sys.argv = ['surgery', 'inspect', '--model', 'ultralytics:yolov8n.yaml']; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, (proc.stdout, proc.stderr)  # stdout: a progress line
    assert "pip install 'surgery[yolo]'" in errors[0] and "Traceback" not in proc.stderr + proc.stdout


def test_ultralytics_pickle_needs_trust_and_bad_names(tmp_path, ultralytics) -> None:
    from surgery.storage.trust import UntrustedCodeError

    pt = tmp_path / "mine.pt"
    pt.write_bytes(b"not read")
    with pytest.raises(UntrustedCodeError, match="--trust-code"):
        build_model(ModelSpec(f"ultralytics:{pt}"))
    with pytest.raises(UnknownModelError, match="ships no model yaml"):
        build_model(ModelSpec("ultralytics:yolov99z.yaml"))
    with pytest.raises(UnknownModelError, match="has no argument"):
        build_model(ModelSpec("ultralytics:yolov8n.yaml", {"ncc": 3}))


# --------------------------------------------------------------------------------------------
# YOLOv2


def test_yolov2_trains_prunes_passthrough_and_reloads(tmp_path) -> None:
    spec = ModelSpec("yolov2_darknet19", {"num_classes": 5, "width": 0.25, "size": SIZE})
    model = build_model(spec)
    first = sum(train_step(model).values())
    for _ in range(3):
        last = sum(train_step(model).values())
    assert last < first
    _check_outputs(_eval(model), 4)
    passthrough_before = model.passthrough[0].out_channels
    result = prune_model(model, PruneSection(ratio=0.5))
    assert result.report.params_after < 0.5 * result.report.params_before
    # the passthrough conv was cut and the head conv after the concat lost 4 inputs per channel
    cut = passthrough_before - model.passthrough[0].out_channels
    assert cut > 0
    assert model.fuse[0].in_channels == 4 * model.passthrough[0].out_channels + model.head[-1][0].out_channels
    assert model.output.out_channels == 5 * (5 + 4)
    _check_outputs(_eval(model), 4)
    train_step(model)
    path = save_checkpoint(tmp_path / "v2.pt", model, spec, kind="structured", plan=result.plan)
    again = load(path)
    for a, b in zip(_raw(model), _raw(again)):
        assert torch.equal(a, b)


def test_yolo_bench_splits_network_and_pipeline(tmp_path):
    """bench's network/pipeline split finds YOLO networks (their own ``network_modules``)."""
    require("ultralytics")
    from surgery.config.recipe import BenchSection
    from surgery.measure.bench import bench_checkpoints
    from surgery.storage.checkpoint import save_checkpoint

    spec = ModelSpec("ultralytics:yolov8n.yaml", {"nc": 4, "size": 128})
    path = save_checkpoint(tmp_path / "y.pt", build_model(spec), spec)
    (row,) = bench_checkpoints([path], BenchSection(input_size=128, batch_sizes=[1], warmup=1, runs=3, threads=1,
                                                     channels_last="off"))
    assert row.network_ms_median > 0 and row.pipeline_ms_median > 0 and row.detections == 100


def test_masked_pruning_leaves_dfl_constants_alone():
    """Magnitude masking must not zero DFL's fixed 0..reg_max-1 weights (it would wreck every box)."""
    require("ultralytics")
    from surgery.pruning.masked import prunable_parameters, prune_masked

    model = build_model(ModelSpec("ultralytics:yolov8n.yaml", {"nc": 4, "size": 128}))
    dfl = [n for n in model.fixed_weights()]
    assert dfl and not set(f"{n}.weight" for n in dfl) & set(prunable_parameters(model))
    before = {n: dict(model.named_modules())[n].weight.detach().clone() for n in dfl}
    prune_masked(model, 0.9)
    for n, w in before.items():
        assert torch.equal(dict(model.named_modules())[n].weight, w)
