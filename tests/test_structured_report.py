"""The DICOM SR of a screened study: the real pipeline (tiny demo repository, ONNX Runtime) on
the chest fixture (a Success) and the head fixture (a Failure: not a chest), written with
highdicom, validated with dicom3tools' dciodvfy and read back value by value."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from batch_support import report_rows, run_batch
from loguru import logger
from sr_support import dciodvfy_errors, read_screening_sr

from services.core.config import Settings, load_settings
from services.core.inference import create_backend
from services.core.pipeline import process_input
from services.core.schemas import StudyReport
from services.sr.document import (
    ALGORITHM_NAME,
    DocumentContext,
    build_structured_report,
    document_context,
    write_structured_reports,
)
from services.sr.evidence import EvidenceCollector, StudyEvidence

pytestmark = pytest.mark.slow

SOURCE_IDENTIFICATION = (
    "PatientName",
    "PatientID",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
)


@pytest.fixture(scope="module")
def settings(tiny_model_repository: Path) -> Settings:
    settings = load_settings(environ={})
    settings.inference.backend = "onnxruntime"
    settings.inference.model_repository = tiny_model_repository
    return settings


@pytest.fixture(scope="module")
def screened(
    settings: Settings, fixtures_dir: Path, tmp_path_factory
) -> dict[str, tuple[StudyReport, StudyEvidence | None, Path]]:
    """name -> (report, evidence, SR file) for the chest and the head fixture."""
    backend = create_backend(settings)
    collector = EvidenceCollector()
    try:
        for name in ("chest_ct_lung_dx_a0002", "head_ct_gantry_tilt"):
            process_input(fixtures_dir / name, backend=backend, settings=settings, events=collector)
        context = document_context("task-sr-test", backend.metadata, settings.inference)
    finally:
        backend.close()
    folder = tmp_path_factory.mktemp("sr")
    paths = write_structured_reports(collector.studies, folder, context)
    assert len(paths) == 2
    (chest, chest_evidence), (head, head_evidence) = collector.studies
    return {
        "chest": (chest, chest_evidence, paths[0]),
        "head": (head, head_evidence, paths[1]),
    }


def first_source(fixtures_dir: Path, name: str) -> pydicom.Dataset:
    path = sorted((fixtures_dir / name).iterdir())[0]
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_success_sr_validates_and_holds_every_value(screened, fixtures_dir: Path) -> None:
    report, evidence, path = screened["chest"]
    assert report.succeeded
    assert evidence is not None
    assert dciodvfy_errors(path) == []
    document = pydicom.dcmread(path)
    source = first_source(fixtures_dir, "chest_ct_lung_dx_a0002")
    # Filed with its study: the source's patient and study identification, unchanged.
    for keyword in SOURCE_IDENTIFICATION:
        assert str(document.get(keyword, "")) == str(source.get(keyword, "")), keyword
    assert document.Modality == "SR"
    assert document.SeriesInstanceUID != report.series_uid
    values = read_screening_sr(document)
    # The analysed series, every instance, in the evidence and as the group's source images.
    source_uids = sorted(
        str(pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID)
        for file in (fixtures_dir / "chest_ct_lung_dx_a0002").iterdir()
    )
    assert list(values.evidence_series) == [report.series_uid]
    assert sorted(values.evidence_series[report.series_uid]) == source_uids
    assert sorted(values.source_images) == source_uids
    assert values.algorithm["Algorithm Name"] == [ALGORITHM_NAME]
    assert report.model is not None
    assert values.algorithm["Algorithm Version"] == [report.model.version]
    assert "demo weights: yes" in values.algorithm["Algorithm Parameters"]
    assert values.screening["Demo weights"] == "Yes"
    assert values.screening["Processing status"] == "Success"
    assert values.screening["Probability of pathology"] == pytest.approx(
        report.probability_of_pathology, abs=1e-6
    )
    assert values.screening["Pathology"] == ("Present" if report.pathology else "Absent")
    assert values.screening["Most dangerous finding"] == (
        report.most_dangerous_pathology_type or "None"
    )
    assert "DEMO WEIGHTS" in str(values.screening["Notice"])
    assert "DEMO" in document.SeriesDescription
    assert len(values.findings) == len(report.findings) > 0
    for finding in report.findings:
        stored = values.findings[finding.label]
        assert stored["Probability of finding"] == pytest.approx(finding.probability, abs=1e-6)
        assert stored["Finding threshold"] == pytest.approx(finding.threshold)
        assert stored["Finding present"] == ("Present" if finding.positive else "Absent")


def test_failure_sr_validates_and_gives_the_reason(screened, fixtures_dir: Path) -> None:
    report, evidence, path = screened["head"]
    assert not report.succeeded
    assert evidence is not None
    assert dciodvfy_errors(path) == []
    document = pydicom.dcmread(path)
    source = first_source(fixtures_dir, "head_ct_gantry_tilt")
    assert document.StudyInstanceUID == source.StudyInstanceUID
    assert document.PatientID == source.PatientID
    values = read_screening_sr(document)
    assert values.screening["Processing status"] == "Failure"
    assert values.screening["Failure reason"] == report.failure_reason
    assert "Probability of pathology" not in values.screening
    assert values.findings == {}
    assert list(values.evidence_series) == [source.SeriesInstanceUID]


def test_the_same_task_gives_the_same_instance(screened) -> None:
    report, evidence, path = screened["chest"]
    assert evidence is not None
    context = DocumentContext(key="task-sr-test", model_version="x", pathology_threshold=0.5)
    again = build_structured_report(report, evidence, context, instance_number=1)
    other = build_structured_report(
        report, evidence, DocumentContext(key="another", model_version="x", pathology_threshold=0.5)
    )
    written = pydicom.dcmread(path)
    assert again.SOPInstanceUID == written.SOPInstanceUID
    assert again.SeriesInstanceUID == written.SeriesInstanceUID
    assert other.SOPInstanceUID != written.SOPInstanceUID


def test_writing_logs_no_patient_data(screened) -> None:
    report, evidence, _path = screened["chest"]
    assert evidence is not None
    patient_name = str(evidence.instances[0].PatientName)
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_structured_report(
                report,
                evidence,
                DocumentContext(key="k", model_version="v", pathology_threshold=None),
            )
    finally:
        logger.remove(sink)
    assert patient_name
    assert not any(patient_name in line for line in lines)
    assert not any(patient_name in str(warning.message) for warning in caught)


def test_the_batch_writes_an_sr_per_dicom_study(
    tiny_model_repository: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("chest_ct_lung_dx_a0002", "head_ct_gantry_tilt"):
        (inputs / name).symlink_to(fixtures_dir / name)
    output = tmp_path / "output"
    completed = run_batch(inputs, output, "--model-repository", tiny_model_repository)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = report_rows(output)
    documents = [pydicom.dcmread(path) for path in sorted((output / "sr").glob("*.dcm"))]
    assert [document.StudyInstanceUID for document in documents] == [
        row["study_uid"] for row in rows
    ]
    statuses = [
        read_screening_sr(document).screening["Processing status"] for document in documents
    ]
    assert statuses == [row["processing_status"] for row in rows] == ["Success", "Failure"]


def test_a_pacs_list_tells_the_outcome_and_what_was_received(screened, fixtures_dir, tmp_path):
    """The series description states the outcome; a refused head CT is reported as a CT (not
    a chest CT), a refused MR as an MR (validated by dciodvfy)."""
    chest, _evidence, chest_path = screened["chest"]
    chest_document = pydicom.dcmread(chest_path)
    call = "PATHOLOGY" if chest.pathology else "NORMAL"
    assert chest_document.SeriesDescription == (
        f"AI chest CT screening: {call} P={chest.probability_of_pathology:.2f} (DEMO weights)"
    )
    head_document = pydicom.dcmread(screened["head"][2])
    assert head_document.SeriesDescription == "AI chest CT screening: Not analysed (DEMO weights)"
    assert read_screening_sr(head_document).procedure == ("CT", "DCM")
    assert read_screening_sr(chest_document).procedure == ("24627-2", "LN")
    mr_report = screened["head"][0].model_copy(
        update={
            "chest_check": None,
            "identity": screened["head"][0].identity.model_copy(update={"modality": "MR"}),
            "failure_reason": "no CT series: modality MR",
        }
    )
    context = DocumentContext(key="mr-task", model_version="v", pathology_threshold=None)
    mr = build_structured_report(mr_report, screened["head"][1], context)
    path = tmp_path / "mr.dcm"
    mr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert read_screening_sr(mr).procedure == ("MR", "DCM")


def test_a_later_sr_of_the_same_study_supersedes_the_earlier(screened, tmp_path) -> None:
    """The study sent again: its new SR names the earlier ones in its Predecessor Documents
    Sequence (their UIDs follow from their tasks), and validates."""
    report, evidence, first_path = screened["chest"]
    first = pydicom.dcmread(first_path)
    asked: list[str] = []

    def earlier(study_uid: str) -> list[tuple[str, int]]:
        asked.append(study_uid)
        return [("task-sr-test", 0), ("second-task", 0)]  # the second task itself is skipped

    context = DocumentContext(
        key="second-task", model_version="v", pathology_threshold=0.5, earlier_reports=earlier
    )
    second = build_structured_report(report, evidence, context, instance_number=1)
    assert asked == [evidence.study_uid]
    (series,) = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    path = tmp_path / "second.dcm"
    second.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
