"""Slice geometry, HU conversion and data-quality findings of load_volume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from services.core.config import QualitySettings
from services.core.dicom import Series, geometry, load_volume, read_studies
from services.core.errors import SeriesDataError
from services.core.schemas import IntakeSummary
from synthetic.sample_studies import write_ct_series

QUALITY = QualitySettings()


def _series_of(files: list[Path]) -> Series:
    studies = read_studies(sorted(files), IntakeSummary())
    assert len(studies) == 1
    assert len(studies[0].series) == 1
    return studies[0].series[0]


def _fixture_series(fixtures_dir: Path, name: str) -> Series:
    return _series_of([p for p in (fixtures_dir / name).rglob("*") if p.is_file()])


# --- pure geometry ------------------------------------------------------------------------


def test_slice_normal_is_row_cross_column() -> None:
    assert np.allclose(geometry.slice_normal([1, 0, 0, 0, 1, 0]), [0, 0, 1])
    assert np.allclose(geometry.slice_normal([-1, 0, 0, 0, 1, 0]), [0, 0, -1])
    tilted = geometry.slice_normal([1, 0, 0, 0, math.cos(0.3), -math.sin(0.3)])
    assert np.allclose(tilted, [0, math.sin(0.3), math.cos(0.3)])


def test_nominal_spacing() -> None:
    regular = np.full(20, 1.25)
    assert geometry.nominal_spacing(regular) == pytest.approx(1.25)
    with_gap = np.array([2.5] * 10 + [5.0, 7.5] + [2.5] * 10)
    assert geometry.nominal_spacing(with_gap) == pytest.approx(2.5)
    # A sparse subset whose median is itself a multiple: the header thickness explains it.
    sparse = np.array([47.5, 32.5, 115.0, 7.5, 107.5, 12.5, 17.5, 17.5, 112.5])
    assert geometry.nominal_spacing(sparse, hints_mm=[None, 2.5]) == pytest.approx(2.5)
    # Nothing explains uneven gaps: the median stands.
    uneven = np.array([4.0] * 13 + [1.08] + [7.0] * 13)
    assert geometry.nominal_spacing(uneven, hints_mm=[None, 4.0]) == pytest.approx(4.0)


def test_count_missing_and_uneven() -> None:
    gaps = np.array([2.5, 2.5, 5.0, 2.5, 10.0, 2.6, 3.4])
    missing, uneven = geometry.count_missing_and_uneven(gaps, 2.5, 0.1)
    assert missing == 1 + 3  # a 5 mm gap hides one slice, a 10 mm gap three
    assert uneven == 1  # 3.4 mm is 1.36 spacings: neither one nor two


def test_sort_and_deduplicate_keeps_the_first_by_tie_breaker() -> None:
    positions = np.array([10.0, 0.0, 5.0, 5.0, 5.004])
    keys = [(5,), (1,), (9,), (3,), (4,)]
    order, duplicates = geometry.sort_and_deduplicate(positions, keys)
    assert duplicates == 2
    assert order.tolist() == [1, 3, 0]  # at 5 mm the image with key (3,) is kept


def test_stacking_tilt() -> None:
    normal = np.array([0.0, 0.0, 1.0])
    assert geometry.stacking_tilt_degrees(np.zeros(3), np.array([0, 0, 100.0]), normal) == 0.0
    tilt = geometry.stacking_tilt_degrees(
        np.zeros(3), np.array([0, 100 * math.tan(math.radians(20)), 100.0]), normal
    )
    assert tilt == pytest.approx(20.0)


def test_regular_grid_plan() -> None:
    positions = np.array([0.0, 2.0, 6.0, 8.0])  # one slice missing at 4 mm
    sources, weights = geometry.regular_grid(positions, 2.0)
    assert sources.tolist() == [0, 1, 1, 2, 3]
    assert weights.tolist() == [0.0, 0.0, 0.5, 0.0, 0.0]


# --- real fixtures ------------------------------------------------------------------------


def test_chest_fixture_volume(fixtures_dir: Path) -> None:
    series = _fixture_series(fixtures_dir, "chest_ct_lung_dx_a0002")
    volume, report, warnings = load_volume(series, QUALITY)
    assert warnings == []
    assert volume.hu.dtype == np.float32
    assert volume.shape == (30, 512, 512)
    assert volume.spacing_mm == pytest.approx((8.0, 0.646484375, 0.646484375))
    assert np.allclose(volume.slice_normal, [0, 0, 1])
    assert np.allclose(volume.row_cosine, [1, 0, 0])
    assert np.allclose(volume.column_cosine, [0, 1, 0])
    # Sorted along the normal (inferior first), not by InstanceNumber (1-01 is the top).
    assert volume.origin_mm == pytest.approx([-173.1767578125, -294.1767578125, 80.0])
    folder = fixtures_dir / "chest_ct_lung_dx_a0002"
    for index, name in ((0, "1-30.dcm"), (29, "1-01.dcm"), (12, "1-18.dcm")):
        dataset = pydicom.dcmread(folder / name)
        expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(
            dataset.RescaleIntercept
        )
        assert np.array_equal(volume.hu[index], expected.astype(np.float32))
    assert report.n_slices == 30
    assert report.expected_slices == 30
    assert report.coverage_mm == pytest.approx(240.0)
    assert report.slice_spacing_mm == pytest.approx(8.0)
    assert report.convolution_kernel == "B40f"
    assert report.patient_position == "HFS"
    assert report.uneven_spacing is False
    assert report.gantry_tilt_degrees == 0.0


def test_jpeg2000_fixture_decodes(fixtures_dir: Path) -> None:
    series = _fixture_series(fixtures_dir, "abdomen_ct_jpeg2000")
    volume, report, warnings = load_volume(series, QUALITY)
    assert volume.shape == (20, 512, 512)
    assert report.transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)"
    # Positions run from -766.5 (instance 267) down to -804.5 (instance 286) in 2 mm steps.
    assert volume.origin_mm[2] == pytest.approx(-804.5)
    assert volume.spacing_mm[0] == pytest.approx(2.0)
    lowest = next(p for p in series.instances if float(p.header.ImagePositionPatient[2]) == -804.5)
    dataset = pydicom.dcmread(lowest.path)
    assert np.array_equal(volume.hu[0], (dataset.pixel_array - 1024.0).astype(np.float32))
    assert float(volume.hu.min()) >= -1024.0
    assert float(volume.hu.max()) > 500.0
    assert any("SeriesInstanceUID" in w for w in warnings)


def test_head_fixture_gantry_tilt_and_uneven_spacing(fixtures_dir: Path) -> None:
    series = _fixture_series(fixtures_dir, "head_ct_gantry_tilt")
    volume, report, warnings = load_volume(series, QUALITY)
    assert report.gantry_tilt_degrees == pytest.approx(18.5, abs=0.05)
    tilt_warning = next(w for w in warnings if w.startswith("gantry tilt"))
    assert "18.5 degrees" in tilt_warning
    assert "+18.5" in tilt_warning
    assert report.uneven_spacing
    assert report.spacing_min_mm == pytest.approx(1.08, abs=0.01)
    assert report.spacing_max_mm == pytest.approx(7.0, abs=0.01)
    uneven = next(w for w in warnings if w.startswith("uneven slice spacing"))
    assert "1.08-7.00 mm" in uneven
    assert "4.00 mm grid" in uneven
    # Spacing along the normal is the slice thickness (4 mm), not the 4.22 mm table step.
    assert volume.spacing_mm[0] == pytest.approx(4.0, abs=0.01)
    assert volume.shape == (37, 512, 512)
    # A stricter limit turns the tilt into a failure.
    with pytest.raises(SeriesDataError, match=r"gantry tilt 18.5 degrees exceeds the 10 degrees"):
        load_volume(series, QualitySettings(max_gantry_tilt_degrees=10))


def test_duplicate_positions_fixture(fixtures_dir: Path) -> None:
    series = _fixture_series(fixtures_dir, "ct_duplicate_positions")
    # Ten distinct positions of a 2.5 mm series spread over 470 mm: most slices are missing.
    with pytest.raises(
        SeriesDataError, match=r"179 of 189 slice positions are missing \(94.7%"
    ) as caught:
        load_volume(series, QUALITY)
    assert any("1 duplicate slice positions" in w for w in caught.value.warnings)
    volume, report, warnings = load_volume(series, QualitySettings(max_missing_slices_percent=100))
    assert report.duplicate_positions == 1
    assert (
        "1 duplicate slice positions: kept one image per position (10 of 11 images used)"
        in warnings
    )
    assert report.missing_slices == 179
    assert report.expected_slices == 189
    assert volume.shape == (189, 512, 512)


def test_undecodable_pixel_data(fixtures_dir: Path, tmp_path: Path) -> None:
    for path in (fixtures_dir / "abdomen_ct_jpeg2000").iterdir():
        shutil.copy(path, tmp_path / path.name)
    victim = sorted(tmp_path.iterdir())[5]
    data = bytearray(victim.read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # JPEG 2000 start of code stream + image size
    assert start > 0
    data[start : start + 64] = bytes(64)  # the decoder no longer finds a code stream
    victim.write_bytes(bytes(data))
    series = _series_of(list(tmp_path.iterdir()))
    with pytest.raises(
        SeriesDataError, match=r"cannot decode the pixel data of .*\(JPEG 2000 Image Compression"
    ):
        load_volume(series, QUALITY)


# --- generated series ---------------------------------------------------------------------


def _write(
    tmp_path: Path, n: int = 40, shape: tuple[int, int] = (12, 10), **kwargs
) -> tuple[np.ndarray, list[Path]]:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(n, *shape)).astype(np.float32)
    paths = write_ct_series(hu, tmp_path / "series", spacing=(2.0, 0.8, 0.8), **kwargs)
    return hu, paths


def _edit(path: Path, **tags) -> None:
    dataset = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    dataset.save_as(path)


def test_order_ignores_instance_numbers(tmp_path: Path) -> None:
    hu, paths = _write(tmp_path)
    rng = np.random.default_rng(5)
    for path, number in zip(paths, rng.permutation(len(paths)) + 1, strict=True):
        _edit(path, InstanceNumber=int(number))
    volume, report, warnings = load_volume(_series_of(paths), QUALITY)
    assert warnings == []
    assert np.array_equal(volume.hu, hu)
    assert report.expected_slices == 40


def test_missing_slices_are_interpolated(tmp_path: Path) -> None:
    hu, paths = _write(tmp_path)
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    by_z[10].unlink()
    by_z[25].unlink()
    kept = [p for p in paths if p.exists()]
    volume, report, warnings = load_volume(_series_of(kept), QUALITY)
    assert report.missing_slices == 2
    assert report.expected_slices == 40
    assert report.missing_slices_percent == pytest.approx(5.0)
    assert "2 missing slices (5.0% of 40 expected positions at 2.00 mm)" in warnings[0]
    assert volume.shape == hu.shape
    assert np.allclose(volume.hu[10], (hu[9] + hu[11]) / 2)
    untouched = [k for k in range(40) if k not in (10, 25)]
    assert np.array_equal(volume.hu[untouched], hu[untouched])


def test_too_many_missing_slices_fail(tmp_path: Path) -> None:
    _, paths = _write(tmp_path)
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for path in by_z[5:15]:  # ten of forty
        path.unlink()
    kept = [p for p in paths if p.exists()]
    with pytest.raises(
        SeriesDataError, match=r"10 of 40 slice positions are missing \(25.0% > 20%"
    ):
        load_volume(_series_of(kept), QUALITY)


def test_uneven_spacing_is_resampled(tmp_path: Path) -> None:
    hu, paths = _write(tmp_path, n=30)
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    # Push every slice above index 14 up by 1 mm: one 3 mm gap in a 2 mm series.
    for path in by_z[15:]:
        dataset = pydicom.dcmread(path)
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        _edit(path, ImagePositionPatient=[x, y, z + 1.0])
    volume, report, warnings = load_volume(_series_of(paths), QUALITY)
    assert report.uneven_spacing
    assert any(
        w.startswith("uneven slice spacing: 1 gaps off the nominal 2.00 mm") for w in warnings
    )
    # Grid from the first to the last position (59 mm) at 2 mm: 30 slices; the one at 30 mm
    # lies between the slices at 28 and 31 mm.
    assert volume.shape[0] == 30
    assert np.allclose(volume.hu[15], hu[14] + (2.0 / 3.0) * (hu[15] - hu[14]), atol=1e-3)


def test_missing_rescale_tags_warn(tmp_path: Path) -> None:
    _, paths = _write(tmp_path, n=20)
    for path in paths[:3]:
        _edit(path, RescaleSlope=None, RescaleIntercept=None)
    volume, _, warnings = load_volume(_series_of(paths), QUALITY)
    assert any(
        w.startswith("RescaleSlope/RescaleIntercept missing or invalid on 3 of 20 images")
        for w in warnings
    )
    # Slope 1, intercept 0 on those slices: their values stay stored values (HU + 1024).
    assert volume.hu.shape == (20, 12, 10)


def test_duplicate_file_is_dropped_with_a_warning(tmp_path: Path) -> None:
    hu, paths = _write(tmp_path, n=20)
    copy = paths[0].with_name("copy.dcm")
    shutil.copy(paths[0], copy)
    _edit(copy, SOPInstanceUID=pydicom.uid.generate_uid(), InstanceNumber=999)
    volume, report, warnings = load_volume(_series_of([*paths, copy]), QUALITY)
    assert report.duplicate_positions == 1
    assert (
        "1 duplicate slice positions: kept one image per position (20 of 21 images used)"
        in warnings
    )
    assert np.array_equal(volume.hu, hu)


def test_mixed_orientations_fail(tmp_path: Path) -> None:
    _, paths = _write(tmp_path, n=20)
    _edit(paths[3], ImageOrientationPatient=[1, 0, 0, 0, 0.8, -0.6])
    with pytest.raises(SeriesDataError, match="mixed orientations in one series: 1 of 20"):
        load_volume(_series_of(paths), QUALITY)


def test_mixed_sizes_fail(tmp_path: Path) -> None:
    _, paths = _write(tmp_path, n=20)
    dataset = pydicom.dcmread(paths[4])
    dataset.Rows = 6
    dataset.PixelData = dataset.PixelData[: 6 * 10 * 2]
    dataset.save_as(paths[4])
    with pytest.raises(SeriesDataError, match="mixed image sizes in one series: 6x10, 12x10"):
        load_volume(_series_of(paths), QUALITY)


@pytest.mark.parametrize(("degrees", "fails"), [(12.0, False), (40.0, True)])
def test_tilted_stacking(tmp_path: Path, degrees: float, fails: bool) -> None:
    _, paths = _write(tmp_path, n=20)
    shift = math.tan(math.radians(degrees))
    for path in paths:
        dataset = pydicom.dcmread(path)
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        _edit(path, ImagePositionPatient=[x, y + z * shift, z])
    series = _series_of(paths)
    if fails:
        with pytest.raises(SeriesDataError, match=r"gantry tilt 40.0 degrees exceeds the 25"):
            load_volume(series, QUALITY)
    else:
        _, report, warnings = load_volume(series, QUALITY)
        assert report.gantry_tilt_degrees == pytest.approx(12.0, abs=0.01)
        assert any("stack at 12.0 degrees" in w for w in warnings)


def test_missing_geometry_tags_fail(tmp_path: Path) -> None:
    _, paths = _write(tmp_path, n=20)
    _edit(paths[2], PixelSpacing=None)
    with pytest.raises(SeriesDataError, match="1 of 20 images lack PixelSpacing"):
        load_volume(_series_of(paths), QUALITY)


def _garble(path: Path, keyword: str) -> None:
    """Overwrite the stored value of a DS tag with letters, as a broken writer might."""
    dataset = pydicom.dcmread(path)
    tag = dataset.data_element(keyword).tag
    data = path.read_bytes()
    marker = tag.group.to_bytes(2, "little") + tag.element.to_bytes(2, "little") + b"DS"
    start = data.index(marker)
    length = int.from_bytes(data[start + 6 : start + 8], "little")
    path.write_bytes(data[: start + 8] + b"z" * length + data[start + 8 + length :])


@pytest.mark.parametrize(
    ("keyword", "message"),
    [
        ("PixelSpacing", "invalid PixelSpacing"),
        ("ImagePositionPatient", "invalid ImagePositionPatient/ImageOrientationPatient in"),
        ("ImageOrientationPatient", "invalid ImagePositionPatient/ImageOrientationPatient in"),
    ],
)
def test_malformed_numbers_fail_with_a_reason(tmp_path: Path, keyword: str, message: str) -> None:
    _, paths = _write(tmp_path, n=20)
    _garble(paths[7], keyword)
    with pytest.raises(SeriesDataError, match=message):
        load_volume(_series_of(paths), QUALITY)


def test_malformed_rescale_and_thickness_are_tolerated(tmp_path: Path) -> None:
    _, paths = _write(tmp_path, n=20)
    _garble(paths[3], "RescaleSlope")
    for path in paths:
        _garble(path, "SliceThickness")
    series = _series_of(paths)
    assert series.slice_thickness is None
    assert series.effective_thickness() == pytest.approx(2.0)  # from the positions
    _, _, warnings = load_volume(series, QUALITY)
    assert any("missing or invalid on 1 of 20 images" in w for w in warnings)


# --- one definition each: orientation grouping, localizers --------------------------------


def test_orientation_grouping_is_one_rule_for_selection_and_volume(tmp_path: Path) -> None:
    """Series.orientation() (selection) and load_volume agree on the series' orientation.

    Five images share orientation A; fifteen share B up to jitter below the tolerance, in
    five values that differ at the 4th decimal (three images each). Grouping at 4 decimals
    (as selection once did) found A the most common (5 > 3) and disagreed with the
    volume's grouping at 3 decimals (B, 15 images).
    """
    a = np.array([1.0, 0.0, 0.0, 0.0, 0.99, -0.141])
    b = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    rows = [a] * 5 + [b + np.array([0, 0, 0, 0, 0, 1e-4 * (i % 5)]) for i in range(15)]
    chosen = geometry.most_common_orientation(np.stack(rows))
    assert np.allclose(chosen, b, atol=geometry.ORIENTATION_TOLERANCE)

    _, paths = _write(tmp_path, n=20)
    for path, row in zip(paths, rows, strict=True):
        _edit(path, ImageOrientationPatient=[float(v) for v in row])
    series = _series_of(paths)
    assert np.allclose(series.orientation(), b, atol=geometry.ORIENTATION_TOLERANCE)
    with pytest.raises(SeriesDataError, match="mixed orientations in one series: 5 of 20"):
        load_volume(series, QUALITY)  # A is the odd one out for the volume too


@pytest.mark.parametrize(
    "localizer_type", ["LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"]
)
def test_every_localizer_image_type_is_one_definition(tmp_path: Path, localizer_type: str) -> None:
    """Selection rejects a localizer and the header-only duplicate check skips it, for every
    vendor's ImageType (the duplicate check once knew three of the five)."""
    from services.core.config import SeriesSelectionSettings
    from services.core.dicom import select_series
    from services.core.dicom.volume_builder import header_duplicate_notes

    _, paths = _write(tmp_path, n=20)
    for path in paths:
        _edit(path, ImageType=["ORIGINAL", "PRIMARY", localizer_type])
    _edit(paths[1], ImagePositionPatient=pydicom.dcmread(paths[0]).ImagePositionPatient)
    (study,) = read_studies(sorted(paths), IntakeSummary())
    assert study.series[0].is_localizer
    selection = select_series(study, SeriesSelectionSettings())
    assert selection.selected is None
    assert "localizer" in (selection.failure_reason or "")
    assert header_duplicate_notes(study) == []
