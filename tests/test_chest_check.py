"""The chest check: metadata, the lung_air image detector and the verdict rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.core.body_part.base import BodyPartDetector, ImageAssessment
from services.core.body_part.detectors import available_detectors, create_detector
from services.core.body_part.lung_air import LungAirDetector
from services.core.chest_check import MetadataAssessment, check_chest, decide
from services.core.config import ChestCheckSettings, QualitySettings, SeriesSelectionSettings
from services.core.dicom import Series, Study, load_volume, read_studies, select_series
from services.core.schemas import ChestCheckEvidence, IntakeSummary
from services.core.volume import Volume
from synthetic.sample_studies import chest_phantom, head_phantom, write_ct_series

SETTINGS = ChestCheckSettings()


def _load(files: list[Path]) -> tuple[Study, Series, Volume]:
    (study,) = read_studies(sorted(files), IntakeSummary())
    selection = select_series(study, SeriesSelectionSettings())
    assert selection.selected is not None, selection.failure_reason
    volume, _, _ = load_volume(selection.selected, QualitySettings())
    return study, selection.selected, volume


def _fixture(fixtures_dir: Path, name: str) -> tuple[Study, Series, Volume]:
    return _load([p for p in (fixtures_dir / name).rglob("*") if p.is_file()])


# --- real fixtures ------------------------------------------------------------------------


def _verdicts(fixtures_dir: Path, name: str) -> tuple[ChestCheckEvidence, tuple[bool | None, ...]]:
    """The chest check of a fixture, and its (is_chest, metadata, image) verdicts."""
    evidence = check_chest(*_fixture(fixtures_dir, name), SETTINGS)
    return evidence, (evidence.is_chest, evidence.metadata_verdict, evidence.image_verdict)


def test_chest_fixture_is_a_chest(fixtures_dir: Path) -> None:
    evidence, verdicts = _verdicts(fixtures_dir, "chest_ct_lung_dx_a0002")
    assert verdicts == (True, True, True)
    assert "chest: BodyPartExamined CHEST" in evidence.metadata_evidence
    assert evidence.image_detector == "lung_air"
    assert evidence.coverage_mm == pytest.approx(240.0)
    # Lungs fill most of a chest series; a real adult pair holds litres of air.
    assert evidence.image_evidence["lung_slice_fraction"] > 0.8
    assert evidence.image_evidence["lung_volume_ml"] > 1500
    assert -900 < evidence.image_evidence["mean_lung_hu"] < -600
    assert evidence.reason.startswith("chest CT: the tags say chest and the images show lungs")


def test_head_fixture_is_not_a_chest(fixtures_dir: Path) -> None:
    evidence, verdicts = _verdicts(fixtures_dir, "head_ct_gantry_tilt")
    assert verdicts == (False, False, False)
    assert "not chest: BodyPartExamined HEAD" in evidence.metadata_evidence
    # Air in the sinuses is enclosed and lung-dense after averaging, but small.
    assert evidence.image_evidence["lung_volume_ml"] < 250
    assert evidence.reason.startswith("not a chest CT: the images do not show lungs")


def test_upper_abdomen_fixture_is_not_a_chest(fixtures_dir: Path) -> None:
    evidence, verdicts = _verdicts(fixtures_dir, "abdomen_ct_jpeg2000")
    # PARTIALBODY names no part; the images show a little lung base; the series is short.
    assert verdicts == (False, None, False)
    assert "BodyPartExamined PARTIALBODY (names no specific part)" in evidence.metadata_evidence
    assert evidence.coverage_mm == pytest.approx(40.0)
    assert "covers 40 mm along the body axis, less than the 80 mm a chest needs" in evidence.reason
    assert evidence.image_evidence["lung_slices"] < evidence.image_evidence["evaluated_slices"] / 2


# --- generated phantoms: the verdict rules end to end ----------------------------------------


@pytest.fixture(scope="module")
def phantoms() -> dict[str, tuple[np.ndarray, tuple[float, float, float]]]:
    return {
        "chest": chest_phantom(size=128, slice_mm=4.0),
        "head": head_phantom(size=128),
    }


def _phantom_case(tmp_path: Path, phantom, **tags) -> tuple[Study, Series, Volume]:
    hu, spacing = phantom
    paths = write_ct_series(hu, tmp_path / "series", spacing=spacing, **tags)
    return _load(paths)


NO_TAGS = {"body_part": "", "study_description": "", "protocol_name": ""}


@pytest.mark.parametrize(
    ("phantom", "tags", "verdicts", "reason_start", "reason_part"),
    [
        pytest.param(
            "chest",
            {
                "body_part": "HEAD",
                "study_description": "CT HEAD",
                "series_description": "Head 4.0",
                "protocol_name": "ROUTINE",
            },
            (True, False, True),
            "chest CT by image:",
            "conflict: the tags say BodyPartExamined HEAD, StudyDescription 'CT HEAD'",
            id="lungs but tags say head: accepted with the conflict",
        ),
        pytest.param(
            "head",
            {"body_part": "CHEST", "study_description": "CT CHEST"},
            (False, True, False),
            "not a chest CT: the tags say chest but the images do not show lungs",
            "",
            id="tags say chest but no lungs: refused",
        ),
        pytest.param(
            "chest",
            NO_TAGS | {"series_description": "Series 2"},
            (True, None, True),
            "chest CT by image:",
            "",
            id="no tags but lungs: accepted",
        ),
        pytest.param(
            "chest",
            {
                "body_part": "",
                "study_description": "КТ органов грудной клетки",  # noqa: RUF001 - Russian on purpose
                "series_description": "Лёгкие 4.0",
            },
            (True, True, True),
            "chest CT: the tags say chest",
            "",
            id="a Russian description counts as chest",
        ),
    ],
)
def test_tags_and_images_of_a_phantom_give_the_verdict(
    phantoms, tmp_path: Path, phantom: str, tags, verdicts, reason_start: str, reason_part: str
) -> None:
    evidence = check_chest(*_phantom_case(tmp_path, phantoms[phantom], **tags), SETTINGS)
    assert (evidence.is_chest, evidence.metadata_verdict, evidence.image_verdict) == verdicts
    assert evidence.reason.startswith(reason_start)
    assert reason_part in evidence.reason


# --- the detector on hand-made volumes ------------------------------------------------------


def _volume(hu: np.ndarray, spacing=(5.0, 2.0, 2.0)) -> Volume:
    return Volume(
        hu=hu.astype(np.float32),
        row_cosine=np.array([1.0, 0, 0]),
        column_cosine=np.array([0, 1.0, 0]),
        slice_normal=np.array([0, 0, 1.0]),
        spacing_mm=spacing,
        origin_mm=np.zeros(3),
    )


def _torso(n: int = 40, size: int = 160) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, x = np.mgrid[:size, :size] - (size - 1) / 2.0
    body = (x / 70.0) ** 2 + (y / 50.0) ** 2 < 1.0
    hu = np.full((n, size, size), -1000.0)
    hu[:, body] = 40.0
    return hu, x, y


def test_lung_density_air_inside_the_body_is_lung() -> None:
    hu, x, y = _torso()
    lungs = ((np.abs(x) - 30.0) / 20.0) ** 2 + (y / 30.0) ** 2 < 1.0
    hu[:, lungs] = -850.0
    assessment = LungAirDetector().assess(_volume(hu))
    assert assessment.is_chest
    assert assessment.evidence["lung_slice_fraction"] == 1.0


def test_lung_density_outside_the_body_is_not_lung() -> None:
    hu, x, y = _torso()
    # A -850 HU blanket between the body and the image edge: it touches the edge.
    blanket = ((x / 70.0) ** 2 + (y / 50.0) ** 2 >= 1.0) & (y < 0)
    hu[:, blanket] = -850.0
    assessment = LungAirDetector().assess(_volume(hu))
    assert not assessment.is_chest
    assert assessment.evidence["lung_slices"] == 0


def test_pure_gas_inside_the_body_is_not_lung() -> None:
    hu, x, y = _torso()
    bowel_gas = ((np.abs(x) - 30.0) / 20.0) ** 2 + (y / 30.0) ** 2 < 1.0
    hu[:, bowel_gas] = -1000.0
    assert LungAirDetector().assess(_volume(hu)).evidence["lung_slices"] == 0


def test_lungs_in_a_few_slices_are_not_a_chest() -> None:
    hu, x, y = _torso(n=40)
    lungs = ((np.abs(x) - 30.0) / 20.0) ** 2 + (y / 30.0) ** 2 < 1.0
    hu[:8, lungs] = -850.0  # lung bases at the top of an abdomen scan: 8 of 40 slices
    assessment = LungAirDetector().assess(_volume(hu))
    assert not assessment.is_chest
    assert assessment.evidence["lung_slice_fraction"] == pytest.approx(0.2)


# --- verdict rules and the detector registry ---------------------------------------------------


def _image(is_chest: bool) -> ImageAssessment:
    return ImageAssessment(is_chest=is_chest, summary="lungs on N slices")


@pytest.mark.parametrize(
    ("modality", "tags", "image", "coverage", "expected", "start"),
    [
        ("MR", True, True, 300.0, False, "not a CT series"),
        ("CT", True, True, 60.0, False, "not a chest CT: the series covers 60 mm"),
        ("CT", True, False, 300.0, False, "not a chest CT: the tags say chest but"),
        ("CT", None, False, 300.0, False, "not a chest CT: the images do not show lungs"),
        ("CT", False, False, 300.0, False, "not a chest CT: the images do not show lungs"),
        ("CT", True, True, 300.0, True, "chest CT: the tags say chest"),
        ("CT", None, True, 300.0, True, "chest CT by image"),
        ("CT", False, True, 300.0, True, "chest CT by image: lungs on N slices; conflict"),
    ],
)
def test_decide(modality, tags, image, coverage, expected, start) -> None:
    metadata = MetadataAssessment(verdict=tags, non_chest_terms=["BodyPartExamined HEAD"])
    is_chest, reason = decide(modality, metadata, _image(image), coverage, SETTINGS)
    assert is_chest is expected
    assert reason.startswith(start)


def test_registry_and_injected_detector(fixtures_dir: Path) -> None:
    assert "lung_air" in available_detectors()
    assert isinstance(create_detector(SETTINGS), LungAirDetector)
    assert isinstance(create_detector(SETTINGS), BodyPartDetector)

    class NeverChest:
        name = "never_chest"

        def assess(self, volume: Volume) -> ImageAssessment:
            return ImageAssessment(is_chest=False, summary="stub says no", evidence={"calls": 1})

    study, series, volume = _fixture(fixtures_dir, "chest_ct_lung_dx_a0002")
    evidence = check_chest(study, series, volume, SETTINGS, detector=NeverChest())
    assert not evidence.is_chest
    assert evidence.image_detector == "never_chest"
    assert evidence.image_evidence == {"summary": "stub says no", "calls": 1}
    assert "the tags say chest but the images do not show lungs" in evidence.reason
