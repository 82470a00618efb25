"""Deployment latency: network vs pipeline split, ONNX files through bench and eval, ONNX Runtime."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from surgery.config.recipe import BenchSection, PruneSection
from surgery.data import build_dataset, synthesize
from surgery.deployment.export import export_onnx
from surgery.deployment.runtime import OnnxDetector, load_detector
from surgery.detectors.builders import ModelSpec, build_model
from surgery.measure.bench import bench_checkpoints
from surgery.measure.evaluate import evaluate
from surgery.measure.split import network_stubbed, record_calls, replay_network
from surgery.pruning.prune import prune_model
from surgery.storage.checkpoint import save_checkpoint
from tests.extras import require

require("onnxruntime")
SIZE = 128


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A dense fcos_resnet18_slim and the same model with 50% of its channels cut."""
    d = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    dense = build_model("fcos_resnet18_slim").eval()
    spec = ModelSpec("fcos_resnet18_slim")
    recipe = {"data": {"source": "synthetic", "images": 16, "size": SIZE, "root": str(d / "data")}}  # small, local
    dense_p = save_checkpoint(d / "dense.pt", dense, spec, kind="dense", recipe=recipe)
    import copy

    pruned = copy.deepcopy(dense)
    res = prune_model(pruned, PruneSection(ratio=0.5), trace_size=SIZE, macs_input_size=SIZE)
    assert res.report.macs_after < 0.5 * res.report.macs_before
    pruned_p = save_checkpoint(d / "half.pt", pruned, spec, kind="structured", plan=res.plan, recipe=recipe)
    return dense_p, pruned_p


def test_split_replays_the_network_and_stubs_it_out():
    torch.manual_seed(0)
    model = build_model("fcos_resnet18_slim", fpn_channels=64).eval()
    images = [torch.rand(3, SIZE, SIZE)]
    calls = record_calls(model, images)
    assert [c.name for c in calls] == ["backbone", "head"]
    ran = []
    handle = model.head.classification_head.register_forward_pre_hook(lambda m, a: ran.append(1))  # inside the head
    with torch.inference_mode():
        replay_network(calls)
        assert len(ran) == 1
        with network_stubbed(calls):
            out = model(images)  # the stubbed head does not run, yet the detections are the same
        assert len(ran) == 1
        ref = model(images)
    handle.remove()
    assert torch.equal(out[0]["boxes"], ref[0]["boxes"]) and "forward" not in vars(model.head)


# Wall-clock comparisons (a pruned network is faster, parts add up) depend on the machine's load:
# the default tests check what bench measured and how it is split; the timing claims are `slow`.


def test_network_and_pipeline_are_measured_apart(ckpts):
    cfg = BenchSection(input_size=SIZE, batch_sizes=[1], warmup=1, runs=3, threads=1, channels_last="off")
    dense, half = bench_checkpoints(list(ckpts), cfg)
    for r in (dense, half):
        assert r.network_ms_median > 0 and r.pipeline_ms_median > 0 and r.latency_ms_median > 0
        assert r.detections == 100 and r.runtime == "torch"
    assert half.macs_ratio < 0.5 and half.params < dense.params
    assert half.network_ratio > 0  # paired run by run (test_measure: test_bench_ratios_pair_runs_...)


def test_onnxruntime_runtime_splits_by_profile(ckpts):
    cfg = BenchSection(input_size=SIZE, batch_sizes=[1], warmup=1, runs=3, threads=1, runtime="onnxruntime")
    dense, half = bench_checkpoints(list(ckpts), cfg)
    assert dense.runtime == half.runtime == "onnxruntime"
    assert dense.network_ms_median > 0 and dense.pipeline_ms_median > 0  # both parts found in the profile
    assert half.macs_ratio < 0.5


@pytest.mark.parametrize("spinning", [False, True])
def test_onnxruntime_spinning_reaches_every_timed_session(ckpts, monkeypatch, spinning):
    import surgery.deployment.onnx_io as runtime_mod  # where sessions are made (surgery.deployment.onnx_io.session)
    import surgery.measure.split as split_mod

    seen: list[str] = []
    real_session, real_split = runtime_mod.ort_session, split_mod.onnx_split_ms

    def session(path, threads=None, *, spinning=False):
        sess = real_session(path, threads, spinning=spinning)
        seen.append(sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))
        return sess

    def split(*a, spinning=False, **kw):
        seen.append("1" if spinning else "0")
        return real_split(*a, spinning=spinning, **kw)

    monkeypatch.setattr(runtime_mod, "ort_session", session)
    monkeypatch.setattr(split_mod, "onnx_split_ms", split)
    cfg = BenchSection(input_size=SIZE, batch_sizes=[1], warmup=1, runs=2, threads=1, runtime="onnxruntime",
                       spinning=spinning)
    bench_checkpoints(list(ckpts), cfg)
    assert len(seen) >= 4 and set(seen) == {"1" if spinning else "0"}


