"""Measurements (params, MACs, latency, sizes) and the bench runner / CSV schema."""

from __future__ import annotations

import copy
import csv
import statistics

import pytest
import torch
import torch.nn.utils.prune as tprune

from surgery import compat
from surgery.config.recipe import BenchSection
from surgery.detectors.builders import ModelSpec, build_model
from surgery.measure import (
    configured_rois,
    count_macs,
    count_params,
    file_size,
    fixed_workload,
    fold_masks,
    measure_latency,
    state_dict_size,
)
from surgery.measure.bench import BENCH_COLUMNS, bench_checkpoints, write_csv
from surgery.measure.timing import paired_ratio, time_interleaved
from surgery.storage.checkpoint import save_checkpoint

SIZE = 160  # fcos_resnet18_slim resizes to 160 anyway


def zero_smallest(model: torch.nn.Module, sparsity: float = 0.8) -> dict[str, torch.Tensor]:
    """Masked pruning done by hand: zero the smallest ``sparsity`` of every conv weight."""
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 4:
                k = int(sparsity * p.numel())
                thresh = p.abs().flatten().kthvalue(k).values
                masks[name] = p.abs() > thresh
                p.mul_(masks[name])
    return masks


@pytest.fixture(scope="module")
def slim() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fcos_resnet18_slim").eval()


@pytest.fixture(scope="module")
def thin() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fcos_resnet18_slim", fpn_channels=64).eval()


@pytest.fixture(scope="module")
def masked(slim: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(slim)
    zero_smallest(m)
    return m


def test_thinner_model_has_fewer_params_and_macs(slim, thin):
    (p_slim, nz_slim), (p_thin, _) = count_params(slim), count_params(thin)
    assert p_thin < p_slim and nz_slim <= p_slim
    m_slim, m_thin = count_macs(slim, SIZE), count_macs(thin, SIZE)
    assert 0 < m_thin.total < m_slim.total
    assert set(m_slim.by_module) >= {"backbone", "head"}
    assert m_slim.by_module["head"] > 0 and m_thin.by_module["head"] < m_slim.by_module["head"]
    assert sum(m_slim.by_module.values()) == m_slim.total
    assert m_slim.uncounted  # element-wise ops are reported, not silently dropped
    assert m_slim.backbone_input == (SIZE, SIZE) and not any("resizes" in n for n in m_slim.notes)
    big = count_macs(slim, 2 * SIZE)  # the model's transform resizes to its min_size: say so
    assert big.backbone_input == (SIZE, SIZE) and any("resizes" in n for n in big.notes)


def test_masked_copy_same_params_and_macs_fewer_nonzeros(slim, masked):
    p, nz = count_params(slim)
    pm, nzm = count_params(masked)
    assert pm == p
    assert nzm < 0.5 * nz
    assert count_macs(masked, SIZE).total == count_macs(slim, SIZE).total


def test_fold_masks_applies_masks_and_removes_prune_hooks(slim):
    m = copy.deepcopy(slim)
    conv = m.head.classification_head.cls_logits
    tprune.l1_unstructured(conv, "weight", amount=0.5)
    masks = {"backbone.body.conv1.weight": torch.zeros_like(m.backbone.body.conv1.weight, dtype=torch.bool)}
    fold_masks(m, masks)
    assert not hasattr(conv, "weight_orig") and not conv._forward_pre_hooks
    assert isinstance(conv.weight, torch.nn.Parameter)
    assert (conv.weight == 0).float().mean() >= 0.5
    assert torch.count_nonzero(m.backbone.body.conv1.weight) == 0


@pytest.fixture(scope="module")
def frcnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fasterrcnn_mobilenet_v3_large_320_fpn").eval()


def test_two_stage_macs_fixed_roi_count_and_thresholds_restored(frcnn):
    rpn, heads = frcnn.rpn, frcnn.roi_heads
    before = (dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), rpn.nms_thresh, rpn.score_thresh,
              rpn.min_size, heads.score_thresh, heads.nms_thresh, heads.detections_per_img, frcnn.training)
    a = count_macs(frcnn, 320, rois=50)
    b = count_macs(frcnn, 320, rois=50)
    c = count_macs(frcnn, 320, rois=100)
    assert a.total == b.total
    assert a.rois == 50 and c.rois == 100
    assert c.total > a.total
    # only the RoI-dependent part grows: backbone and RPN are the same
    assert a.by_module["backbone"] == c.by_module["backbone"] and a.by_module["rpn"] == c.by_module["rpn"]
    assert c.by_module["roi_heads"] > a.by_module["roi_heads"]
    assert 0 < a.roi_align_macs < c.roi_align_macs  # counted, and proportional to the RoIs
    assert "torchvision::roi_align" not in a.uncounted
    assert count_macs(frcnn, 320, rois=50, count_roi_align=False).uncounted.get("torchvision::roi_align")
    after = (dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), rpn.nms_thresh, rpn.score_thresh,
             rpn.min_size, heads.score_thresh, heads.nms_thresh, heads.detections_per_img, frcnn.training)
    assert after == before


