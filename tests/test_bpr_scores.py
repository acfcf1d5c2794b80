"""Body-part regression scores to anatomy, on synthetic score curves and a synthetic table.

The synthetic model scores a slice ``RAW_AT_START + RAW_PER_MM * h`` where h is its height in
mm above the start of the pelvis; the lookup table places each landmark at a made-up height.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from services.core.body_part.bpr_scores import (
    cut_outlier_tails,
    evidence_for_volume,
    interpret,
    remove_background,
    smooth_scores,
    transform_scores,
)
from services.core.body_part.bpr_settings import (
    BprInferenceSettings,
    InterpretationRules,
    LandmarkScore,
    LandmarkTable,
    TransformLandmarks,
    demo_inference_settings,
    inference_settings_json,
    missing_landmarks,
)
from services.core.volume import Volume

HEIGHT_MM = {
    "pelvis_start": 0, "femur_end": 60, "pelvis_end": 150, "L5": 170, "L4": 205, "L3": 240,
    "L2": 275, "L1": 310, "Th12": 340, "lung_start": 360, "Th11": 365, "Th10": 390,
    "Th9": 415, "Th8": 440, "Th7": 465, "Th6": 490, "Th5": 515, "Th4": 540, "Th3": 565,
    "Th2": 590, "Th1": 610, "lung_end": 625, "C7": 635, "C6": 655, "C5": 672, "C4": 689,
    "C3": 706, "C2": 725, "C1": 745, "eyes_end": 850, "head_end": 930,
}  # fmt: skip
RAW_AT_START = -3.0
RAW_PER_MM = 0.02
EYES_MM = HEIGHT_MM["eyes_end"]
SLOPE_PER_MM = 100.0 / EYES_MM  # transformed score per mm


def raw_score(height_mm) -> np.ndarray:
    return RAW_AT_START + RAW_PER_MM * np.asarray(height_mm, dtype=np.float64)


def synthetic_settings(heights: dict[str, float] = HEIGHT_MM) -> BprInferenceSettings:
    original = {
        name: LandmarkScore(mean=float(raw_score(h)), std=0.1) for name, h in heights.items()
    }
    return BprInferenceSettings(
        slope_mean=SLOPE_PER_MM,
        lower_quantile_tangential_slope=-0.037,
        upper_quantile_tangential_slope=0.25,
        lookuptable_train_val=LandmarkTable(original=original),
        settings=TransformLandmarks(start_landmark="pelvis_start", end_landmark="eyes_end"),
    )


SETTINGS = synthetic_settings()


def scan(low_mm: float, high_mm: float, step_mm: float = 40.0) -> np.ndarray:
    """Slice heights from ``low_mm`` to ``high_mm`` (both included), feet to head."""
    return np.unique(np.append(np.arange(low_mm, high_mm, step_mm), high_mm))


def interpret_scan(heights: np.ndarray, noise: float = 0.0, **kwargs):
    raw = raw_score(heights) + np.random.default_rng(0).normal(0, noise, heights.size)
    return interpret(raw, heights - heights[0], SETTINGS, **kwargs)


# ----------------------------------------------------------------------------- the transform


def test_transform_puts_start_at_0_and_end_at_100():
    transformed = transform_scores(raw_score([0, EYES_MM, 425]), SETTINGS)
    np.testing.assert_allclose(transformed, [0.0, 100.0, 50.0])
    landmarks = SETTINGS.landmark_scores()
    assert list(landmarks)[:3] == ["pelvis_start", "femur_end", "pelvis_end"]
    assert landmarks["Th12"] == pytest.approx(340 / EYES_MM * 100)


# ----------------------------------------------------------------------------- anatomy


def test_a_chest_scan_is_chest_and_fully_covered():
    evidence = interpret_scan(scan(330, 660), noise=0.005)
    assert evidence.body_part == "CHEST"
    assert evidence.body_parts_present == ["CHEST"]
    assert (evidence.first_landmark, evidence.last_landmark) == ("Th12", "C6")
    assert evidence.landmarks_covered[:3] == ["Th12", "lung_start", "Th11"]
    assert evidence.chest_fully_covered is True
    assert evidence.slope_plausible is True
    assert evidence.reversed_order is False
    assert evidence.observed_slope_per_mm == pytest.approx(SLOPE_PER_MM, rel=0.02)
    assert evidence.warnings == []
    assert evidence.demo is False


def test_a_chest_scan_without_the_apex_is_flagged():
    evidence = interpret_scan(scan(330, 600))
    assert evidence.body_part == "CHEST"
    assert evidence.lung_base_covered is True
    assert evidence.lung_apex_covered is False
    assert evidence.chest_fully_covered is False
    assert evidence.last_landmark == "Th2"


def test_a_head_scan_is_head():
    evidence = interpret_scan(scan(700, 880, 30.0))
    assert evidence.body_part == "HEAD"
    assert (evidence.first_landmark, evidence.last_landmark) == ("C3", "eyes_end")
    assert evidence.lung_base_covered is False
    assert evidence.lung_apex_covered is True
    assert evidence.chest_fully_covered is False


def test_a_long_scan_is_named_by_its_span_head_first():
    evidence = interpret_scan(scan(100, 700, 20.0))
    assert evidence.body_parts_present == ["ABDOMEN", "CHEST", "NECK"]
    assert evidence.body_part == "NECK-CHEST-ABDOMEN"
    evidence = interpret_scan(scan(-20, 700, 20.0))
    assert evidence.body_part == "NECK-CHEST-ABDOMEN-PELVIS"


def test_a_short_scan_is_named_by_its_slices():
    evidence = interpret_scan(scan(420, 490, 10.0))  # 70 mm inside the chest range
    assert evidence.body_parts_present == []  # too few landmarks for any part
    assert evidence.body_part == "CHEST"


def test_scores_outside_every_part_name_nothing():
    evidence = interpret_scan(scan(950, 1000, 10.0))
    assert evidence.body_part is None
    assert evidence.landmarks_covered == []


# ----------------------------------------------------------------------------- slope checks


def test_reversed_order_is_a_warning():
    heights = scan(330, 660)[::-1]  # scored head to feet but given as feet to head
    evidence = interpret(raw_score(heights), np.arange(heights.size) * 40.0, SETTINGS)
    assert evidence.reversed_order is True
    assert any("slice order" in warning for warning in evidence.warnings)
    assert evidence.body_part == "CHEST"
    assert evidence.chest_fully_covered is True


def test_a_wrong_spacing_is_a_warning():
    heights = scan(330, 660)
    evidence = interpret(raw_score(heights), (heights - 330) / 2, SETTINGS)  # spacing halved
    assert evidence.slope_ratio == pytest.approx(2.0, rel=1e-6)
    assert evidence.slope_plausible is False
    assert evidence.reversed_order is False
    assert any("spacing" in warning and "2.00x" in warning for warning in evidence.warnings)


def test_a_slope_within_tolerance_is_plausible():
    heights = scan(330, 660)
    evidence = interpret(raw_score(heights), (heights - 330) / 1.2, SETTINGS)
    assert evidence.slope_plausible is True
    assert evidence.warnings == []


# ----------------------------------------------------------------------------- cleaning


def test_blank_slices_are_dropped():
    transformed = np.array([40.0, 110.83, 50.0, 6.1449])
    cleaned = remove_background(transformed, InterpretationRules().background_scores)
    assert np.isnan(cleaned[1])
    assert np.isnan(cleaned[3])
    assert cleaned[[0, 2]].tolist() == [40, 50]


def test_smoothing_keeps_a_line_and_damps_noise():
    z = np.array([0.0, 3.0, 5.0, 11.0, 12.0, 20.0, 26.0, 40.0])
    line = 2.0 + 0.3 * z
    np.testing.assert_allclose(smooth_scores(line, z, 10.0), line, atol=1e-9)
    z = np.arange(0, 200, 2.0)
    noisy = 0.1 * z + np.random.default_rng(1).normal(0, 1, z.size)
    assert np.std(smooth_scores(noisy, z, 10.0) - 0.1 * z) < 0.5 * np.std(noisy - 0.1 * z)
    with_gap = line.copy()
    with_gap[2] = np.nan
    assert np.isnan(smooth_scores(with_gap, np.arange(8.0), 10.0)[2])


def test_tails_beyond_the_start_and_end_landmarks_are_cut():
    heights = scan(-200, 900, 20.0)
    raw = raw_score(heights)
    legs = heights < -10
    above_head = heights > 880
    raw[legs] = raw_score(300)  # out of the training range: nonsense scores
    raw[above_head] = raw_score(500)
    evidence = interpret(raw, heights - heights[0], SETTINGS)
    cleaned = np.array([np.nan if v is None else v for v in evidence.cleaned_scores])
    # Slices next to a cut, smoothed with the nonsense, may go with it.
    assert np.all(np.isnan(cleaned[legs | above_head]))
    assert np.all(np.isfinite(cleaned[(heights > 10) & (heights < 860)]))
    assert evidence.slope_plausible is True
    assert evidence.body_part == "HEAD-NECK-CHEST-ABDOMEN-PELVIS"
    # Without the cut the leg scores would drag the fitted slope off.
    uncut = np.polyfit(heights, transform_scores(raw, SETTINGS), 1)[0]
    assert abs(uncut / SLOPE_PER_MM - 1) > InterpretationRules().slope_ratio_tolerance


def test_a_bad_step_between_the_landmarks_is_not_cut():
    heights = scan(0, 850, 20.0)
    transformed = transform_scores(raw_score(heights), SETTINGS)
    transformed[20] += 15  # a jump in the middle of the body
    cleaned = cut_outlier_tails(transformed, heights, SETTINGS, InterpretationRules())
    assert np.all(np.isfinite(cleaned))


# ----------------------------------------------------------------------------- inputs, settings


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="one position per score"):
        interpret([1.0, 2.0], [0.0], SETTINGS)
    with pytest.raises(ValueError, match="increase"):
        interpret([1.0, 2.0], [5.0, 5.0], SETTINGS)


def test_a_single_slice_gives_no_slope():
    evidence = interpret([float(raw_score(450))], [0.0], SETTINGS)
    assert evidence.observed_slope_per_mm is None
    assert evidence.slope_plausible is None
    assert evidence.body_part == "CHEST"


def test_a_table_without_lung_landmarks_leaves_coverage_unknown():
    heights = {k: v for k, v in HEIGHT_MM.items() if not k.startswith("lung")}
    settings = synthetic_settings(heights)
    assert missing_landmarks(settings, InterpretationRules()) == ["lung_end", "lung_start"]
    evidence = interpret(raw_score(scan(330, 660)), scan(0, 330), settings)
    assert evidence.chest_fully_covered is None
    assert evidence.body_part == "CHEST"
    assert any("lung_end, lung_start" in warning for warning in evidence.warnings)


def test_settings_read_bpregs_document_and_check_it():
    document = inference_settings_json(SETTINGS)
    assert document["settings"] == {"start-landmark": "pelvis_start", "end-landmark": "eyes_end"}
    document.update(slope_std=0.01, lookuptable_train={})  # bpreg's other entries are ignored
    assert BprInferenceSettings.model_validate(json.loads(json.dumps(document))) == SETTINGS
    document["settings"]["end-landmark"] = "knee"
    with pytest.raises(ValidationError, match="'knee'"):
        BprInferenceSettings.model_validate(document)
    document["settings"]["end-landmark"] = "eyes_end"
    transformed = {name: {"mean": 5.0} for name in HEIGHT_MM}
    document["lookuptable_train_val"]["transformed"] = transformed
    with pytest.raises(ValidationError, match="does not match its transform"):
        BprInferenceSettings.model_validate(document)


def test_demo_table_is_labelled_and_complete():
    demo = demo_inference_settings()
    assert demo.demo
    assert missing_landmarks(demo, InterpretationRules()) == []
    evidence = interpret([-1.5, -1.2], [0.0, 300.0], demo)
    assert evidence.demo
    assert any("DEMO" in warning for warning in evidence.warnings)


# ----------------------------------------------------------------------------- a whole volume


def _height_coded_volume(*, head_first: bool) -> Volume:
    """330 mm .. 660 mm of body in 1.5 mm slices, each slice's HU value coding its height."""
    heights = np.arange(330.0, 661.0, 1.5)
    hu = np.broadcast_to((heights - 1000.0)[:, None, None], (heights.size, 64, 64))
    normal = np.array([0.0, 0.0, 1.0])
    if head_first:
        hu, normal = hu[::-1], -normal
    return Volume(
        hu=np.ascontiguousarray(hu, dtype=np.float32),
        row_cosine=np.array([1.0, 0.0, 0.0]),
        column_cosine=np.array([0.0, 1.0, 0.0]),
        slice_normal=normal,
        spacing_mm=(1.5, 2.0, 2.0),
        origin_mm=np.zeros(3),
    )


