"""NIfTI intake: geometry from the affine (RAS -> LPS), scaling, NIfTI-1/2, content detection,
and the CT-RATE convention against a reference of CT-CLIP's own loader (nibabel + torch).

The chest NIfTI files are made by SimpleITK's DICOM reader and NIfTI writer (an independent
converter) and by nibabel (reoriented copies); each must give the chest series' model input.
"""

from __future__ import annotations

import gzip
import shutil
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from volume_support import load_fixture_volume

from services.core.config import Settings
from services.core.intake import FileKind, classify_file, collect_dicom_files
from services.core.nifti import load_nifti_volume, nifti_version
from services.core.nifti.ct_rate import CtRateMetadataError, read_ct_rate_metadata
from services.core.pipeline import CheckFirst, PreparationDeferred, prepare_studies
from services.core.preprocessing import PreprocessingTarget, preprocess_volume

CHEST = "chest_ct_lung_dx_a0002"
MODEL_INPUT_TOLERANCE = 1e-4  # docs/ARCHITECTURE.md, Contracts
FULL_TARGET = PreprocessingTarget()
CT_CLIP_SPACING = (1.5, 0.75, 0.75)
CT_CLIP_SHAPE_HWD = (480, 480, 240)


@pytest.fixture(scope="module")
def chest_dicom_input(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    volume = load_fixture_volume(fixtures_dir / CHEST, tmp_path_factory.mktemp("dicom"))
    return preprocess_volume(volume, FULL_TARGET)


@pytest.fixture(scope="module")
def chest_nifti(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chest series converted by SimpleITK (its own DICOM geometry and rescale)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(fixtures_dir / CHEST)))
    path = tmp_path_factory.mktemp("nifti") / "chest.nii.gz"
    sitk.WriteImage(reader.Execute(), str(path))
    return path


def _model_input(path: Path) -> np.ndarray:
    return preprocess_volume(load_nifti_volume(path, max_voxels=None).volume, FULL_TARGET)


def _max_difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def test_simpleitk_nifti_gives_the_series_model_input(
    chest_nifti: Path, chest_dicom_input: np.ndarray, tmp_path: Path
) -> None:
    loaded = load_nifti_volume(chest_nifti, max_voxels=None)
    assert loaded.geometry_source.startswith("sform")
    assert loaded.volume.shape == (30, 512, 512)
    np.testing.assert_allclose(loaded.volume.spacing_mm, (8.0, 0.646484375, 0.646484375))
    assert _max_difference(_model_input(chest_nifti), chest_dicom_input) <= MODEL_INPUT_TOLERANCE
    plain = tmp_path / "chest.nii"  # the same, uncompressed
    plain.write_bytes(gzip.decompress(chest_nifti.read_bytes()))
    assert _max_difference(_model_input(plain), chest_dicom_input) <= MODEL_INPUT_TOLERANCE


def _reoriented(image: nib.Nifti1Image, order: tuple[int, int, int], flips: tuple[int, ...]):
    """The same voxels in another array layout, the affine changed to match."""
    data = np.asarray(image.dataobj)
    affine = image.affine.copy()
    for axis in flips:
        data = np.flip(data, axis=axis)
        shift = np.eye(4)
        shift[axis, axis] = -1
        shift[axis, 3] = data.shape[axis] - 1
        affine = affine @ shift
    permutation = np.eye(4)[[*order, 3]].T  # new axis a reads old axis order[a]
    return nib.Nifti1Image(np.ascontiguousarray(data.transpose(order)), affine @ permutation)


