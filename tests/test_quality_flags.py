"""Data-quality flags from where each warning is raised, on the real fixtures of ../shared: the
chest CT with slices taken out (interpolated, and the slices the viewer must mark), the head
CT with gantry tilt, the series with duplicate positions, a study with two usable series,
late images from the DICOM listener; the registry keeps the flags of a recorded result."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from registry_support import open_registry
from test_registry import result, submission

from services.adapter.task_runner import LATE_INSTANCES_WARNING, mark_late_instances
from services.adapter.viewer_data import viewer_stack
from services.core.config import QualitySettings, Settings
from services.core.dicom import load_volume, read_studies
from services.core.pipeline.prepare import prepare_studies
from services.core.preprocessing import PreprocessingTarget
from services.core.quality import QualityFlag
from services.core.schemas import IntakeSummary, StudyReport
from services.registry import StudyFilter

CHEST = "chest_ct_lung_dx_a0002"
SMALL_TARGET = PreprocessingTarget(shape=(24, 40, 40), spacing_mm=(15.0, 9.0, 9.0))
REMOVED = (9, 17)  # positions (in slice order) taken out of the 30-slice chest series


def by_position(folder: Path) -> list[Path]:
    files = [path for path in folder.iterdir() if path.is_file()]
    return sorted(files, key=lambda path: float(pydicom.dcmread(path).ImagePositionPatient[2]))


def gapped_chest(fixtures_dir: Path, target: Path) -> Path:
    """The real chest CT without two of its slices (8 mm apart: two gaps of 16 mm)."""
    shutil.copytree(fixtures_dir / CHEST, target)
    ordered = by_position(target)
    for index in REMOVED:
        ordered[index].unlink()
    return target


def prepared(folder: Path) -> StudyReport:
    (study,) = list(prepare_studies(folder, settings=Settings(), target=SMALL_TARGET))
    return study.report


def test_missing_slices_are_flagged_and_the_viewer_marks_them(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    folder = gapped_chest(fixtures_dir, tmp_path / "gapped")
    report = prepared(folder)
    assert report.quality_flags == [QualityFlag.INTERPOLATED]
    assert report.quality is not None
    assert report.quality.missing_slices == 2
    # The volume's slices ascend along the normal, as the positions were sorted above.
    assert report.quality.interpolated_slices == list(REMOVED)
    assert any("2 missing slices" in line for line in report.warnings)
    assert not any("body-part regression" in line for line in report.warnings)

    studies = read_studies(sorted(folder.iterdir()), IntakeSummary())
    gapped_volume, _, _ = load_volume(studies[0].series[0], QualitySettings())
    full = read_studies(sorted((fixtures_dir / CHEST).iterdir()), IntakeSummary())
    full_volume, _, _ = load_volume(full[0].series[0], QualitySettings())
    assert gapped_volume.interpolated_slices == REMOVED
    assert full_volume.interpolated_slices == ()
    gapped_view, full_view = viewer_stack(gapped_volume), viewer_stack(full_volume)
    assert full_view.interpolated_slices == ()
    assert gapped_view.interpolated_axis == 0  # an axial series: the slider's axis
    # The display slices that differ from the complete series are the blended ones.
    differ = {
        index
        for index in range(gapped_view.codes.shape[0])
        if not np.array_equal(gapped_view.codes[index], full_view.codes[index])
    }
    assert differ == set(gapped_view.interpolated_slices)
    assert len(differ) == len(REMOVED)
    metadata = gapped_view.metadata("study1.bin")
    assert metadata["interpolated_slices"] == sorted(differ)
    assert metadata["interpolated_axis"] == 0


def test_gantry_tilt_and_duplicate_positions_are_flagged(fixtures_dir: Path) -> None:
    files = [p for p in (fixtures_dir / "head_ct_gantry_tilt").rglob("*") if p.is_file()]
    (tilted,) = read_studies(sorted(files), IntakeSummary())
    _, quality, warnings = load_volume(tilted.series[0], QualitySettings())
    assert QualityFlag.GANTRY_TILT in quality.flags
    assert any(line.startswith("gantry tilt") for line in warnings)

    files = [p for p in (fixtures_dir / "ct_duplicate_positions").rglob("*") if p.is_file()]
    (study,) = read_studies(sorted(files), IntakeSummary())
    volume, quality, _ = load_volume(
        study.series[0], QualitySettings(max_missing_slices_percent=100)
    )
    assert quality.flags == [QualityFlag.INTERPOLATED]
    assert len(volume.interpolated_slices) == quality.missing_slices == 179
    assert quality.interpolated_slices == list(volume.interpolated_slices)


def test_a_series_chosen_among_several_is_flagged(fixtures_dir: Path, tmp_path: Path) -> None:
    """The chest series sent twice, the second copy a series of its own (a reconstruction of
    the same acquisition, as scanners send them)."""
    folder = tmp_path / "two_series"
    shutil.copytree(fixtures_dir / CHEST, folder / "first")
    (folder / "second").mkdir()
    for path in sorted((folder / "first").iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = dataset.SeriesInstanceUID + ".2"
        dataset.SOPInstanceUID = dataset.SOPInstanceUID + ".2"
        dataset.SeriesNumber = 902
        dataset.save_as(folder / "second" / path.name)
    report = prepared(folder)
    assert report.processing_status.value == "Failure"  # no model asked in this test
    assert report.quality_flags == [QualityFlag.SERIES_CHOSEN]
    assert any("2 usable series in the study" in line for line in report.warnings)
    assert sum(decision.selected for decision in report.series_decisions) == 1
    single = prepared(fixtures_dir / CHEST)
    assert single.quality_flags == []


def test_late_images_are_flagged_by_the_adapter(fixtures_dir: Path) -> None:
    reports = [prepared(fixtures_dir / CHEST)]
    mark_late_instances(reports)
    assert reports[0].quality_flags == [QualityFlag.LATE_INSTANCES]
    assert reports[0].warnings[-1] == LATE_INSTANCES_WARNING


@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_registry_keeps_the_flags_of_a_recorded_result(
    backend: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    report = prepared(gapped_chest(fixtures_dir, tmp_path / "gapped"))
    with open_registry(backend, tmp_path) as registry:
        registry.record_submission(submission("gappy"))
        registry.record_result(result("gappy", report))
        registry.record_submission(submission("clean"))
        registry.record_result(result("clean", prepared(fixtures_dir / CHEST)))
        row = registry.study("gappy")
        assert row is not None
        assert row.quality_flags == [QualityFlag.INTERPOLATED]
        flagged = registry.list_studies(StudyFilter(quality_flags=[QualityFlag.INTERPOLATED]))
        assert [item.task_id for item in flagged.items] == ["gappy"]
