"""CUDA: a pruned model computes on the GPU what it computes on the CPU, trains a step with AMP,
is timed with synchronisation, and runs in an ONNX Runtime CUDA session when one is installed; the
latency table and `--keep-latency --runtime torch` on the GPU; the batched post-processing there.

Marked ``gpu``: skipped by default (``addopts``) and never part of CI; ``make gpu-check`` runs them
on a machine with a CUDA device. Every test here needs CUDA, so without one they skip with that
reason rather than fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery.config.recipe import PruneSection
from surgery.detectors.builders import ModelSpec, build_model
from surgery.pruning.prune import prune_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIZE = 128
SPEC = ModelSpec("fcos_resnet18_slim", {"num_classes": 5, "min_size": SIZE, "max_size": SIZE})


def _surgery(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "surgery", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, f"surgery {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def pruned() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(SPEC)
    prune_model(model, PruneSection(ratio=0.5, round_to=8))
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("gpu")
    _surgery("data", "synth", "--out", "shapes", "--images", "48", "--size", str(SIZE), cwd=d)
    _surgery("train", "--model", "fcos_resnet18_slim", "--data", "shapes", "-k", f"min_size={SIZE}",
             "-k", f"max_size={SIZE}", "--steps", "4", "-b", "4", "--device", "cuda", "--no-eval",
             "--out", "dense.pt", cwd=d)
    _surgery("prune", "--model", "dense.pt", "--ratio", "0.5", "--out", "pruned.pt", cwd=d)
    return d, d / "dense.pt", d / "pruned.pt"


def test_pruned_model_on_cuda_matches_cpu(pruned):
    """The cut model's raw head outputs on the GPU equal the CPU's (TF32 off, so fp32 both sides)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats_cpu = pruned.backbone(x)
        gpu = pruned.to("cuda")
        feats_gpu = gpu.backbone(x.cuda())
        pruned.to("cpu")
    assert feats_cpu.keys() == feats_gpu.keys()
    for k in feats_cpu:
        torch.testing.assert_close(feats_gpu[k].cpu(), feats_cpu[k], rtol=1e-3, atol=1e-4)


def test_cuda_train_step_with_amp_then_reload_on_cpu(ckpts):
    """A CUDA run (AMP is on by default on CUDA: `train.amp`) trains (the saved weights moved away from the dense start) and its
    checkpoint reloads on the CPU with the same outputs as on the GPU."""
    from surgery.storage.checkpoint import load

    d, _, pruned_path = ckpts
    _surgery("retrain", str(pruned_path), "--data", "shapes", "--steps", "3", "-b", "4", "--device", "cuda",
             "--no-eval", "--out", "retrained.pt", cwd=d)
    before, after = load(pruned_path), load(d / "retrained.pt")
    moved = [n for n, p in after.state_dict().items() if p.is_floating_point() and not torch.equal(p, before.state_dict()[n])]
    assert moved, "three AMP steps on CUDA changed no weight"
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cpu = after.backbone(x)
        cuda = load(d / "retrained.pt", device="cuda").backbone(x.cuda())
    for k in cpu:
        assert torch.isfinite(cpu[k]).all()
        torch.testing.assert_close(cuda[k].cpu(), cpu[k], rtol=1e-2, atol=1e-3)


def test_trainer_uses_amp_on_cuda(ckpts):
    """On CUDA the trainer runs its steps under a live GradScaler (AMP) and keeps the loss finite."""
    from surgery.config.recipe import TrainSection
    from surgery.data import build_dataset
    from surgery.training.train import build_trainer

    torch.manual_seed(0)
    model = build_model(SPEC)
    data = build_dataset(f"coco:{ckpts[0] / 'shapes'}", "train", train=True)
    cfg = TrainSection(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, schedule="constant", checkpoint_every=0)
    trainer = build_trainer(model, SPEC, data, cfg, device="cuda")
    result = trainer.train()
    assert trainer.use_amp and trainer.scaler.is_enabled()
    assert trainer.scaler.get_scale() > 0
    assert torch.isfinite(torch.tensor(result.loss))
    assert next(model.parameters()).device.type == "cuda"


