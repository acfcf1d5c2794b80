"""intake.max_series_voxels: a series too large for a worker fails from its headers alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.core.config import InferenceSettings, IntakeSettings, QualitySettings, Settings
from services.core.dicom import load_volume, read_studies, select_series
from services.core.dicom.volume_builder import series_size_error
from services.core.errors import SeriesDataError
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.pipeline import process_input
from services.core.schemas import IntakeSummary

CHEST = "chest_ct_lung_dx_a0002"  # 30 slices of 512x512
CHEST_VOXELS = 512 * 512 * 30


def _chest_series(folder: Path):
    (study,) = read_studies(sorted(folder.iterdir()), IntakeSummary())
    selection = select_series(study, Settings().series_selection)
    assert selection.selected is not None
    return selection.selected


def test_the_default_limit_fits_about_1700_slices_of_512x512():
    limit = IntakeSettings().max_series_voxels
    assert series_size_error(512, 512, 1700, limit) is None
    assert series_size_error(512, 512, 1800, limit) is not None


def test_the_reason_names_the_numbers():
    reason = series_size_error(512, 512, 30, CHEST_VOXELS - 1)
    assert reason is not None
    assert "512x512 pixels x 30 slices" in reason
    assert f"{CHEST_VOXELS:,} voxels" in reason
    assert f"{CHEST_VOXELS - 1:,}" in reason
    assert "intake.max_series_voxels" in reason
    assert series_size_error(512, 512, 30, CHEST_VOXELS) is None
    assert series_size_error(512, 512, 30, None) is None


def test_a_series_over_the_limit_fails_before_any_pixel_is_read(fixtures_dir, tmp_path):
    folder = tmp_path / CHEST
    shutil.copytree(fixtures_dir / CHEST, folder)
    series = _chest_series(folder)
    # The headers are in memory; without the files any pixel read would fail differently.
    for instance in series.instances:
        instance.path.unlink()
    with pytest.raises(SeriesDataError, match=r"512x512 pixels x 30 slices") as caught:
        load_volume(series, QualitySettings(), max_voxels=CHEST_VOXELS - 1)
    assert "intake.max_series_voxels" in str(caught.value)


def test_a_series_at_the_limit_is_read(fixtures_dir):
    series = _chest_series(fixtures_dir / CHEST)
    volume, report, _ = load_volume(series, QualitySettings(), max_voxels=CHEST_VOXELS)
    assert volume.hu.size == CHEST_VOXELS
    assert report.n_slices == 30


def test_the_pipeline_reports_the_limit_as_a_failure(fixtures_dir, tiny_model_repository):
    settings = Settings.model_validate({"intake": {"max_series_voxels": 1_000_000}})
    backend = OnnxRuntimeBackend(tiny_model_repository, InferenceSettings(onnx_intra_op_threads=1))
    try:
        (report,) = process_input(fixtures_dir / CHEST, backend=backend, settings=settings)
    finally:
        backend.close()
    assert report.processing_status.value == "Failure"
    assert "the series is too large" in report.failure_reason
    assert "1,000,000 limit (intake.max_series_voxels)" in report.failure_reason
    assert report.series_uid is not None
