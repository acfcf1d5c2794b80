"""The batch CLI: inputs, outputs, saved model inputs, exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from batch_support import report_rows, run_batch
from pydicom.uid import generate_uid
from registry_support import BACKEND_PARAMETERS, registry_url

from services.batch.inputs import list_inputs
from services.batch.model_input_files import model_input_file_name
from services.core.schemas import REPORT_COLUMNS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHEST = "chest_ct_lung_dx_a0002"


_run = run_batch
_rows = report_rows


def _copy_as_new_study(source: Path, destination: Path, seed: str) -> None:
    """The same images under new Study/Series/SOP Instance UIDs: a second study."""
    destination.mkdir(parents=True)
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    series_uid = generate_uid(entropy_srcs=[seed, "series"])
    for path in sorted(source.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid(entropy_srcs=[seed, path.name])
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.save_as(destination / path.name, enforce_file_format=True)


# --------------------------------------------------------------------------- pure helpers


def test_each_top_level_entry_is_one_input(tmp_path):
    for name in ("b.zip", "a_folder", "c.dcm", ".DS_Store"):
        target = tmp_path / name
        target.mkdir() if name == "a_folder" else target.write_bytes(b"x")
    assert [p.name for p in list_inputs(tmp_path)] == ["a_folder", "b.zip", "c.dcm"]


def test_a_folder_of_loose_slices_is_one_input(tmp_path):
    for index in range(3):
        (tmp_path / f"IM{index}").write_bytes(b"x")
    assert list_inputs(tmp_path) == [tmp_path]
    single = tmp_path / "IM0"
    assert list_inputs(single) == [single]


@pytest.mark.parametrize(
    ("name", "index", "count", "expected"),
    [
        ("study1.zip", 0, 1, "study1.npy"),
        ("study1.ZIP", 1, 2, "study1_1.npy"),
        ("folder", 0, 1, "folder.npy"),
        ("slice 7.dcm", 0, 1, "slice_7.npy"),
        ("../odd/../name?.zip", 0, 1, "name.npy"),
    ],
)
def test_model_input_file_names(name, index, count, expected):
    assert model_input_file_name(name, index, count) == expected


# --------------------------------------------------------------------------- the CLI


def test_folder_run_writes_reports_and_model_inputs(fixtures_dir, tiny_model_repository, tmp_path):
    inputs = tmp_path / "inputs"
    two_studies = inputs / "two_studies"
    shutil.copytree(fixtures_dir / CHEST, two_studies / "first")
    _copy_as_new_study(fixtures_dir / CHEST, two_studies / "second", seed="cli-test")
    with zipfile.ZipFile(inputs / "mr.zip", "w") as handle:
        for path in sorted((fixtures_dir / "mr_brain_t1").iterdir()):
            handle.write(path, f"mr/{path.name}")
    (inputs / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    output, saved = tmp_path / "output", tmp_path / "model_inputs"

    completed = _run(
        inputs, output, "--model-repository", tiny_model_repository, "--save-model-input", saved
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = completed.stdout.strip().splitlines()[-1]
    assert summary.startswith("3 studies from 2 inputs")
    assert "2 Success, 1 Failure" in summary
    assert "DEMO" in summary

    rows = _rows(output)
    assert tuple(rows[0])[:7] == REPORT_COLUMNS
    assert [row["processing_status"] for row in rows] == ["Failure", "Success", "Success"]
    assert {row["path_to_study"] for row in rows} == {str(inputs / "mr.zip"), str(two_studies)}
    assert len({row["study_uid"] for row in rows}) == 3
    # Identical images in both studies: identical model inputs and probabilities.
    assert rows[1]["probability_of_pathology"] == pytest.approx(rows[2]["probability_of_pathology"])
    assert sorted(p.name for p in saved.iterdir()) == [
        "two_studies_0.bpr.npy",  # the body-part regression input of every slice
        "two_studies_0.npy",
        "two_studies_1.bpr.npy",
        "two_studies_1.npy",
    ]
    first, second = (np.load(saved / f"two_studies_{i}.npy") for i in (0, 1))
    assert first.shape == (1, 1, 24, 40, 40)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert len(list((output / "json").glob("*.json"))) == 3
    text = (output / "warnings_and_errors.txt").read_text()
    assert "no CT series: modality MR" in text


def test_single_zip_and_loose_folder_inputs(fixtures_dir, tiny_model_repository, tmp_path):
    archive = tmp_path / "chest.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted((fixtures_dir / CHEST).iterdir()):
            handle.write(path, path.name)
    for source, name in ((archive, "zip"), (fixtures_dir / CHEST, "folder")):
        output = tmp_path / f"output_{name}"
        completed = _run(source, output, "--model-repository", tiny_model_repository)
        assert completed.returncode == 0, completed.stderr[-3000:]
        (row,) = _rows(output)
        assert row["processing_status"] == "Success"
        assert row["path_to_study"] == str(source)


def test_missing_model_repository_is_a_usage_error(fixtures_dir, tmp_path):
    missing = tmp_path / "no_repository"
    completed = _run(fixtures_dir / CHEST, tmp_path / "out", "--model-repository", missing)
    assert completed.returncode == 2
    assert "does not exist" in completed.stderr
    assert "convertation.build_repository" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_incomplete_model_repository_names_the_missing_files(
    fixtures_dir, tiny_model_repository, tmp_path
):
    repository = tmp_path / "repository"
    shutil.copytree(tiny_model_repository, repository)
    (repository / "binary_head" / "1" / "model.onnx").unlink()
    completed = _run(fixtures_dir / CHEST, tmp_path / "out", "--model-repository", repository)
    assert completed.returncode == 2
    assert "binary_head/1/model.onnx" in completed.stderr


def test_missing_input_and_bad_config_are_usage_errors(
    fixtures_dir, tiny_model_repository, tmp_path
):
    completed = _run(tmp_path / "nowhere", tmp_path / "out")
    assert completed.returncode == 2
    assert "input not found" in completed.stderr

    config = tmp_path / "config.yaml"
    config.write_text("inference:\n  finding_thresholds: {'Lung nodules': 0.4}\n")
    completed = _run(
        fixtures_dir / CHEST,
        tmp_path / "out",
        "--model-repository",
        tiny_model_repository,
        "--config",
        config,
    )
    assert completed.returncode == 2
    assert "unknown findings ['Lung nodules']" in completed.stderr

    completed = _run(fixtures_dir / CHEST)
    assert completed.returncode == 2
    assert "usage:" in completed.stderr

    # A CT-RATE table without one of its columns: read after the memory policy, refused before
    # any study runs.
    table = tmp_path / "metadata.csv"
    table.write_text("VolumeName,RescaleSlope,RescaleIntercept,XYSpacing\nx,1,0,[1]\n")
    completed = _run(fixtures_dir / CHEST, tmp_path / "out", "--ct-rate-metadata", table)
    assert completed.returncode == 2
    assert "error: invalid configuration" in completed.stderr
    assert "ZSpacing" in completed.stderr


@pytest.mark.parametrize("backend", BACKEND_PARAMETERS)
def test_a_run_is_recorded_in_a_registry_when_given_its_url(
    backend, fixtures_dir, tiny_model_repository, tmp_path
):
    """Each input one task of the batch door, its studies' results in the registry (an empty
    SQLite file, or an empty database on the real PostgreSQL named by a plain postgresql://
    URL, as an operator writes it: read with psycopg 3); a URL the registry cannot use is a
    usage error."""
    from services.registry import Door, Registry, StudyFilter, StudyState
    from services.registry.database import registry_address

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copytree(fixtures_dir / CHEST, inputs / "chest")
    (inputs / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with registry_url(backend, tmp_path / "registry", upgraded=False) as address:
        # What a person writes: no driver named (SQLAlchemy 2.0 would take psycopg2 for it,
        # which is not installed; pyproject allows 2.0).
        url = address.set(drivername=address.get_backend_name()).render_as_string(
            hide_password=False
        )
        completed = _run(
            inputs,
            tmp_path / "out",
            "--model-repository",
            tiny_model_repository,
            "--registry-url",
            url,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        registry = Registry(registry_address(url))
        try:
            records = registry.list_studies(StudyFilter()).items
        finally:
            registry.close()
    by_file = {record.original_filename: record for record in records}
    assert set(by_file) == {"chest", "broken.zip"}
    assert {record.door for record in records} == {Door.BATCH}
    assert {record.state for record in records} == {StudyState.DONE}
    assert by_file["chest"].processing_status == "Success"
    assert by_file["chest"].study_instance_uid
    assert by_file["broken.zip"].processing_status == "Failure"
    if backend != "sqlite":
        return
    refused = _run(
        inputs,
        tmp_path / "out2",
        "--model-repository",
        tiny_model_repository,
        "--registry-url",
        "nosuchdialect://x",
    )
    assert refused.returncode == 2
    assert "registry cannot be used" in refused.stderr


# Runs the batch's main() with its backend replaced by one that notes which of the DICOM,
# SR and spreadsheet libraries are imported when the backend is opened, then refuses.
BACKEND_OPENED_PROBE = """
import sys
import services.batch.__main__ as entry
import services.core.inference as inference
from services.core.errors import ConfigurationError