def test_compat_reads_and_restores_torchvision_internals(frcnn, slim):
    rpn = frcnn.rpn
    assert compat.rpn_modules(frcnn) == [rpn] and compat.rpn_modules(slim) == []
    assert compat.rpn_top_n(rpn, "post", "testing") == configured_rois(frcnn) == rpn._post_nms_top_n["testing"]
    old = compat.set_rpn_top_n(rpn, "pre", "training", 7)
    assert rpn._pre_nms_top_n["training"] == 7
    compat.set_rpn_top_n(rpn, "pre", "training", old)
    assert compat.set_rpn_top_n(slim, "pre", "training", 7) is None
    sizes = compat.set_resize(frcnn, (64,), 64)
    assert (frcnn.transform.min_size, frcnn.transform.max_size) == ((64,), 64)
    assert compat.set_resize(frcnn, *sizes) == ((64,), 64)
    assert (frcnn.transform.min_size, frcnn.transform.max_size) == sizes
    assert compat.set_resize(torch.nn.Conv2d(1, 1, 1), (64,), 64) is None


def test_fixed_workload_restores_on_error(slim):
    old = (slim.score_thresh, slim.nms_thresh, slim.detections_per_img)
    with pytest.raises(RuntimeError), fixed_workload(slim, detections=7):
        assert slim.detections_per_img == 7 and slim.score_thresh == 0.0
        raise RuntimeError("boom")
    assert (slim.score_thresh, slim.nms_thresh, slim.detections_per_img) == old


def test_latency_interleaved_results(slim, thin):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the 1 asked for below (an xdist worker runs on 1): "restored" means something
    try:
        res = measure_latency({"slim": slim, "thin": thin}, SIZE, batch_sizes=(1, 2), warmup=1, runs=3, threads=1)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    assert [(r.name, r.batch_size) for r in res] == [("slim", 1), ("thin", 1), ("slim", 2), ("thin", 2)]
    for r in res:
        assert r.median_ms > 0 and r.p90_ms >= r.median_ms >= r.min_ms
        assert len(r.times_ms) == 3 and r.threads == 1 and r.device == "cpu"
        assert r.images_per_s == pytest.approx(r.batch_size * 1e3 / r.median_ms)
        assert r.peak_mem_mb is None  # CPU: no honest in-process number
    assert not slim.training


def test_file_size_gzip_favours_zeroed_model(tmp_path):
    dense = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 3), torch.nn.Conv2d(128, 256, 3))
    masked_ = copy.deepcopy(dense)
    zero_smallest(masked_, 0.8)
    dense_path, masked_path = tmp_path / "dense.pt", tmp_path / "masked.pt"
    torch.save(dense.state_dict(), dense_path)
    torch.save(masked_.state_dict(), masked_path)
    (db, dg), (mb, mg) = file_size(dense_path), file_size(masked_path)
    assert db == dense_path.stat().st_size and abs(mb - db) < 0.01 * db  # same shapes, same raw size
    assert dg > 0.85 * db  # random float weights barely compress
    assert mg < 0.6 * mb and mg < 0.7 * dg
    assert state_dict_size(masked_)[1] < 0.7 * state_dict_size(dense)[1]


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, slim):
    d = tmp_path_factory.mktemp("ckpts")
    spec = ModelSpec("fcos_resnet18_slim")
    dense = save_checkpoint(d / "dense.pt", slim, spec, kind="dense")
    m = copy.deepcopy(slim)
    masks = zero_smallest(m, 0.8)
    masked_p = save_checkpoint(d / "masked.pt", m, spec, kind="masked", masks=masks)
    # a "structured" checkpoint: the builder says 128 channels, the weights are 64 wide
    torch.manual_seed(1)
    thin = build_model("fcos_resnet18_slim", fpn_channels=64)
    thin_p = save_checkpoint(d / "thin.pt", thin, spec, kind="structured")
    return [dense, masked_p, thin_p]


TINY = BenchSection(input_size=SIZE, batch_sizes=[1, 2], warmup=1, runs=2, threads=1)


def test_paired_ratio_cancels_a_burst_that_the_ratio_of_medians_does_not():
    # run 2 of the subject and run 3 of the reference hit a burst of other work
    subject, reference = [1.0, 4.0, 1.0, 1.0], [2.0, 2.0, 8.0, 2.0]
    assert paired_ratio(subject, reference) == pytest.approx(0.5)
    assert statistics.median(subject) / statistics.median(reference) == pytest.approx(0.5)
    subject, reference = [1.0, 6.0, 6.0], [2.0, 2.0, 12.0]  # a burst over the subject's run 2
    assert paired_ratio(subject, reference) == pytest.approx(0.5)
    assert statistics.median(subject) / statistics.median(reference) == pytest.approx(3.0)


def test_time_interleaved_in_blocks_runs_each_function_back_to_back():
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "ab"}
    times = time_interleaved(fns, warmup=0, runs=5, block=3)
    assert [len(t) for t in times.values()] == [5, 5]
    # one untimed call, then the block; the next round starts with the other function
    assert "".join(calls) == "aaaa" + "bbbb" + "bbb" + "aaa"


