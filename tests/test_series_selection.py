"""Studies, series and the choice of the series to analyse, on real and generated DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from services.core.config import IntakeSettings, SeriesSelectionSettings
from services.core.dicom import Series, kernel_kind, read_studies, select_series
from services.core.intake import collect_dicom_files
from services.core.schemas import IntakeSummary
from synthetic.sample_studies import write_ct_series

SETTINGS = SeriesSelectionSettings()


def _study_of(folder: Path, tmp_path: Path):
    result = collect_dicom_files(folder, tmp_path / "work", IntakeSettings())
    studies = read_studies(result.dicom_files, result.summary)
    assert len(studies) == 1
    return studies[0], result.summary


# --- real fixtures ------------------------------------------------------------------------


def test_chest_fixture_selects_its_only_series(fixtures_dir: Path, tmp_path: Path) -> None:
    study, _ = _study_of(fixtures_dir / "chest_ct_lung_dx_a0002", tmp_path)
    selection = select_series(study, SETTINGS)
    assert selection.failure_reason is None
    assert selection.selected is not None
    assert selection.selected.series_number == 3
    assert selection.selected.n_images == 30
    (decision,) = selection.decisions
    assert decision.selected
    # 8 mm is outside the preferred range, but it is the only CT volume in the study.
    assert "8 mm" in decision.reason
    assert "best available" in decision.reason
    assert "B40f" in decision.reason


def test_mr_study_has_no_ct_series(fixtures_dir: Path, tmp_path: Path) -> None:
    study, _ = _study_of(fixtures_dir / "mr_brain_t1", tmp_path)
    selection = select_series(study, SETTINGS)
    assert selection.selected is None
    assert selection.failure_reason == "no CT series: modality MR"
    assert selection.decisions[0].reason == "modality MR, not CT"


def test_scout_and_dose_screens_have_no_usable_series(fixtures_dir: Path, tmp_path: Path) -> None:
    study, _ = _study_of(fixtures_dir / "ct_scout_and_dose_screens", tmp_path)
    selection = select_series(study, SETTINGS)
    assert selection.selected is None
    assert (
        selection.failure_reason == "no usable CT series: only a localizer and dose report screens"
    )
    reasons = {d.series_number: d.reason for d in selection.decisions}
    assert reasons[100].startswith("localizer (scout) image")
    assert reasons[401].startswith("dose report screens (Secondary Capture Image Storage")
    assert {d.n_images for d in selection.decisions} == {1, 6}


def test_duplicate_positions_series_has_too_few_images(fixtures_dir: Path, tmp_path: Path) -> None:
    study, _ = _study_of(fixtures_dir / "ct_duplicate_positions", tmp_path)
    selection = select_series(study, SETTINGS)
    assert selection.selected is None
    assert selection.failure_reason == "series has 11 images, fewer than the 20 required"


def test_files_without_uids_still_group_into_one_series(fixtures_dir: Path, tmp_path: Path) -> None:
    # The abdomen fixture's anonymiser blanked StudyInstanceUID, SeriesInstanceUID and SOPClassUID.
    study, summary = _study_of(fixtures_dir / "abdomen_ct_jpeg2000", tmp_path)
    assert study.study_uid_missing
    assert study.study_uid.startswith("2.25.")
    (series,) = study.series
    assert series.series_uid_missing
    assert series.series_uid.startswith("2.25.")
    assert series.n_images == 20
    # The SOP class comes from the file meta when the data set's own tag is empty.
    assert series.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert any("without SeriesInstanceUID" in problem for problem in summary.problems)
    selection = select_series(study, SETTINGS)
    assert selection.selected is series
    # Reading the same files again derives the same identifiers.
    again, _ = _study_of(fixtures_dir / "abdomen_ct_jpeg2000", tmp_path / "again")
    assert again.study_uid == study.study_uid
    assert again.series[0].series_uid == series.series_uid


def test_one_study_per_study_instance_uid(fixtures_dir: Path) -> None:
    files = sorted((fixtures_dir / "chest_ct_lung_dx_a0002").glob("*.dcm"))
    files += sorted((fixtures_dir / "mr_brain_t1").glob("*.dcm"))
    summary = IntakeSummary()
    studies = read_studies(files, summary)
    assert len(studies) == 2
    uids = {
        pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in (files[0], files[-1])
    }
    assert {study.study_uid for study in studies} == uids
    assert sorted(study.n_images for study in studies) == [24, 30]


def test_unreadable_and_non_image_files_are_counted(fixtures_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    good = sorted((fixtures_dir / "chest_ct_lung_dx_a0002").glob("*.dcm"))[0]
    broken.write_bytes(good.read_bytes()[:400])  # preamble and a few tags, then nothing
    report = pydicom.Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR: no pixels
    report.Modality = "SR"
    report_path = tmp_path / "report.dcm"
    pydicom.dcmwrite(report_path, report, implicit_vr=True, little_endian=True)
    summary = IntakeSummary()
    studies = read_studies([good, broken, report_path], summary)
    assert sum(study.n_images for study in studies) == 1
    assert summary.unreadable_dicom == 1
    assert summary.skipped_non_dicom == 1
    assert any("non-image DICOM object" in p for p in summary.problems)
    assert any("1 unreadable DICOM files (broken.dcm)" in p for p in summary.problems)


# --- generated multi-series study ---------------------------------------------------------

STUDY_UID = "2.25.1234567890123456789"


def _series(
    root: Path,
    name: str,
    *,
    n: int = 24,
    slice_mm: float = 1.0,
    kernel: str = "B30f",
    description: str | None = None,
    number: int,
    orientation=None,
    edit=None,
) -> None:
    rng = np.random.default_rng(number)
    shape = (n, 16, 16) if orientation is None else (16, n, 16)  # coronal stacks along y
    hu = rng.integers(-1000, 500, size=shape).astype(np.float32)
    paths = write_ct_series(
        hu,
        root / name,
        spacing=(slice_mm, 1.0, 1.0) if orientation is None else (1.0, slice_mm, 1.0),
        orientation=orientation,
        study_uid=STUDY_UID,
        series_uid=f"2.25.{number}000",
        series_description=description or name,
        kernel=kernel,
        series_number=number,
        seed_text=name,
    )
    if edit is not None:
        for path in paths:
            dataset = pydicom.dcmread(path)
            edit(dataset)
            dataset.save_as(path)


def _localizer(dataset: pydicom.Dataset) -> None:
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


def _secondary(dataset: pydicom.Dataset) -> None:
    dataset.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]


@pytest.fixture(scope="module")
def mixed_study(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mixed")
    _series(root, "lung thin", kernel="B70f", number=3)
    _series(root, "soft thin", kernel="B30f", number=4)
    _series(root, "soft 5mm", slice_mm=5.0, kernel="B40f", number=5)
    _series(root, "bone thinnest", slice_mm=0.6, kernel="BONE", number=6)
    _series(root, "thick 10mm", slice_mm=10.0, kernel="B40f", number=7)
    _series(root, "too short", n=12, number=8)
    _series(root, "coronal MPR", number=9, orientation=(1, 0, 0, 0, 0, -1))
    _series(root, "scout", n=1, number=1, edit=_localizer)
    _series(root, "MIP", number=10, edit=_secondary)
    files = sorted(root.rglob("*.dcm"))
    studies = read_studies(files, IntakeSummary())
    assert len(studies) == 1
    return studies[0]


def test_selection_rules_and_reasons(mixed_study) -> None:
    selection = select_series(mixed_study, SETTINGS)
    assert selection.failure_reason is None
    assert selection.selected is not None
    # 1 mm lung and 1 mm soft tissue tie on every rule; the lower series number wins.
    assert selection.selected.series_number == 3
    reasons = {d.series_number: d.reason for d in selection.decisions}
    assert len(reasons) == 9
    assert reasons[3].startswith("selected: axial CT, 24 images, 1 mm slices")
    assert "lung" in reasons[3]
    assert (
        reasons[4] == "usable, equivalent to series 3 'lung thin' (lower series number preferred)"
    )
    assert reasons[5] == "usable, but series 3 'lung thin' has thinner slices (1 mm vs 5 mm)"
    assert reasons[6].startswith("usable, but bone reconstructions are de-preferred")
    assert "has slices within 0.5-5 mm and this one has 10 mm" in reasons[7]
    assert reasons[8] == "series has 12 images, fewer than the 20 required"
    assert reasons[9].startswith("not axial (coronal-like): |slice normal . z| = 0.00")
    assert reasons[1].startswith("localizer (scout) image")
    assert reasons[10].startswith("derived or secondary-capture images")
    assert sum(d.selected for d in selection.decisions) == 1


def test_failure_lists_every_reason_when_nothing_qualifies(mixed_study) -> None:
    strict = SeriesSelectionSettings(min_slices=100)
    selection = select_series(mixed_study, strict)
    assert selection.selected is None
    assert selection.failure_reason.startswith("no usable CT series (")
    assert "series 3 'lung thin': series has 24 images, fewer than the 100 required" in (
        selection.failure_reason
    )
    assert "coronal" in selection.failure_reason


def test_thickness_outside_range_is_only_a_preference(tmp_path: Path) -> None:
    _series(tmp_path, "thick only", slice_mm=10.0, number=2)
    (study,) = read_studies(sorted(tmp_path.rglob("*.dcm")), IntakeSummary())
    selection = select_series(study, SETTINGS)
    assert selection.selected is not None
    assert "outside the preferred 0.5-5 mm" in selection.decisions[0].reason


def _bare_series(kernel: str, description: str = "") -> Series:
    return Series(
        series_uid="1",
        study_uid="1",
        modality="CT",
        description=description,
        series_number=1,
        instances=[],
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        body_part_examined="CHEST",
        convolution_kernel=kernel,
        slice_thickness=1.0,
    )


@pytest.mark.parametrize(
    ("kernel", "description", "kind"),
    [
        ("B70f", "", "lung"),
        ("B40f", "", "soft tissue"),
        ("Br38f\\3", "", "soft tissue"),
        ("Bl57d\\3", "", "lung"),
        ("I70f\\3", "", "lung"),
        ("STANDARD", "", "soft tissue"),
        ("LUNG", "", "lung"),
        ("BONEPLUS", "", "bone"),
        ("FC51", "", "lung"),
        ("FC13", "", "soft tissue"),
        ("", "Лёгкие 1.0", "lung"),
        ("", "Chest 5mm soft", "soft tissue"),
        ("YB", "", "unknown"),
    ],
)
def test_kernel_kind(kernel: str, description: str, kind: str) -> None:
    assert kernel_kind(_bare_series(kernel, description)) == kind


def test_truncated_pixel_data_is_unreadable(fixtures_dir: Path, tmp_path: Path) -> None:
    good = sorted((fixtures_dir / "chest_ct_lung_dx_a0002").glob("*.dcm"))
    data = good[1].read_bytes()
    header_only = tmp_path / "header_only.dcm"
    header_only.write_bytes(data[:3000])  # every header tag, no pixel data
    cut_pixels = tmp_path / "cut_pixels.dcm"
    cut_pixels.write_bytes(data[: len(data) - 100_000])
    summary = IntakeSummary()
    studies = read_studies([good[0], header_only, cut_pixels], summary)
    assert sum(study.n_images for study in studies) == 1
    assert summary.unreadable_dicom == 2


def test_low_dose_chest_is_not_a_dose_report(tmp_path: Path) -> None:
    _series(tmp_path, "LOW DOSE CHEST 1.0 B50f", kernel="B50f", number=2)
    _series(tmp_path, "Dose Report", n=1, number=999, edit=_secondary)
    (study,) = read_studies(sorted(tmp_path.rglob("*.dcm")), IntakeSummary())
    selection = select_series(study, SETTINGS)
    assert selection.selected is not None
    assert selection.selected.description == "LOW DOSE CHEST 1.0 B50f"
    reasons = {d.series_number: d.reason for d in selection.decisions}
    assert reasons[999].startswith("dose report screens")