def test_cuda_latency_is_synchronised(ckpts, monkeypatch):
    """`bench --device cuda` waits for the kernels (torch.cuda.synchronize around every timed run)."""
    from surgery.config.recipe import BenchSection
    from surgery.measure.bench import bench_checkpoints

    d, dense, pruned_path = ckpts
    calls = {"n": 0}
    real = torch.cuda.synchronize

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.cuda, "synchronize", counting)
    cfg = BenchSection(input_size=SIZE, batch_sizes=[1], warmup=1, runs=3, device="cuda")
    rows = bench_checkpoints([dense, pruned_path], cfg)
    assert len(rows) == 2
    assert calls["n"] >= 2 * cfg.runs, "timed CUDA runs without synchronising"
    for r in rows:
        row = r.to_dict()
        assert row["latency_ms_median"] > 0
    assert rows[1].to_dict()["params"] < rows[0].to_dict()["params"]


def test_onnxruntime_cuda_session_agrees_with_cpu(ckpts):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime without CUDA here (providers: {ort.get_available_providers()})")
    import numpy as np

    d, _, pruned_path = ckpts
    _surgery("export", str(pruned_path), "--out", "pruned.onnx", cwd=d)
    x = np.random.default_rng(0).random((3, SIZE, SIZE), dtype=np.float32)
    outs = {}
    for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
        sess = ort.InferenceSession(str(d / "pruned.onnx"), providers=[provider])
        assert sess.get_providers()[0] == provider
        name = sess.get_inputs()[0].name
        outs[provider] = sess.run(None, {name: x if len(sess.get_inputs()[0].shape) == 3 else x[None]})
    for a, b in zip(*outs.values()):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


def test_yolo_cuda_train_step(tmp_path):
    pytest.importorskip("ultralytics")
    _surgery("data", "synth", "--out", "shapes", "--images", "24", "--size", str(SIZE), cwd=tmp_path)
    _surgery("prune", "--model", "ultralytics:yolov8n.yaml", "-k", "nc=4", "-k", f"size={SIZE}", "--ratio", "0.5",
             "--out", "y.pt", cwd=tmp_path)
    _surgery("retrain", "y.pt", "--data", "shapes", "--steps", "2", "-b", "4", "--device", "cuda",
             "--no-eval", "--out", "y2.pt", cwd=tmp_path)
    assert (tmp_path / "y2.pt").stat().st_size > 0


