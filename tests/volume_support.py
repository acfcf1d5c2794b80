"""Loading a real DICOM fixture the way the pipeline does, for tests that need a Volume."""

from __future__ import annotations

from pathlib import Path

from services.core.config import Settings
from services.core.dicom import load_volume, read_studies, select_series
from services.core.intake import collect_dicom_files
from services.core.volume import Volume


def load_fixture_volume(folder: Path, work_dir: Path) -> Volume:
    """The pipeline's loading path: intake, headers, series selection, volume."""
    settings = Settings()
    intake = collect_dicom_files(folder, work_dir, settings.intake)
    (study,) = read_studies(intake.dicom_files, intake.summary)
    selection = select_series(study, settings.series_selection)
    assert selection.selected is not None, selection.failure_reason
    volume, _quality, _warnings = load_volume(selection.selected, settings.quality)
    return volume
