"""The chest check with body-part regression: the verdict rules with a real (non-demo) lookup
table on synthetic score curves, demo weights that never decide, failures that fall back.

The network is replaced by a scorer that returns the raw scores of a synthetic body (the
table and score model of tests/test_bpr_scores.py): the slices it is given are placed at
chosen heights, so a real fixture can be made to "look like" a head, a chest or an abdomen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_bpr_scores import SETTINGS as REAL_SETTINGS
from test_bpr_scores import interpret_scan, raw_score, scan

from services.core.body_part.base import ImageAssessment
from services.core.body_part.bpr_detector import BodyPartRegressionModel, BprDetector
from services.core.body_part.bpr_settings import demo_inference_settings
from services.core.chest_check import MetadataAssessment, check_chest, decide, regression_decides
from services.core.config import ChestCheckSettings, QualitySettings, SeriesSelectionSettings
from services.core.dicom import Series, Study, load_volume, read_studies, select_series
from services.core.errors import ModelServerUnavailable
from services.core.schemas import IntakeSummary
from services.core.volume import Volume

SETTINGS = ChestCheckSettings()
CHEST_MM = (330.0, 660.0)  # Th12 .. C6 in the synthetic body: lung base to apex
HEAD_MM = (700.0, 880.0)  # C3 .. above the eyes
ABDOMEN_MM = (150.0, 400.0)  # pelvis_end .. Th10


def _fixture(fixtures_dir: Path, name: str) -> tuple[Study, Series, Volume]:
    files = sorted(p for p in (fixtures_dir / name).rglob("*") if p.is_file())
    (study,) = read_studies(files, IntakeSummary())
    selection = select_series(study, SeriesSelectionSettings())
    assert selection.selected is not None, selection.failure_reason
    volume, _, _ = load_volume(selection.selected, QualitySettings())
    return study, selection.selected, volume


@pytest.fixture(scope="module")
def chest(fixtures_dir: Path) -> tuple[Study, Series, Volume]:
    return _fixture(fixtures_dir, "chest_ct_lung_dx_a0002")


@pytest.fixture(scope="module")
def head(fixtures_dir: Path) -> tuple[Study, Series, Volume]:
    return _fixture(fixtures_dir, "head_ct_gantry_tilt")


class SyntheticBody:
    """A stand-in network: the k-th of n slices it scores lies at heights[k] of the body."""

    def __init__(self, low_mm: float, high_mm: float) -> None:
        self.low_mm, self.high_mm = low_mm, high_mm
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        self.calls.append(tuple(slices.shape))
        heights = np.linspace(self.low_mm, self.high_mm, len(slices))
        return raw_score(heights).astype(np.float32).reshape(-1, 1)


def _model(scorer, *, demo: bool = False) -> BodyPartRegressionModel:
    settings = demo_inference_settings() if demo else REAL_SETTINGS
    return BodyPartRegressionModel(score_slices=scorer, settings=settings, demo=demo, source="test")


# --- real table, real fixtures: BPR decides ------------------------------------------------


def test_images_bpr_places_in_the_head_are_refused_whatever_the_tags(chest) -> None:
    study, series, volume = chest  # tags say chest, lung_air finds lungs
    body = SyntheticBody(*HEAD_MM)
    evidence = check_chest(study, series, volume, SETTINGS, body_part_model=_model(body))
    assert not evidence.is_chest
    assert evidence.body_part_regression_decides
    assert evidence.metadata_verdict is True
    assert evidence.image_verdict is True
    assert evidence.reason.startswith(
        "not a chest CT: the images show HEAD (landmarks C3..eyes_end), not a chest "
        "(the tags say chest)"
    )
    regression = evidence.body_part_regression
    assert regression is not None
    assert regression.body_part == "HEAD"
    assert not regression.demo
    # Four slices at most 80 mm apart, the ends included, one request.
    assert body.calls == [(4, 1, 128, 128)]
    assert regression.positions_mm == pytest.approx([0.0, 80.0, 152.0, 232.0])
    assert evidence.warnings[0] == "body-part regression: HEAD (landmarks C3..eyes_end)"


def test_a_chest_named_by_bpr_is_accepted_without_aerated_lung(head) -> None:
    """The head fixture (tags HEAD, no lungs by lung_air) scored as a chest: BPR's anatomy
    wins over lung_air and the tags; the conflicts are written down."""
    study, series, volume = head
    model = _model(SyntheticBody(*CHEST_MM))
    evidence = check_chest(study, series, volume, SETTINGS, body_part_model=model)
    assert evidence.is_chest
    assert evidence.body_part_regression_decides
    assert evidence.image_verdict is False
    assert evidence.metadata_verdict is False
    assert evidence.reason.startswith("chest CT: body-part regression sees CHEST (landmarks Th12..")
    assert "conflict: the tags say BodyPartExamined HEAD" in evidence.reason
    assert "too little aerated lung" in evidence.reason
    assert evidence.warnings[0].endswith("chest fully covered (lung base to apex)")
    # 330 mm of body in a 144 mm series: the spacing in the headers looks wrong.
    assert any("slice spacing in the headers looks wrong" in w for w in evidence.warnings)


def test_a_chest_without_its_apex_gets_a_coverage_warning(chest) -> None:
    study, series, volume = chest
    model = _model(SyntheticBody(330.0, 560.0))
    evidence = check_chest(study, series, volume, SETTINGS, body_part_model=model)
    assert evidence.is_chest
    assert evidence.reason.startswith(
        "chest CT: body-part regression sees CHEST (landmarks Th12..Th4), the images show lungs; "
        "the tags say chest"
    )
    regression = evidence.body_part_regression
    assert regression is not None
    assert regression.chest_fully_covered is False
    assert regression.lung_base_covered is True
    assert regression.lung_apex_covered is False
    assert evidence.warnings[0].endswith("; lung apex not covered")


def test_slices_in_reverse_order_are_flagged(chest) -> None:
    study, series, volume = chest
    model = _model(SyntheticBody(CHEST_MM[1], CHEST_MM[0]))  # head first
    evidence = check_chest(study, series, volume, SETTINGS, body_part_model=model)
    assert evidence.is_chest
    assert any("slice order or the patient orientation" in w for w in evidence.warnings)


# --- demo weights never decide -------------------------------------------------------------


def test_demo_weights_are_shown_but_the_verdict_is_the_tags_and_lung_air(chest, head) -> None:
    for (study, series, volume), scores in ((chest, HEAD_MM), (head, CHEST_MM)):
        body = SyntheticBody(*scores)
        without = check_chest(study, series, volume, SETTINGS)
        demo = check_chest(study, series, volume, SETTINGS, body_part_model=_model(body, demo=True))
        assert body.calls, "the demo model was not asked"
        assert (demo.is_chest, demo.reason) == (without.is_chest, without.reason)
        assert not demo.body_part_regression_decides
        assert demo.body_part_regression is not None
        assert demo.body_part_regression.demo
        # What the demo model saw is information in the report, not a data-quality warning.
        assert demo.body_part_regression.summary
        assert not any("body-part regression" in line for line in demo.warnings)


def test_demo_weights_with_a_real_looking_table_are_still_demo(chest) -> None:
    """The repository says demo weights, the table claims nothing: still DEMO."""
    study, series, volume = chest
    model = BodyPartRegressionModel(
        score_slices=SyntheticBody(*HEAD_MM), settings=REAL_SETTINGS, demo=True, source="test"
    )
    evidence = check_chest(study, series, volume, SETTINGS, body_part_model=model)
    assert evidence.is_chest
    assert not evidence.body_part_regression_decides
    assert evidence.body_part_regression is not None
    assert evidence.body_part_regression.demo


# --- failures and settings -----------------------------------------------------------------


def test_a_failing_bpr_falls_back_to_tags_and_lung_air(chest) -> None:
    study, series, volume = chest

    def broken(slices: np.ndarray) -> np.ndarray:
        raise RuntimeError("graph exploded")

    evidence = check_chest(study, series, volume, SETTINGS, body_part_model=_model(broken))
    assert evidence.is_chest
    assert evidence.body_part_regression is None
    assert evidence.reason.startswith("chest CT: the tags say chest and the images show lungs")
    assert evidence.warnings == [
        "body-part regression failed (RuntimeError: graph exploded); the verdict uses the tags "
        "and lung_air"
    ]


def test_an_unavailable_model_server_is_not_swallowed(chest) -> None:
    """The adapter waits for the server (RetryingBackend): the error must reach it."""
    study, series, volume = chest

    def unavailable(slices: np.ndarray) -> np.ndarray:
        raise ModelServerUnavailable("Triton is restarting")

    with pytest.raises(ModelServerUnavailable):
        check_chest(study, series, volume, SETTINGS, body_part_model=_model(unavailable))


def test_bpr_can_be_switched_off_and_its_slice_choice_configured(chest) -> None:
    study, series, volume = chest
    body = SyntheticBody(*HEAD_MM)
    off = SETTINGS.model_copy(update={"body_part_regression": False})
    evidence = check_chest(study, series, volume, off, body_part_model=_model(body))
    assert body.calls == []
    assert evidence.body_part_regression is None
    assert evidence.is_chest
    denser = SETTINGS.model_copy(update={"bpr_slice_spacing_mm": 40.0, "bpr_max_slices": 7})
    evidence = check_chest(study, series, volume, denser, body_part_model=_model(body))
    assert body.calls == [(7, 1, 128, 128)]


def test_the_bpr_detector_alone(chest) -> None:
    _, _, volume = chest
    assessment = BprDetector(_model(SyntheticBody(*ABDOMEN_MM))).assess(volume)
    assert not assessment.is_chest
    assert assessment.evidence["body_part"] == "ABDOMEN"
    assessment = BprDetector(_model(SyntheticBody(*CHEST_MM))).assess(volume)
    assert assessment.is_chest
    assert assessment.summary.startswith("CHEST (landmarks Th12..")
    demo = BprDetector(_model(SyntheticBody(*CHEST_MM), demo=True)).assess(volume)
    assert demo.summary.endswith("[DEMO weights]")


# --- the rules on synthetic evidence -------------------------------------------------------


def _image(is_chest: bool) -> ImageAssessment:
    return ImageAssessment(is_chest=is_chest, summary="lungs on N slices")


@pytest.mark.parametrize(
    ("heights", "tags", "lungs", "expected", "start"),
    [
        (HEAD_MM, True, True, False, "not a chest CT: the images show HEAD (landmarks C3..eyes_end)"),
        (HEAD_MM, None, False, False, "not a chest CT: the images show HEAD"),
        (ABDOMEN_MM, True, True, False, "not a chest CT: the images show ABDOMEN (landmarks "),
        ((100.0, 700.0), None, True, True, "chest CT: body-part regression sees NECK/CHEST/ABDOMEN"),
        ((600.0, 760.0), None, False, False, "not a chest CT: the images show HEAD/NECK (landmarks Th1..C1), not"),
        (CHEST_MM, True, True, True, "chest CT: body-part regression sees CHEST"),
        (CHEST_MM, False, True, True, "chest CT: body-part regression sees CHEST"),
        (CHEST_MM, None, False, True, "chest CT: body-part regression sees CHEST"),
    ],
)  # fmt: skip
def test_decide_with_real_bpr(heights, tags, lungs, expected, start) -> None:
    regression = interpret_scan(scan(*heights, 20.0))
    assert regression_decides(regression)
    metadata = MetadataAssessment(verdict=tags, non_chest_terms=["BodyPartExamined HEAD"])
    is_chest, reason = decide("CT", metadata, _image(lungs), 300.0, SETTINGS, regression)
    assert is_chest is expected
    assert reason.startswith(start), reason


def test_rules_before_bpr_still_come_first() -> None:
    regression = interpret_scan(scan(*CHEST_MM, 20.0))
    metadata = MetadataAssessment(verdict=True)
    assert decide("MR", metadata, _image(True), 300.0, SETTINGS, regression)[0] is False
    is_chest, reason = decide("CT", metadata, _image(True), 60.0, SETTINGS, regression)
    assert not is_chest
    assert reason.startswith("not a chest CT: the series covers 60 mm")


def test_scores_that_name_no_part_leave_the_verdict_to_tags_and_lung_air() -> None:
    regression = interpret_scan(scan(950.0, 1100.0, 20.0))  # far above the table
    assert regression.body_part is None
    assert not regression_decides(regression)
    metadata = MetadataAssessment(verdict=True)
    with_bpr = decide("CT", metadata, _image(True), 300.0, SETTINGS, regression)
    assert with_bpr == decide("CT", metadata, _image(True), 300.0, SETTINGS)


# --- what the web UI's study view says -------------------------------------------------------


def test_the_study_view_names_what_bpr_saw(chest) -> None:
    from services.frontend.study_view import chest_check_lines

    study, series, volume = chest
    for demo, label in ((False, "body-part regression: "), (True, "(DEMO weights, not used")):
        model = BodyPartRegressionModel(
            score_slices=SyntheticBody(330.0, 560.0), settings=REAL_SETTINGS, demo=demo, source="t"
        )
        evidence = check_chest(study, series, volume, SETTINGS, body_part_model=model)
        (line,) = [s for s in chest_check_lines(evidence)["lines"] if "body-part" in s]
        assert label in line
        assert line.endswith("CHEST (landmarks Th12..Th4); lung apex not covered")
    without = check_chest(study, series, volume, SETTINGS)
    assert not [s for s in chest_check_lines(without)["lines"] if "body-part" in s]


# --- NIfTI: no tags, so a real BPR and lung_air are the whole check ------------------------


def test_a_nifti_volume_is_judged_by_bpr_when_the_backend_serves_it(chest, head) -> None:
    from services.core.nifti.study import check_chest_by_image

    _study, _series, chest_volume = chest
    refused = check_chest_by_image(chest_volume, SETTINGS, _model(SyntheticBody(*HEAD_MM)))
    assert not refused.is_chest
    assert refused.body_part_regression_decides
    assert "HEAD" in refused.reason
    assert refused.image_verdict is True
    _study, _series, head_volume = head
    accepted = check_chest_by_image(head_volume, SETTINGS, _model(SyntheticBody(*CHEST_MM)))
    assert accepted.is_chest
    assert accepted.body_part_regression_decides
    demo = check_chest_by_image(chest_volume, SETTINGS, _model(SyntheticBody(*HEAD_MM), demo=True))
    assert demo.is_chest
    assert not demo.body_part_regression_decides
    assert demo.body_part_regression is not None
    assert demo.body_part_regression.demo  # shown as information, not as a warning
    assert not any("DEMO" in line for line in demo.warnings)
    without = check_chest_by_image(chest_volume, SETTINGS)
    assert without.is_chest
    assert without.body_part_regression is None