@pytest.mark.slow  # the full-size model input, five times
@pytest.mark.parametrize(
    ("order", "flips"),
    [((0, 1, 2), (0, 1)), ((1, 0, 2), ()), ((2, 0, 1), (2,)), ((0, 2, 1), (0, 1, 2))],
    ids=["ras", "rows-columns-swapped", "slices-first", "sagittal-layout"],
)
def test_any_array_layout_gives_the_same_model_input(
    chest_nifti: Path,
    chest_dicom_input: np.ndarray,
    tmp_path: Path,
    order: tuple[int, int, int],
    flips: tuple[int, ...],
) -> None:
    image = nib.load(chest_nifti)
    path = tmp_path / "reoriented.nii.gz"
    nib.save(_reoriented(image, order, flips), path)
    assert _max_difference(_model_input(path), chest_dicom_input) <= MODEL_INPUT_TOLERANCE


def test_qform_only_and_scaled_int16_nifti2(
    chest_nifti: Path, chest_dicom_input: np.ndarray, tmp_path: Path
) -> None:
    """Values stored as 2 * (HU + 1024) with scl_slope 0.5, scl_inter -1024; no sform."""
    image = nib.load(chest_nifti)
    hu = np.asarray(image.dataobj, dtype=np.float64)
    stored = np.round((hu + 1024) * 2).astype(np.int16)
    for image_class in (nib.Nifti1Image, nib.Nifti2Image):
        scaled = image_class(stored, None)
        scaled.set_qform(image.affine, code=1)
        scaled.set_sform(None, code=0)
        scaled.header.set_slope_inter(0.5, -1024)
        path = tmp_path / f"scaled_{image_class.__name__}.nii"
        nib.save(scaled, path)
        loaded = load_nifti_volume(path, max_voxels=None)
        assert loaded.geometry_source.startswith("qform"), loaded.geometry_source
        assert _max_difference(_model_input(path), chest_dicom_input) <= MODEL_INPUT_TOLERANCE
    assert nifti_version(path.read_bytes()[:540]) == 2


def test_files_are_recognised_by_content(chest_nifti: Path, tmp_path: Path) -> None:
    """A renamed .nii.gz is a NIfTI and a renamed .tgz an archive; other gzip files are not."""
    renamed = tmp_path / "volume.bin"
    shutil.copy(chest_nifti, renamed)
    assert classify_file(renamed) is FileKind.NIFTI
    other_gzip = tmp_path / "notes.gz"
    other_gzip.write_bytes(gzip.compress(b"not an image" * 100))
    assert classify_file(other_gzip) is FileKind.OTHER
    folder = tmp_path / "input"
    folder.mkdir()
    with tarfile.open(folder / "export.dat", "w:gz") as archive:
        archive.add(chest_nifti, arcname="CT/train_7_a_1.nii.gz")
    shutil.copy(other_gzip, folder / "notes.gz")
    result = collect_dicom_files(folder, tmp_path / "work", Settings().intake)
    assert [nifti.name for nifti in result.nifti_files] == ["train_7_a_1.nii.gz"]
    assert result.nifti_files[0].label.endswith("export.dat/CT/train_7_a_1.nii.gz")
    assert result.summary.nested_archives == 1
    assert result.summary.nifti_files == 1
    assert result.summary.skipped_non_dicom == 1


# --- the CT-RATE convention -------------------------------------------------------------


