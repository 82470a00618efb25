"""Sweep report: markdown table and plots."""

from __future__ import annotations

import pytest
import torch

from surgery.report import (
    HEADER,
    markdown_table,
    plot_detections_grid,
    plot_latency_vs_ratio,
    plot_layer_widths,
    plot_map_vs_macs,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _row(method, ratio=None, sparsity=None, params=12.6e6, nz=None, macs=1.34e9, lat=50.0, mp=0.30, mr=0.40):
    return {
        "method": method,
        "ratio": ratio,
        "sparsity": sparsity,
        "params": params,
        "params_nonzero": params if nz is None else nz,
        "macs": macs,
        "latency_ms": lat,
        "map_pruned": mp,
        "map_retrained": mr,
        "map50_pruned": None if mp is None else mp + 0.2,
        "map50_retrained": None if mr is None else mr + 0.2,
        "dense_control_map": 0.42,
    }


@pytest.fixture
def rows():
    return [
        _row("dense", mp=0.42, mr=None),
        _row("structured-l1", ratio=0.3, params=8.1e6, macs=0.9e9, lat=38.0, mp=0.20, mr=0.40),
        _row("structured-l1", ratio=0.5, params=4.9e6, macs=0.62e9, lat=29.0, mp=0.05, mr=0.36),
        _row("masked", sparsity=0.5, nz=6.3e6, lat=50.5, mp=0.41, mr=0.42),
        _row("masked", sparsity=0.9, nz=1.26e6, lat=49.8, mp=0.10, mr=0.33),
    ]


def test_markdown_table(rows):
    md = markdown_table(rows)
    lines = md.strip().splitlines()
    assert lines[0] == "| " + " | ".join(HEADER) + " |"
    assert lines[0] == "| method | % pruned | params | MACs | latency | mAP pruned | mAP retrained | retained mAP |"
    assert set(lines[1]) <= set("|-: ")
    assert len(lines) == 2 + len(rows)
    dense, s30, _, m50, m90 = (line.split(" | ") for line in lines[2:])
    assert dense[1] == "0%" and dense[2] == "12.6M" and dense[3] == "1.34G" and dense[4] == "50.0 ms"
    assert dense[6] == "-"  # not retrained
    assert s30[1] == "30% channels" and s30[2] == "8.1M" and s30[3] == "900M"
    assert s30[7].rstrip(" |") == f"{100 * 0.40 / 0.42:.1f}%"
    assert m90[1] == "90% weights" and "1.26M nonzero" in m90[2] and m90[3] == "1.34G"
    assert m50[6] == "0.420" and m50[7].rstrip(" |") == "100.0%"


def test_markdown_table_missing_values():
    md = markdown_table([{"method": "structured-l1", "ratio": 0.5}])
    assert md.strip().splitlines()[-1].count("-") >= 5


def _check_png(p):
    assert p.is_file() and p.stat().st_size > 2000
    assert p.read_bytes()[:8] == PNG


def test_plots_write_pngs(tmp_path, rows):
    _check_png(plot_map_vs_macs(rows, tmp_path / "map_vs_macs.png"))
    _check_png(plot_latency_vs_ratio(rows, tmp_path / "latency.png"))
    before = {f"backbone.layer{i}": 64 * 2**i for i in range(1, 5)} | {"fpn": 256, "head.cls": 256}
    after = {k: v // 2 for k, v in before.items()} | {"fpn": 256}
    _check_png(plot_layer_widths(before, after, tmp_path / "sub" / "widths.png"))


def test_detections_grid(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g) for _ in range(2)]
    pred = {
        "boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 120.0, 90.0], [0, 0, 5, 5]]),
        "scores": torch.tensor([0.9, 0.5, 0.1]),
        "labels": torch.tensor([1, 2, 1]),
    }
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    p = plot_detections_grid(
        images, {"dense": [pred, pred], "structured 50%": [pred, empty]}, tmp_path / "grid.png",
        class_names=["bg", "circle", "square"],
    )
    _check_png(p)


def test_weak_dense_reference_shows_no_retained_ratio(rows):
    from surgery.report import MIN_REFERENCE_MAP

    weak = [dict(r, dense_control_map=MIN_REFERENCE_MAP / 50) for r in rows]  # a dense mAP of 0.001
    lines = markdown_table(weak).strip().splitlines()[2:]
    assert all(line.rstrip(" |").endswith("-") for line in lines)  # not "retained 279.9%"
    assert "%" in markdown_table(rows).strip().splitlines()[3].split(" | ")[-1]