def test_bench_ratios_pair_runs_of_the_same_round(ckpts, monkeypatch):
    import surgery.measure.bench as bench_mod

    def fake(fns, **kw):  # a burst slows both in rounds 4-5 and the reference alone in round 3
        out = {}
        for name in fns:
            thin = not name.startswith(str(ckpts[0]))
            out[name] = [1.0, 1.0, 1.0, 4.0, 4.0] if thin else [2.0, 2.0, 8.0, 8.0, 8.0]
        return out

    monkeypatch.setattr(bench_mod, "time_interleaved", fake)
    rows = bench_checkpoints([ckpts[0], ckpts[2]], TINY)
    thin = rows[2]
    assert thin.latency_ms_median == 1.0 and rows[0].latency_ms_median == 8.0  # ratio of medians: 0.125
    assert thin.latency_ratio == pytest.approx(0.5)  # paired: 0.5 in four rounds of five
    assert thin.network_ratio == pytest.approx(0.5)


def test_bench_checkpoints_rows_and_csv(tmp_path, ckpts):
    calls = []
    rows = bench_checkpoints(ckpts, TINY, progress=lambda what, done, total: calls.append((done, total)))
    assert len(rows) == 6
    assert [(r.kind, r.batch_size) for r in rows] == [
        ("dense", 1), ("dense", 2), ("masked", 1), ("masked", 2), ("structured", 1), ("structured", 2)
    ]
    dense, masked_, thin = rows[0], rows[2], rows[4]
    assert dense.params_ratio == 1.0 and dense.macs_ratio == 1.0 and dense.latency_ratio == 1.0
    assert rows[1].latency_ratio == 1.0  # each batch size against the reference at that size
    assert masked_.params == dense.params and masked_.macs == dense.macs
    assert masked_.params_nonzero < 0.5 * dense.params_nonzero
    assert masked_.sparsity == pytest.approx(0.8, abs=0.01)  # from the masks
    assert masked_.file_gzip_bytes < 0.7 * dense.file_gzip_bytes
    assert thin.params < dense.params and thin.macs < dense.macs
    assert thin.params_ratio == pytest.approx(thin.params / dense.params)
    assert thin.macs_ratio == pytest.approx(thin.macs / dense.macs)
    assert masked_.latency_ratio > 0
    assert dense.mAP is None and dense.method == "dense" and masked_.method == "masked"
    assert all(r.threads == 1 and r.torch == torch.__version__ for r in rows)
    assert calls and calls[-1][0] == calls[-1][1]

    out = write_csv(rows, tmp_path / "sub" / "bench.csv")
    with open(out, newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == BENCH_COLUMNS
    assert len(table) == 7
    row = dict(zip(table[0], table[1]))
    assert row["kind"] == "dense" and row["params_ratio"] == "1" and row["mAP"] == ""
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temporary file left behind


def test_write_csv_always_same_header(tmp_path):
    out = write_csv([], tmp_path / "empty.csv")
    assert out.read_text().splitlines() == [",".join(BENCH_COLUMNS)]
    out = write_csv([{"model": "x", "unknown": 1}], tmp_path / "partial.csv")
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(BENCH_COLUMNS) and lines[1].startswith("x,")


def test_cli_bench_writes_csv(tmp_path, ckpts):
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "cli.csv"
    args = ["bench", str(ckpts[0]), str(ckpts[2]), "--input-size", str(SIZE), "--runs", "2", "--warmup", "1",
            "--threads", "1", "--batch-size", "1", "--csv", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == BENCH_COLUMNS and len(table) == 3
    assert "thin.pt" in result.output and "MACs" in result.output


def test_cli_bench_missing_checkpoint_is_one_clear_error(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["bench", str(tmp_path / "nope.pt")])
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception) or "does not exist" in result.output


def test_cli_bench_with_data_fills_map(tmp_path, ckpts):
    from typer.testing import CliRunner

    from cli.main import app
    from surgery.data import synthesize

    root = synthesize(tmp_path / "shapes", images=4, size=64, seed=1, val_images=4).root
    out = tmp_path / "map.csv"
    args = ["bench", str(ckpts[0]), "--data", f"coco:{root}", "--input-size", str(SIZE), "--runs", "1",
            "--warmup", "0", "--threads", "1", "--batch-size", "1", "--csv", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        row = next(csv.DictReader(f))
    assert row["mAP"] != "" and 0.0 <= float(row["mAP"]) <= 1.0 and row["mAP50"] != ""


def test_bench_two_stage_at_a_fixed_roi_count(tmp_path):
    from surgery.config.recipe import BenchSection
    from surgery.detectors.builders import ModelSpec, build_model

    spec = ModelSpec("fasterrcnn_mobilenet_v3_large_320_fpn", {"min_size": 128, "max_size": 128})
    path = save_checkpoint(tmp_path / "frcnn.pt", build_model(spec), spec)
    cfg = BenchSection(input_size=128, batch_sizes=[1], warmup=0, runs=1, rois=20)
    few = bench_checkpoints([path], cfg)[0]
    cfg.rois = 80
    many = bench_checkpoints([path], cfg)[0]
    assert few.macs < many.macs  # the box head ran on exactly 20 vs 80 RoIs
