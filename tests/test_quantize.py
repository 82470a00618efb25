"""INT8 post-training quantization (ONNX Runtime QDQ) and quantization-aware training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery.config.recipe import recipe_from_dict
from surgery.detectors.builders import ModelSpec, build_model
from surgery.storage.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from tests.extras import require

onnx = require("onnx")
require("onnxruntime")

SIZE = 64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(trained_slim: Path) -> Path:
    """The session's briefly trained fcos_resnet18_slim (conftest; its size is SIZE)."""
    return trained_slim


def _conv_weight_is_int8(graph, node) -> bool:
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return node.input[1] in dq


def test_ptq_quantizes_convs_keeps_outputs_float_and_agrees(trained, tmp_path):
    """Criterion: on 8 val images, each of the float model's 10 best detections per image has an
    INT8 detection of the same label with IoU >= 0.9 and |score diff| <= 0.05, for >= 90% of them.
    8-bit activations carry ~1/255 of each layer's range: box edges move well under 10% of a box
    (IoU 0.9 tolerates ~5% per edge) and scores a few hundredths; a quantized output layer or a wrong
    range (e.g. calibrating on blank images) moves many boxes and scores by far more."""
    from surgery.deployment.quantize import (
        compare_detections,
        dataset_images,
        layer_nodes,
        quantize_checkpoint,
    )
    from surgery.deployment.runtime import OnnxDetector
    from surgery.pruning.graph import output_layers

    res = quantize_checkpoint(trained, tmp_path / "m.int8.onnx", calib_batches=2, batch_size=4,
                              keep_float=tmp_path / "m.onnx", verify_images=4,
                              form="qdq-per-channel")  # the QDQ structure checked below  # fmt: skip
    graph = onnx.load(str(res.path)).graph
    model, ckpt = load_checkpoint(trained)
    mapped = layer_nodes(graph, model)
    outputs = set(output_layers(model))
    convs = [n for n in graph.node if n.op_type == "Conv"]
    int8 = [n for n in convs if _conv_weight_is_int8(graph, n)]
    assert len(int8) == res.quantized_nodes > 30 and sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10
    assert outputs == {"head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                       "head.regression_head.bbox_ctrness"}  # fmt: skip
    heads = [n for n in convs if mapped.get(n.name) in outputs]
    assert len(heads) == 15 and not any(_conv_weight_is_int8(graph, n) for n in heads)  # 3 layers x 5 levels
    assert all(mapped[n.name] not in outputs for n in int8)
    assert res.int8_bytes < 0.4 * res.float_bytes == 0.4 * res.float_path.stat().st_size
    assert not any(n.op_type in ("NonMaxSuppression", "RoiAlign") and "Quant" in n.name for n in graph.node)

    images = dataset_images(ckpt.recipe["data"], "val", 8)
    ref, got = OnnxDetector(res.float_path, 2), OnnxDetector(res.path, 2)
    agree = compare_detections(ref, got, images, score_thresh=0.0, top_k=10)
    assert agree.float_detections == 80 and agree.fraction >= 0.9, agree
    with torch.no_grad():  # the float export is the checkpoint's model
        out = model.eval()([images[0]])[0]
    torch.testing.assert_close(ref([images[0]])[0]["scores"][:5], out["scores"][:5], atol=1e-4, rtol=1e-4)


def test_node_names_map_to_modules():
    from surgery.deployment.quantize import node_module

    model = build_model("fcos_resnet18_slim")
    names = dict(model.named_modules())
    assert node_module("/backbone/body/layer1/layer1.0/conv1/Conv", names) == "backbone.body.layer1.0.conv1"
    assert node_module("/backbone/fpn/inner_blocks.2/inner_blocks.2.0/Conv", names) == "backbone.fpn.inner_blocks.2.0"
    assert node_module("/head/classification_head/conv/conv.0_3/Conv", names) == "head.classification_head.conv.0"
    assert node_module("/head/classification_head/cls_logits_4/Conv", names) == "head.classification_head.cls_logits"
    assert node_module("/Reshape_14", names) is None and node_module("/nothere/Conv", names) is None


def test_ssdlite_quantizes_with_its_predictors_float(tmp_path):
    from surgery.deployment.export import export_onnx
    from surgery.deployment.quantize import layer_nodes, quantize_onnx

    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=5).eval()
    export_onnx(model, tmp_path / "s.onnx", 320, verify=False)
    res = quantize_onnx(tmp_path / "s.onnx", tmp_path / "s.int8.onnx", model, [torch.rand(3, 320, 320)], input_size=320)
    graph = onnx.load(str(res.path)).graph
    mapped = layer_nodes(graph, model)
    predictors = [n for n in graph.node if mapped.get(n.name) in set(res.excluded_layers)]
    assert len(res.excluded_layers) == 12 and len(predictors) == 12  # 6 levels x (classification, regression)
    assert not any(_conv_weight_is_int8(graph, n) for n in predictors)
    assert res.quantized_nodes >= 40 and res.int8_bytes < 0.5 * res.float_bytes