@pytest.mark.slow
def test_bench_timings_benchmark(ckpts):
    """Timing claims (slow: wall-clock, meaningful on an idle machine only)."""
    cfg = BenchSection(input_size=SIZE, batch_sizes=[1], warmup=2, runs=9, threads=1, channels_last="off")
    dense, half = bench_checkpoints(list(ckpts), cfg)
    for r in (dense, half):
        parts = r.network_ms_median + r.pipeline_ms_median
        # measured apart (replayed network, stubbed-network model): the sum is a check, not an identity
        assert abs(parts - r.latency_ms_median) <= 0.3 * r.latency_ms_median, (parts, r.latency_ms_median)
    assert half.network_ms_median < dense.network_ms_median and half.network_ratio < 1
    cfg = BenchSection(input_size=SIZE, batch_sizes=[1], warmup=1, runs=5, threads=1, runtime="onnxruntime")
    dense, half = bench_checkpoints(list(ckpts), cfg)
    assert dense.network_ms_median > dense.pipeline_ms_median > 0  # the convolutions dominate
    assert half.network_ratio < 1


def test_onnx_file_evaluates_like_the_checkpoint(tmp_path, ckpts):
    root = synthesize(tmp_path / "shapes", images=2, size=SIZE, seed=3, val_images=4).root
    val = build_dataset(f"coco:{root}", "val", train=False)
    model, _ = load_detector(ckpts[1])
    model.score_thresh = 0.0  # untrained: keep detections so there is something to score
    path = export_onnx(model, tmp_path / "half.onnx", SIZE, verify=False).path
    ref = evaluate(model, val, batch_size=2)
    got = evaluate(OnnxDetector(path), val, batch_size=2)
    assert got.num_detections == ref.num_detections > 0
    assert got.metrics["mAP50"] == pytest.approx(ref.metrics["mAP50"], abs=0.02)


def test_cli_bench_and_eval_take_onnx_files(tmp_path, ckpts):
    runner = CliRunner()
    onnx = tmp_path / "half.onnx"
    res = runner.invoke(app, ["export", str(ckpts[1]), "--out", str(onnx), "--input-size", str(SIZE), "--no-verify"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["bench", str(ckpts[0]), str(onnx), "--input-size", str(SIZE), "--runs", "2",
                              "--warmup", "1", "-b", "1", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert [r["runtime"] for r in rows] == ["torch", "onnxruntime"]
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["macs"] < rows[0]["macs"]  # from the file's metadata
    assert any("ONNX file" in n for n in rows[1]["notes"])
    res = runner.invoke(app, ["eval", str(onnx), "--data", "synthetic", "--max-images", "2"])
    assert res.exit_code == 0, res.output
    assert "mAP" in res.output


def test_deploy_table_float_and_int8_side_by_side(tmp_path, ckpts):
    from surgery.deployment.table import deploy_markdown, deploy_table

    root = synthesize(tmp_path / "shapes", images=8, size=SIZE, seed=3, val_images=2).root
    val = build_dataset(f"coco:{root}", "val", train=False)
    rows = deploy_table(list(ckpts), tmp_path / "deploy", val, input_size=SIZE, calib_batches=1, runs=2, warmup=1,
                        threads=1, int8_form="qdq-per-channel")  # the form choice: test_int8_forms
    assert [(r.checkpoint, r.precision) for r in rows] == [
        ("dense", "fp32"), ("dense", "int8-ptq"), ("half", "fp32"), ("half", "int8-ptq")]
    dense_fp, dense_q, half_fp, half_q = rows
    assert dense_q.file_bytes < 0.35 * dense_fp.file_bytes and half_fp.file_bytes < dense_fp.file_bytes
    assert half_fp.network_ms > 0 and dense_fp.network_ms > 0  # which is faster: a wall-clock claim, not here
    # every ratio is paired run by run against the first file, the dense FP32 export
    assert dense_fp.latency_vs_dense == 1.0 and dense_q.latency_vs_float == pytest.approx(dense_q.latency_vs_dense)
    assert half_q.latency_vs_float == pytest.approx(half_q.latency_vs_dense / half_fp.latency_vs_dense)
    table = deploy_markdown(rows, reference_ms=dense_fp.latency_ms)
    assert table.count("\n") == 4 and "| half |" in table
    assert f"| {1 / half_q.latency_vs_dense:.2f}x |" in table


@pytest.mark.slow
def test_deploy_table_has_openvino_rows_for_the_same_files(tmp_path, ckpts):
    from surgery.deployment.table import deploy_markdown, deploy_table

    require("openvino")
    root = synthesize(tmp_path / "shapes", images=8, size=SIZE, seed=3, val_images=2).root
    val = build_dataset(f"coco:{root}", "val", train=False)
    rows = deploy_table([ckpts[0]], tmp_path / "deploy", val, input_size=SIZE, calib_batches=1, runs=2, warmup=1,
                        threads=1, runtimes=("onnxruntime", "openvino"))
    assert [(r.runtime, r.precision) for r in rows] == [
        ("onnxruntime", "fp32"), ("onnxruntime", "int8-ptq"), ("openvino", "fp32"), ("openvino", "int8-ptq")]
    assert rows[0].onnx == rows[2].onnx and rows[1].onnx == rows[3].onnx  # the same files in both runtimes
    assert rows[2].latency_vs_dense == 1.0  # OpenVINO's ratios are against OpenVINO's FP32 file
    assert all(r.network_ms and r.latency_ms > 0 for r in rows)
    table = deploy_markdown(rows)
    assert "| dense (onnxruntime) |" in table and "| dense (openvino) |" in table
