"""Every real fixture, zipped as a hospital would send it, through the batch CLI and the pipeline.

One CLI run (a subprocess with the tiny demo model repository) screens all fixtures and
three hostile archives; the tests then read the report it wrote. A few in-process runs
check what the CLI cannot show (quality warnings with looser settings, a failing model).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from batch_support import report_rows, screen_with

from services.batch.model_input_files import ModelInputSaver
from services.core.config import InferenceSettings, Settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.labels import FINDING_LABELS
from services.core.model_metadata import metadata_path, read_metadata, write_metadata
from services.core.pipeline import process_input
from services.core.reports import finding_column

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHEST = "chest_ct_lung_dx_a0002"
ESCAPED_NAME = "escaped_by_zip.dcm"


def _zip_as_hospital(folder: Path, archive: Path) -> Path:
    """PACS exports put the files under a study folder inside the zip."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, f"EXPORT/{folder.name}/{path.relative_to(folder).as_posix()}")
    return archive


def _hostile_archives(inputs: Path, fixtures_dir: Path) -> None:
    chest = sorted((fixtures_dir / CHEST).iterdir())
    with zipfile.ZipFile(inputs / "attack_path_escape.zip", "w") as handle:
        for path in chest[:3]:
            handle.write(path, f"study/{path.name}")
        handle.writestr(f"../../{ESCAPED_NAME}", chest[0].read_bytes())
    with zipfile.ZipFile(inputs / "attack_zip_bomb.zip", "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("study/slice.dcm", b"\0" * (64 * 1024 * 1024))
    whole = (inputs / f"{CHEST}.zip").read_bytes()
    (inputs / "attack_truncated.zip").write_bytes(whole[: len(whole) // 2])


@pytest.fixture(scope="module")
def batch_run(fixtures_dir, tiny_model_repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_fixtures")
    inputs, output = root / "inputs", root / "output"
    temp, cwd = root / "tmp", root / "cwd"
    for folder in (inputs, temp, cwd):
        folder.mkdir()
    fixture_names = sorted(p.name for p in fixtures_dir.iterdir() if p.is_dir())
    for name in fixture_names:
        _zip_as_hospital(fixtures_dir / name, inputs / f"{name}.zip")
    _hostile_archives(inputs, fixtures_dir)
    environment = {**os.environ, "TMPDIR": str(temp)}
    completed = screen_with(tiny_model_repository, inputs, output, cwd=cwd, environment=environment)
    by_input = {}
    for row in report_rows(output):
        by_input.setdefault(Path(row["path_to_study"]).stem, []).append(row)
    documents = {}
    for path in (output / "json").glob("*.json"):
        document = json.loads(path.read_text())
        documents[Path(document["path_to_study"]).stem] = document
    return {
        "completed": completed,
        "rows": by_input,
        "json": documents,
        "root": root,
        "temp": temp,
        "cwd": cwd,
        "output": output,
        "fixtures": fixture_names,
    }


def _only_row(batch_run, name: str) -> dict:
    rows = batch_run["rows"][name]
    assert len(rows) == 1, rows
    return rows[0]


def test_the_run_succeeds_and_every_input_has_a_row(batch_run):
    completed = batch_run["completed"]
    assert completed.returncode == 0, completed.stderr[-3000:]
    expected = set(batch_run["fixtures"]) | {
        "attack_path_escape",
        "attack_zip_bomb",
        "attack_truncated",
    }
    assert set(batch_run["rows"]) == expected
    assert "1 Success" in completed.stdout
    assert "8 Failure" in completed.stdout
    assert (batch_run["output"] / "warnings_and_errors.txt").is_file()
    assert len(batch_run["json"]) == len(expected)


def test_chest_ct_succeeds_with_demo_weights_flagged(batch_run):
    row = _only_row(batch_run, CHEST)
    assert row["processing_status"] == "Success"
    assert isinstance(row["probability_of_pathology"], float)
    assert 0.0 <= row["probability_of_pathology"] <= 1.0
    assert row["pathology"] in (0, 1)
    assert row["study_uid"].startswith("1.3.6.1.4.1.14519")
    assert row["series_uid"]
    assert row["time_of_processing"] > 0
    for label in FINDING_LABELS:
        assert 0.0 <= row[finding_column(label)] <= 1.0
    assert row["most_dangerous_pathology_type"] in (None, *FINDING_LABELS)
    assert row["demo_weights"] == 1
    assert "mean nothing" in row["notice"]
    assert row["model_version"].startswith("demo-")
    document = batch_run["json"][CHEST]
    assert document["demo_weights"] is True
    assert document["model"]["demo"] is True
    assert document["chest_check"]["is_chest"] is True
    # What a reader recognises the study by, from its headers.
    assert document["study_date"] == "2007-04-25"
    assert document["study_description"] == "Thorax^AThoraxRoutine (Adult)"
    for stage in ("intake", "headers", "selection", "volume", "chest_check", "preprocessing"):
        assert stage in document["stage_seconds"]
    assert "inference" in document["stage_seconds"]


@pytest.mark.parametrize(
    ("name", "reason_words"),
    [
        ("head_ct_gantry_tilt", ["not a chest CT"]),
        ("abdomen_ct_jpeg2000", ["not a chest CT"]),
        ("mr_brain_t1", ["MR"]),
        ("ct_scout_and_dose_screens", ["localizer", "dose"]),
    ],
)
def test_non_chest_inputs_fail_with_the_reason_named(batch_run, name, reason_words):
    row = _only_row(batch_run, name)
    assert row["processing_status"] == "Failure"
    for field in ("probability_of_pathology", "pathology", "most_dangerous_pathology_type"):
        assert row[field] is None
    # The deployment's model is a demo: its Failure rows say so like the others.
    assert row["demo_weights"] == 1
    assert "mean nothing" in row["notice"]
    for word in reason_words:
        assert word.lower() in row["failure_reason"].lower()
    assert row["failure_reason"] in (batch_run["output"] / "warnings_and_errors.txt").read_text()


def test_head_ct_reports_its_gantry_tilt(batch_run):
    assert "gantry tilt" in _only_row(batch_run, "head_ct_gantry_tilt")["warnings"]


def test_jpeg2000_pixels_were_decoded_for_the_image_check(batch_run):
    document = batch_run["json"]["abdomen_ct_jpeg2000"]
    assert "JPEG 2000" in document["quality"]["transfer_syntax"]
    assert document["chest_check"]["image_verdict"] is False


def test_duplicate_positions_are_reported(batch_run):
    row = _only_row(batch_run, "ct_duplicate_positions")
    # 11 images: too few for a chest volume, and the duplicate is reported beside the reason.
    assert row["processing_status"] == "Failure"
    assert "fewer than" in row["failure_reason"]
    assert "1 duplicate slice positions" in row["warnings"]


@pytest.mark.parametrize(
    ("name", "reason_words"),
    [
        ("attack_path_escape", ["unsafe member", ESCAPED_NAME]),
        ("attack_zip_bomb", ["compression ratio", "zip bomb"]),
        ("attack_truncated", ["not a readable zip"]),
    ],
)
def test_hostile_archives_become_failure_rows(batch_run, name, reason_words):
    row = _only_row(batch_run, name)
    assert row["processing_status"] == "Failure"
    assert row["failure_reason"].startswith("intake failed:")
    for word in reason_words:
        assert word in row["failure_reason"]


def test_nothing_is_written_outside_and_no_temporary_files_remain(batch_run):
    assert list(batch_run["temp"].iterdir()) == []  # every work directory was removed
    assert list(batch_run["cwd"].iterdir()) == []
    assert not list(batch_run["root"].rglob(ESCAPED_NAME))
    assert not list(batch_run["root"].parent.glob(ESCAPED_NAME))


# --------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def backend(tiny_model_repository):
    backend = OnnxRuntimeBackend(tiny_model_repository, InferenceSettings(onnx_intra_op_threads=1))
    yield backend
    backend.close()


def test_volume_check_warnings_survive_a_volume_failure(fixtures_dir, backend):
    # With the slice minimum lowered the series reaches the volume check, which finds the
    # duplicate and then fails the series for its gaps (11 images over 470 mm).
    settings = Settings.model_validate({"series_selection": {"min_slices": 5}})
    (report,) = process_input(
        fixtures_dir / "ct_duplicate_positions", backend=backend, settings=settings
    )
    assert report.processing_status.value == "Failure"
    assert "slice positions are missing" in report.failure_reason
    assert any("1 duplicate slice positions: kept one" in warning for warning in report.warnings)
    assert report.series_uid is not None
    assert "volume" in report.stage_seconds


def test_a_failing_model_fails_the_study_not_the_run(fixtures_dir, tiny_model_repository, tmp_path):
    # A repository whose metadata promises another input shape than the encoder takes.
    broken = tmp_path / "broken_repository"
    shutil.copytree(tiny_model_repository, broken)
    metadata = read_metadata(broken)
    write_metadata(broken, metadata.model_copy(update={"target_shape": (24, 40, 44)}))
    assert metadata_path(broken).is_file()
    broken_backend = OnnxRuntimeBackend(broken, InferenceSettings(onnx_intra_op_threads=1))
    try:
        reports = [
            report
            for folder in (CHEST, "mr_brain_t1")
            for report in process_input(
                fixtures_dir / folder, backend=broken_backend, settings=Settings()
            )
        ]
    finally:
        broken_backend.close()
    chest, mr = reports
    assert chest.processing_status.value == "Failure"
    assert chest.failure_reason.startswith("inference failed:")
    assert chest.quality is not None
    assert chest.chest_check.is_chest
    assert "inference" in chest.stage_seconds
    assert mr.failure_reason == "no CT series: modality MR"


def test_an_input_without_dicom_is_one_failure_row(tmp_path, backend):
    folder = tmp_path / "not_dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    (report,) = process_input(folder, backend=backend, settings=Settings())
    assert report.processing_status.value == "Failure"
    assert report.failure_reason.startswith("intake failed:")
    assert report.path_to_study == str(folder)


def test_model_input_is_the_preprocessed_chest(fixtures_dir, backend, tmp_path):
    (report,) = process_input(
        fixtures_dir / CHEST,
        backend=backend,
        settings=Settings(),
        display_name="chest",
        events=ModelInputSaver(tmp_path, fixtures_dir / CHEST),
    )
    assert report.succeeded
    assert report.path_to_study == "chest"
    saved = np.load(tmp_path / f"{CHEST}.npy")
    assert saved.shape == (1, 1, 24, 40, 40)
    assert saved.dtype == np.float32
    assert saved.min() >= -1.0
    assert saved.max() <= 1.0
    # The same tensor through the backend gives the reported probability.
    outputs = backend.infer(saved)
    assert abs(float(outputs.pathology_probability[0]) - report.probability_of_pathology) < 1e-6