def _decode_height_scorer(batches: list[int]):
    """A stand-in network: reads the height back from the centre pixel, scores it."""

    def score(slices: np.ndarray) -> np.ndarray:
        assert slices.dtype == np.float32
        assert slices.shape[1:] == (1, 128, 128)
        batches.append(slices.shape[0])
        hu = (slices[:, 0, 64, 64].astype(np.float64) + 1.0) * 2500 / 2 - 1000
        return raw_score(hu + 1000.0)[:, None]

    return score


@pytest.mark.parametrize("head_first", [False, True])
def test_evidence_for_a_volume_scores_a_few_slices_feet_to_head(head_first):
    batches: list[int] = []
    volume = _height_coded_volume(head_first=head_first)
    evidence = evidence_for_volume(volume, _decode_height_scorer(batches), SETTINGS)
    assert batches == [4]  # 330 mm of scan: 5 slices 80 mm apart, capped at 4
    assert evidence.positions_mm[0] == 0.0
    assert evidence.positions_mm[-1] == pytest.approx(330.0)
    assert evidence.body_part == "CHEST"
    assert evidence.chest_fully_covered is True
    assert evidence.reversed_order is False
    assert evidence.slope_plausible is True
    assert evidence.lowest_score == pytest.approx(330 / EYES_MM * 100, abs=0.05)