def test_cuda_graphs_replay_the_network_as_eager_computes_it(pruned):
    """The network captured in CUDA graphs gives eager's outputs (fp32), for a new input too."""
    from surgery.measure.split import accelerated_network, record_calls, replay_network

    model = pruned.to("cuda")
    try:
        images = [torch.rand(3, SIZE, SIZE, device="cuda")]
        calls = record_calls(model, images)
        with torch.inference_mode():
            eager = model(images)
            with accelerated_network(calls, "cuda-graphs"):
                graphed = model(images)
                replay_network(calls)
        assert "forward" not in model.backbone.__dict__  # restored
        torch.testing.assert_close(graphed[0]["scores"], eager[0]["scores"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(graphed[0]["boxes"], eager[0]["boxes"], rtol=1e-3, atol=1e-2)
    finally:
        pruned.to("cpu")


@pytest.mark.parametrize("compile_mode,precision", [("cuda-graphs", "f16"), ("reduce-overhead", "bf16")])
def test_bench_on_cuda_names_graphs_and_half_precision(ckpts, compile_mode, precision):
    from surgery.config.recipe import BenchSection
    from surgery.measure.bench import bench_checkpoints

    d, dense, pruned_path = ckpts
    cfg = BenchSection(input_size=SIZE, batch_sizes=[1], warmup=2, runs=5, device="cuda", compile=compile_mode,
                       precision=precision)
    rows = bench_checkpoints([dense, pruned_path], cfg)
    assert [(r.compile, r.precision, r.device) for r in rows] == [(compile_mode, precision, "cuda")] * 2
    assert all(r.latency_ms_median > 0 and r.network_ms_median > 0 for r in rows)


def test_cuda_event_timing_sees_a_thinner_convolution_faster():
    """The latency table's CUDA timer (a CUDA graph of 10 calls, CUDA events around it): captured,
    positive, and a quarter-width convolution below the full-width one."""
    from surgery.measure.timing import cuda_graphed, time_cuda_events

    fns = {}
    for c in (256, 64):
        conv = torch.nn.Conv2d(c, c, 3, padding=1).cuda().eval()
        x = torch.rand(1, c, 80, 80, device="cuda")
        fns[str(c)] = lambda conv=conv, x=x: conv(x)
    with torch.inference_mode():
        assert cuda_graphed(fns["64"], 3)[1]  # captured, not the eager fallback
        times = time_cuda_events(fns, warmup=2, runs=10)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    assert 0 < med["64"] < med["256"], med


def test_latency_table_on_cuda_is_its_own_table(tmp_path, monkeypatch):
    """`--latency-device cuda`: the table is measured on the GPU, cached under a key of its own (the
    CPU table of the same model is another entry), and wider cells of a large layer cost more."""
    from surgery.pruning import latency_table as lt

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    table = lt.measure_table(model, "torch", SIZE, runs=5, device="cuda")
    layers = lt._conv_inputs(model, SIZE, 1)
    assert table.key != lt._table_key(layers, "torch", 2, SIZE, 1, type(model).__name__)
    assert all(v > 0 for grid in table.ms.values() for row in grid for v in row)
    big = max((n for n in layers if n in table.ms), key=lambda n: layers[n][0].weight.numel() * layers[n][1][-1] * layers[n][1][-2])
    assert table.ms[big][-1][-1] > table.ms[big][0][0], table.ms[big]
    assert (lt.cache_dir() / f"{table.key}.json").is_file()


def test_keep_latency_torch_on_cuda_measures_the_cut_on_the_gpu(tmp_path, monkeypatch):
    """`prune --keep-latency 0.5 --runtime torch --latency-device cuda`: the table and the timed
    check run on the GPU (CUDA graphs), and the cut network is faster there."""
    from surgery.pruning.prune import prune_model

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    res = prune_model(model, PruneSection(target_latency=0.5, runtime="torch", latency_device="cuda", round_to=8),
                      trace_size=SIZE, macs_input_size=SIZE)
    t = res.report.target
    assert t.runtime == "torch" and any("torch on cuda" in n for n in t.notes), t.notes
    assert t.measured_ratio is not None and t.measured_ratio < 0.9, t.notes
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays where it was


def test_batched_post_processing_runs_on_the_gpu_as_on_the_cpu(monkeypatch):
    """A batch of three images of different sizes: FCOS's post-processing stays on the GPU (one NMS
    call for the batch) and gives the CPU's detections (TF32 off)."""
    from surgery.detectors.postprocess import fast_postprocess

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", num_classes=5, min_size=128, max_size=160).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.score_thresh, model.detections_per_img = 0.0, 50
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in ((128, 128), (96, 160), (112, 80))]
    with torch.no_grad(), fast_postprocess(model):
        cpu = model(images)
        calls = []
        real = torch.ops.torchvision.nms
        monkeypatch.setattr(torch.ops.torchvision, "nms", lambda *a: calls.append(a[0].device.type) or real(*a))
        gpu = model.cuda()([im.cuda() for im in images])
        model.cpu()
    assert calls == ["cuda"]
    for c, o in zip(cpu, gpu):
        assert o["boxes"].is_cuda and len(c["boxes"]) == len(o["boxes"]) == 50
        torch.testing.assert_close(o["scores"].sort().values.cpu(), c["scores"].sort().values, rtol=1e-4, atol=1e-5)
        d = torch.cdist(c["boxes"], o["boxes"].cpu())
        assert d.min(dim=1).values.max() < 1e-2