HEAVY = {"pydicom", "highdicom", "openpyxl", "SimpleITK", "nibabel", "services.core.pipeline",
         "services.batch.screening"}

def opened(settings):
    print(sorted(HEAVY & set(sys.modules)))
    raise ConfigurationError("no model here")

inference.create_backend = opened  # the entry imports it when it opens the backend
print(entry.main([sys.argv[1], sys.argv[2]]))
"""


def test_a_batch_opens_its_backend_before_it_imports_the_pipeline(tmp_path: Path) -> None:
    """The embedded backend starts loading its model when it is opened; the DICOM, SR and
    spreadsheet libraries (about 0.6 s) are imported only after, beside the load
    (services/batch/screening.py; issue 24's cold start)."""
    study = tmp_path / "study.dcm"
    study.write_bytes(b"not read: the backend is refused first")
    completed = subprocess.run(
        [sys.executable, "-c", BACKEND_OPENED_PROBE, str(study), str(tmp_path / "out")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    # Nothing heavy imported when the backend was opened; the refusal is a usage error (2).
    assert completed.stdout.splitlines()[-2:] == ["[]", "2"]


def test_a_batch_loads_the_registry_s_code_only_to_record_to_it() -> None:
    """SQLAlchemy's models and argon2 are 0.4 s of a batch's cold start (issue 24): the batch
    imports services.registry and SQLAlchemy only for --registry-url (whose tests run it)."""
    probe = (
        "import sys, services.batch.__main__; "
        "print(sorted({'services.registry', 'sqlalchemy', 'argon2'} & set(sys.modules)))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "[]"
