"""Every picture says what it shows: detections.png puts the ground truth beside the predictions,
states its score threshold and draws one box per object (class-wise NMS); layer_widths.png names
its variant; the mAP-vs-MACs point labels are explained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery import report


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions would save, kept open for inspection."""
    kept = []

    def save(fig, path):
        kept.append(fig)
        return Path(path)

    monkeypatch.setattr(report, "_save", save)
    yield kept
    for fig in kept:
        report._plt().close(fig)


def _texts(fig) -> list[str]:
    titles = [ax.get_title() for ax in fig.axes]
    return [t for t in titles if t] + ([fig._suptitle.get_text()] if fig._suptitle is not None else [])


def test_boxes_to_draw_applies_the_threshold_and_classwise_nms():
    pred = {"boxes": torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [30, 30, 40, 40], [50, 50, 60, 60.]]),
            "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.2]),
            "labels": torch.tensor([1, 1, 2, 1, 1])}  # fmt: skip
    drawn = report.boxes_to_draw(pred, score_thresh=0.3)
    # the near-duplicate of class 1 goes; the same box of another class stays; 0.2 is under the threshold
    assert [(round(s, 1), lab) for _, s, lab in drawn] == [(0.9, 1), (0.7, 2), (0.6, 1)]


def test_detections_grid_has_ground_truth_threshold_and_no_duplicates(figures, tmp_path):
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    gt = [{"boxes": torch.tensor([[5.0, 5, 20, 20]]), "labels": torch.tensor([1])},
          {"boxes": torch.tensor([[30.0, 30, 50, 50], [2, 2, 9, 9]]), "labels": torch.tensor([2, 1])}]
    dup = {"boxes": torch.tensor([[5.0, 5, 20, 20], [5.5, 5, 20, 20]]), "scores": torch.tensor([0.9, 0.85]),
           "labels": torch.tensor([1, 1])}  # fmt: skip
    preds = {"dense": [dup, dup], "pruned": [dup, {"boxes": torch.zeros(0, 4)}]}
    report.plot_detections_grid(images, preds, tmp_path / "d.png", class_names=["bg", "square", "disc"],
                                score_thresh=0.4, ground_truth=gt)  # fmt: skip
    (fig,) = figures
    texts = _texts(fig)
    assert texts[:3] == ["ground truth", "dense", "pruned"]
    assert "score >= 0.4" in texts[-1] and "class-wise NMS" in texts[-1]
    axes = [ax for ax in fig.axes]
    ncol = 3
    assert [len(ax.patches) for ax in axes] == [1, 1, 1, 2, 1, 0]  # one box per object, GT in column 1
    assert [t.get_text() for t in axes[ncol].texts] == ["disc", "square"]  # ground truth: names, no scores
    assert [t.get_text() for t in axes[1].texts] == ["square 0.90"]


def test_layer_widths_names_its_variant_and_map_plot_explains_its_labels(figures, tmp_path):
    report.plot_layer_widths({"a": 64, "b": 32}, {"a": 32, "b": 16}, tmp_path / "w.png", variant="l1-cut0.5")
    rows = [{"method": "dense", "macs": 1e9, "map_retrained": 0.7},
            {"method": "structured-l1", "ratio": 0.5, "macs": 5e8, "map_retrained": 0.6, "map_pruned": 0.1}]
    report.plot_map_vs_macs(rows, tmp_path / "m.png")
    report.plot_latency_vs_ratio([{**r, "latency_ms": 10.0} for r in rows], tmp_path / "l.png")
    widths, maps, latency = (_texts(f) for f in figures)
    assert "l1-cut0.5" in widths[0] and "kept / before" in widths[0]
    assert "point labels: % pruned" in maps[0] and "channels removed" in maps[0]
    assert "50%" in [t.get_text() for t in figures[1].axes[0].texts]
    assert "vs % pruned" in latency[0]
