"""load_volume's direct read of uncompressed pixel data against pydicom's pixel_array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from services.core.config import QualitySettings
from services.core.dicom import load_volume, read_studies
from services.core.dicom.pixel_data import read_native_pixels
from services.core.schemas import IntakeSummary
from synthetic.sample_studies import write_ct_series


def _instances(folder: Path) -> list:
    studies = read_studies(sorted(p for p in folder.rglob("*") if p.is_file()), IntakeSummary())
    return [inst for study in studies for series in study.series for inst in series.instances]


def _direct(instance) -> np.ndarray | None:
    return read_native_pixels(instance, int(instance.header.Rows), int(instance.header.Columns))


def test_direct_read_equals_pydicom_on_every_real_fixture(fixtures_dir: Path) -> None:
    direct_reads = 0
    for folder in sorted(p for p in fixtures_dir.iterdir() if p.is_dir()):
        for instance in _instances(folder):
            pixels = _direct(instance)
            if pixels is None:
                continue
            expected = pydicom.dcmread(instance.path).pixel_array
            assert pixels.dtype == expected.dtype, instance.path
            np.testing.assert_array_equal(pixels, expected, err_msg=str(instance.path))
            direct_reads += 1
    # The 30-slice chest CT is explicit VR little endian: at least those are read directly.
    assert direct_reads >= 30


def test_compressed_pixel_data_takes_the_general_path(fixtures_dir: Path) -> None:
    instances = _instances(fixtures_dir / "abdomen_ct_jpeg2000")
    assert instances
    assert all(_direct(instance) is None for instance in instances)


def _series(folder: Path, stored: np.ndarray) -> list[Path]:
    hu = stored.astype(np.float64) - 1024.0  # write_ct_series stores HU + 1024
    return write_ct_series(hu, folder, spacing=(2.0, 0.8, 0.8))


def _rewrite(paths: list[Path], change) -> None:
    for path in paths:
        dataset = pydicom.dcmread(path)
        change(dataset)
        dataset.save_as(path, enforce_file_format=True)


@pytest.fixture
def stored_values() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 4096, size=(4, 6, 5)).astype(np.int64)


def test_unused_high_bits_are_ignored_as_pydicom_does(tmp_path: Path, stored_values) -> None:
    paths = _series(tmp_path, stored_values)

    def twelve_bits_with_garbage_above(dataset) -> None:
        values = np.frombuffer(dataset.PixelData, "<i2").astype(np.uint16)
        dataset.PixelRepresentation, dataset.BitsStored, dataset.HighBit = 0, 12, 11
        dataset.PixelData = (values | 0xA000).astype("<u2").tobytes()

    _rewrite(paths, twelve_bits_with_garbage_above)
    for instance in _instances(tmp_path):
        pixels = _direct(instance)
        assert pixels is not None
        np.testing.assert_array_equal(pixels, pydicom.dcmread(instance.path).pixel_array)
        assert pixels.max() < 4096


def test_signed_values_with_fewer_stored_bits_are_sign_extended(tmp_path: Path) -> None:
    stored = np.array([[[-2000, -1, 0], [5, 2047, -2048]]] * 2)
    paths = _series(tmp_path, stored + 1024)

    def twelve_signed_bits(dataset) -> None:
        values = np.frombuffer(dataset.PixelData, "<i2") - 1024
        dataset.BitsStored, dataset.HighBit = 12, 11
        dataset.PixelData = (values.astype(np.uint16) & 0x0FFF).astype("<u2").tobytes()

    _rewrite(paths, twelve_signed_bits)
    for instance in _instances(tmp_path):
        pixels = _direct(instance)
        assert pixels is not None
        np.testing.assert_array_equal(pixels, pydicom.dcmread(instance.path).pixel_array)
        assert pixels.min() == -2048


def test_implicit_vr_files_are_read_directly(tmp_path: Path, stored_values) -> None:
    paths = _series(tmp_path, stored_values)
    for path in paths:
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        dataset.save_as(path, implicit_vr=True, little_endian=True)
    for instance in _instances(tmp_path):
        pixels = _direct(instance)
        assert pixels is not None
        np.testing.assert_array_equal(pixels, pydicom.dcmread(instance.path).pixel_array)


def test_an_element_after_the_pixel_data_falls_back_to_pydicom(
    tmp_path: Path, stored_values
) -> None:
    paths = _series(tmp_path, stored_values)
    _rewrite(paths, lambda dataset: dataset.add_new(0xFFFCFFFC, "OB", b"\x00" * 6))
    instances = _instances(tmp_path)
    assert all(_direct(instance) is None for instance in instances)
    (study,) = read_studies(paths, IntakeSummary())
    volume, _, _ = load_volume(study.series[0], QualitySettings())
    # write_ct_series stores k toward superior, i posterior, j left: load_volume's frame.
    np.testing.assert_array_equal(volume.hu, stored_values - 1024.0)
