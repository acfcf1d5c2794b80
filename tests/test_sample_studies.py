"""Demo samples and write_ct_series: valid, anonymous CT series with exact geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from services.core.chest_check import check_chest
from services.core.config import (
    ChestCheckSettings,
    IntakeSettings,
    QualitySettings,
    SeriesSelectionSettings,
)
from services.core.dicom import load_volume, read_studies, select_series
from services.core.intake import IntakeError, collect_dicom_files
from services.core.schemas import IntakeSummary
from services.core.volume import Volume
from synthetic import sample_studies
from synthetic.sample_studies import write_ct_series, write_samples


def _canonical(volume: Volume) -> np.ndarray:
    """Back from a loaded volume to write_ct_series' frame (superior, posterior, left)."""
    directions = volume.axis_directions()  # row i: LPS direction of array axis i
    lps_axis = np.argmax(np.abs(directions), axis=1)  # x=0, y=1, z=2 for each array axis
    array = volume.hu
    for axis in range(3):
        if directions[axis, lps_axis[axis]] < 0:
            array = np.flip(array, axis=axis)
    # canonical axis 0 <- z, 1 <- y, 2 <- x
    order = [int(np.where(lps_axis == target)[0][0]) for target in (2, 1, 0)]
    return np.transpose(array, order)


def _load(paths: list[Path]) -> Volume:
    (study,) = read_studies(sorted(paths), IntakeSummary())
    volume, _, warnings = load_volume(study.series[0], QualitySettings())
    assert warnings == []
    return volume


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_write_ct_series_geometry_round_trip(position: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 2000, size=(21, 14, 9)).astype(np.float32)
    spacing = (2.5, 0.7, 0.9)
    paths = write_ct_series(hu, tmp_path, spacing=spacing, patient_position=position)
    volume = _load(paths)
    assert np.array_equal(_canonical(volume), hu)
    # The same body in patient coordinates whatever the position: canonical voxel (0, 0, 0)
    # is the most right, anterior, inferior corner, at the same LPS point.
    corner = volume.origin_mm.copy()
    for axis, length in enumerate(volume.hu.shape):
        direction = volume.axis_directions()[axis]
        if direction.sum() < 0:
            corner += direction * volume.spacing_mm[axis] * (length - 1)
    assert corner == pytest.approx([-(9 - 1) / 2 * 0.9, -(14 - 1) / 2 * 0.7, -400.0])
    header = pydicom.dcmread(paths[0])
    assert header.PatientPosition == position


def test_explicit_orientation_and_validation(tmp_path: Path) -> None:
    hu = np.zeros((4, 5, 6), dtype=np.float32)
    sagittal = write_ct_series(
        hu, tmp_path / "sag", spacing=(1, 1, 1), orientation=(0, 1, 0, 0, 0, -1)
    )
    header = pydicom.dcmread(sagittal[0])
    assert (int(header.Rows), int(header.Columns)) == (4, 5)  # rows run along z, columns along y
    assert len(sagittal) == 6  # one image per left-right position
    with pytest.raises(ValueError, match="along the patient axes"):
        write_ct_series(
            hu, tmp_path / "oblique", spacing=(1, 1, 1), orientation=(1, 0, 0, 0, 0.8, -0.6)
        )
    with pytest.raises(ValueError, match="unknown patient position"):
        write_ct_series(hu, tmp_path / "x", spacing=(1, 1, 1), patient_position="SITTING")


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("samples")
    paths = write_samples(out, size=128, slice_mm=4.0)
    # The scratch folder is removed: only the zips remain.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    return {p.stem: p for p in paths}


def test_samples_are_the_four_demo_inputs(samples: dict[str, Path]) -> None:
    assert set(samples) == {
        "chest_phantom_hfs",
        "chest_phantom_ffp",
        "head_phantom",
        "broken_truncated",
    }


def _run(zip_path: Path, work: Path):
    result = collect_dicom_files(zip_path, work, IntakeSettings())
    (study,) = read_studies(result.dicom_files, result.summary)
    selection = select_series(study, SeriesSelectionSettings())
    assert selection.selected is not None, selection.failure_reason
    volume, report, warnings = load_volume(selection.selected, QualitySettings())
    evidence = check_chest(study, selection.selected, volume, ChestCheckSettings())
    return result, study, volume, report, warnings, evidence


def test_chest_samples_pass_every_check_and_match(samples: dict[str, Path], tmp_path: Path) -> None:
    hfs = _run(samples["chest_phantom_hfs"], tmp_path / "a")
    ffp = _run(samples["chest_phantom_ffp"], tmp_path / "b")
    for result, _study, volume, report, warnings, evidence in (hfs, ffp):
        assert result.summary.dicom_files == 75
        assert warnings == []
        assert report.coverage_mm == pytest.approx(300.0)
        assert evidence.is_chest
        assert evidence.metadata_verdict
        assert evidence.image_verdict
        lungs = volume.hu[(volume.hu > -900) & (volume.hu < -800)]
        assert lungs.size > 0.05 * volume.hu.size
    assert hfs[1].study_uid != ffp[1].study_uid
    assert ffp[3].patient_position == "FFP"
    assert np.array_equal(_canonical(hfs[2]), _canonical(ffp[2]))
    assert not np.array_equal(hfs[2].hu, ffp[2].hu)  # stored differently, same anatomy


def test_head_sample_is_not_a_chest(samples: dict[str, Path], tmp_path: Path) -> None:
    *_, evidence = _run(samples["head_phantom"], tmp_path)
    assert not evidence.is_chest
    assert evidence.metadata_verdict is False
    assert evidence.image_verdict is False


def test_broken_sample_fails_intake(samples: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(IntakeError, match="not a readable zip archive"):
        collect_dicom_files(samples["broken_truncated"], tmp_path, IntakeSettings())


def test_samples_are_anonymous_ct_image_storage(samples: dict[str, Path], tmp_path: Path) -> None:
    result = collect_dicom_files(samples["head_phantom"], tmp_path, IntakeSettings())
    for path in result.dicom_files[:5]:
        assert path.read_bytes()[128:132] == b"DICM"
        dataset = pydicom.dcmread(path)
        assert dataset.SOPClassUID == pydicom.uid.CTImageStorage
        assert dataset.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert str(dataset.PatientName) == "Anonymous"
        assert dataset.PatientID == ""
        assert dataset.PatientBirthDate == ""
        assert pydicom.uid.UID(dataset.SOPInstanceUID).is_valid


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sample_studies.main([str(tmp_path / "out"), "--size", "64", "--slice-mm", "6"]) == 0
    printed = capsys.readouterr().out
    for name in (
        "chest_phantom_hfs.zip",
        "chest_phantom_ffp.zip",
        "head_phantom.zip",
        "broken_truncated.zip",
    ):
        assert (tmp_path / "out" / name).is_file()
        assert name in printed
