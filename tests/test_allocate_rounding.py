"""MACs targets land on thin networks: round_to relaxed for thin groups and per-group rounding
thresholds (surgery.pruning.allocate.keep_count), so the kept fraction follows the ratio instead of jumping."""

from __future__ import annotations

import pytest

from surgery.config.recipe import PruneSection
from surgery.pruning.allocate import group_dither, keep_count, thin_round_to
from surgery.pruning.target import find_ratio_for_target


def test_thin_groups_round_to_less():
    assert [thin_round_to(c, 8) for c in (8, 16, 31, 32, 64, 256)] == [2, 4, 4, 8, 8, 8]
    assert thin_round_to(16, 1) == 1


def test_keep_count_strict_is_the_old_ceiling_and_dither_averages_to_the_exact_count():
    assert keep_count(64, 0.3, round_to=8) == 48  # ceil(44.8) -> 48
    assert keep_count(64, 0.3, round_to=8, strict_round_to=False) == 48  # 64 >= 4 x 8: full round_to
    assert keep_count(16, 0.3, round_to=8) == 16  # strict: a thin layer cannot be cut at all at 30%
    assert keep_count(16, 0.3, round_to=8, strict_round_to=False, min_channels=1) == 12
    # over many groups the dithered counts average to channels x (1 - ratio)
    counts = [keep_count(64, 0.3, round_to=8, strict_round_to=False, dither=group_dither(i), min_channels=1)
              for i in range(200)]
    assert set(counts) == {40, 48} and sum(counts) / len(counts) == pytest.approx(64 * 0.7, abs=0.5)
    assert all(0.0 <= group_dither(i) < 1.0 for i in range(50))


@pytest.mark.parametrize("name", ["ultralytics:yolov8n.yaml", "ultralytics:yolo11n.yaml"])
@pytest.mark.parametrize("target", [0.5, 0.25])
def test_macs_targets_land_within_2_percent_on_yolo(name: str, target: float):
    from surgery.detectors.builders import ModelSpec, build_model

    model = build_model(ModelSpec(name, {"nc": 4, "size": 128}))
    cfg = PruneSection(method="l1", round_to=8, min_channels=8)
    res = find_ratio_for_target(model, cfg, target_macs=target, macs_input_size=128)
    assert res.within_tolerance, res.note
    assert abs(res.achieved_macs_ratio / target - 1.0) <= 0.02
    # with the old strict rounding the 50% target misses on both (the bug this fixes)
    if target == 0.5:
        strict = find_ratio_for_target(model, PruneSection(method="l1", round_to=8, min_channels=8,
                                                           strict_round_to=True),
                                       target_macs=target, macs_input_size=128)
        assert not strict.within_tolerance