def ct_clip_reference(path: Path, slope: float, intercept: float, xy: float, z: float):
    """CT-CLIP's loader as its sources describe it (docs/ARCHITECTURE.md, Contracts), written
    here with nibabel and torch: get_fdata, slope/intercept, clip, transpose(2, 0, 1), trilinear
    resize from (z, xy, xy) to (1.5, 0.75, 0.75), depth last, /1000, crop/pad with -1, depth
    first."""
    values = nib.load(path).get_fdata()
    values = np.clip(slope * values + intercept, -1000, 1000).transpose(2, 0, 1)
    tensor = torch.tensor(values)[None, None]
    spacing = (z, xy, xy)
    size = [int(n * s / t) for n, s, t in zip(values.shape, spacing, CT_CLIP_SPACING, strict=True)]
    resized = F.interpolate(tensor, size=size, mode="trilinear", align_corners=False)[0, 0]
    volume = torch.tensor((resized.numpy().transpose(1, 2, 0) / 1000).astype(np.float32))
    slices = []
    for axis, target in enumerate(CT_CLIP_SHAPE_HWD):
        n = volume.shape[axis]
        start = max((n - target) // 2, 0)
        slices.append(slice(start, min(start + target, n)))
    volume = volume[tuple(slices)]
    padding: list[int] = []
    for axis in (2, 1, 0):  # F.pad lists the last axis first
        missing = CT_CLIP_SHAPE_HWD[axis] - volume.shape[axis]
        padding += [missing // 2, missing - missing // 2]
    volume = F.pad(volume, padding, value=-1)
    return volume.permute(2, 0, 1).numpy()


def _ct_rate_file(chest_nifti: Path, folder: Path, name: str) -> Path:
    """Raw values (HU + 1024, uint16) with a meaningless affine, as CT-RATE-style files."""
    hu = np.asarray(nib.load(chest_nifti).dataobj, dtype=np.float64)
    raw = np.round(hu + 1024).astype(np.uint16)
    path = folder / name
    nib.save(nib.Nifti1Image(raw, np.diag([-3.0, 5.0, 0.1, 1.0])), path)
    return path


@pytest.mark.slow  # the full-size model input through the pipeline and through torch
def test_ct_rate_convention_equals_ct_clip_loader(chest_nifti: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = _ct_rate_file(chest_nifti, data, "train_3_a_1.nii.gz")
    csv_path = tmp_path / "train_metadata.csv"
    csv_path.write_text(
        "VolumeName,Manufacturer,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\n"
        'train_3_a_1.nii.gz,X,1.0,-1024.0,"[0.646484375, 0.646484375]",8.0\n'
    )
    reference = ct_clip_reference(path, 1.0, -1024.0, 0.646484375, 8.0)
    plain = Settings()
    settings = plain.model_copy(
        update={"intake": plain.intake.model_copy(update={"ct_rate_metadata": csv_path})}
    )
    (prepared,) = prepare_studies(path, settings=settings, target=FULL_TARGET)
    assert prepared.ready, prepared.report.failure_reason
    assert "CT-RATE metadata" in prepared.report.series_decisions[0].reason
    model_input = prepared.model_input[0, 0]
    assert model_input.shape == reference.shape == (240, 480, 480)
    assert _max_difference(model_input, reference) <= MODEL_INPUT_TOLERANCE

    # Without the CSV the same file is read through its (meaningless) affine: 0.1 mm slices,
    # 3 mm along the body, which the chest check refuses.
    (by_affine,) = prepare_studies(path, settings=plain, target=FULL_TARGET)
    assert not by_affine.ready
    assert "covers 3 mm" in (by_affine.report.failure_reason or "")


def test_ct_rate_metadata_errors_name_the_problem(tmp_path: Path) -> None:
    missing_column = tmp_path / "a.csv"
    missing_column.write_text("VolumeName,RescaleSlope,RescaleIntercept,XYSpacing\nx,1,0,[1]\n")
    with pytest.raises(CtRateMetadataError, match="ZSpacing"):
        read_ct_rate_metadata(missing_column)
    not_a_number = tmp_path / "b.csv"
    not_a_number.write_text(
        "VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\nx.nii.gz,1,0,[abc],1\n"
    )
    with pytest.raises(CtRateMetadataError, match="row 2: XYSpacing"):
        read_ct_rate_metadata(not_a_number)
    with pytest.raises(CtRateMetadataError, match="cannot be read"):
        read_ct_rate_metadata(tmp_path / "absent.csv")


def test_a_nifti_chest_checked_first_stops_before_preprocessing(chest_nifti: Path) -> None:
    """The adapter's check first (services/core/pipeline/prepare.py): a NIfTI volume is read
    whole for its chest check, then its preparation waits its turn."""
    with pytest.raises(PreparationDeferred, match="preprocessing"):
        list(
            prepare_studies(
                chest_nifti,
                settings=Settings(),
                target=FULL_TARGET,
                check_first=CheckFirst(max_checked_voxels=0),
            )
        )