def test_qat_on_masked_checkpoint_keeps_masks_resumes_and_exports(trained, tmp_path):
    from surgery.deployment.quantize import quantize_checkpoint
    from surgery.pruning.masked import prune_masked
    from surgery.training.qat import QATHook, qat_ranges
    from surgery.workflows import retrain_checkpoint

    model, ckpt = load_checkpoint(trained)
    masked = prune_masked(model, 0.5, "layer")
    src = save_checkpoint(tmp_path / "masked.pt", model, ckpt.spec, kind="masked", masks=masked.masks,
                          recipe=ckpt.recipe)  # fmt: skip
    rec = recipe_from_dict({"data": ckpt.recipe["data"], "retrain": {"steps": 2, "batch_size": 4, "warmup_steps": 0,
                            "lr": 0.001, "checkpoint_every": 1}}, "t")  # fmt: skip
    out = tmp_path / "qat.pt"
    hook = QATHook()
    retrain_checkpoint(src, rec, out, evaluate=False, hooks=[hook])
    saved = read_checkpoint(out)  # weights_only=True
    ranges = qat_ranges(saved)
    assert ranges and len(ranges) == len(hook.layers) > 30
    assert "head.classification_head.cls_logits" not in ranges and all(lo <= 0 <= hi or lo < hi for lo, hi in ranges.values())
    trained_model, _ = load_checkpoint(out)  # a plain float model: no fake-quant forward left behind
    assert not any("forward" in m.__dict__ for m in trained_model.modules())
    changed = False
    for name, mask in saved.masks.items():
        w = saved.state_dict[name]
        assert torch.all(w[~mask] == 0), name  # pruned weights stay exactly zero
        changed |= not torch.equal(w, read_checkpoint(src).state_dict[name])
    assert changed  # it did train

    rec.retrain.steps = 3  # --resume continues from step 2 with the observed ranges
    hook2 = QATHook()
    res = retrain_checkpoint(src, rec, out, evaluate=False, resume=True, hooks=[hook2]).result
    assert res.start_step == 2 and res.steps == 3
    resumed = qat_ranges(read_checkpoint(out))
    first = "backbone.body.layer4.1.conv2"  # the image range of the first conv never moves
    assert resumed[first] != ranges[first] and abs(resumed[first][1] - ranges[first][1]) < 0.2 * abs(ranges[first][1]) + 1e-3

    q = quantize_checkpoint(out, tmp_path / "qat.int8.onnx", calib_batches=1, batch_size=2, verify_images=2)
    assert q.ranges == "qat" and q.quantized_nodes > 30 and q.agreement is not None and q.agreement.images == 2


def test_cli_unexportable_model_is_one_clear_line(tmp_path):
    builder = tmp_path / "udet.py"
    builder.write_text(
        "import torch\nfrom torch import nn\nfrom surgery.detectors.builders import build_model\n\n"
        "class Cummax(nn.Module):\n"
        "    def __init__(self, body):\n        super().__init__()\n        self.body = body\n"
        "        self.out_channels = body.out_channels\n\n"
        "    def forward(self, x):  # aten::cummax has no ONNX export\n"
        "        return {k: torch.cummax(v, dim=1).values for k, v in self.body(x).items()}\n\n"
        "def build(**kw):\n    m = build_model('fcos_resnet18_slim', **kw)\n    m.backbone = Cummax(m.backbone)\n    return m\n"
    )
    spec = ModelSpec(f"{builder}:build", {"min_size": SIZE, "max_size": SIZE})
    save_checkpoint(tmp_path / "u.pt", build_model(spec, trust_code=True), spec)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "surgery", "quantize", str(tmp_path / "u.pt"), "--out",
                           str(tmp_path / "u.onnx"), "--trust-code", "--calib-batches", "1"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot quantize" in errors[0] and "cummax" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "u.onnx").exists()
