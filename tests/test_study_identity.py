"""What a reader recognises a study by: date, description, accession number from the headers
(services/core/dicom/study_identity.py)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from services.core.dicom.study_identity import (
    MAX_TEXT_LENGTH,
    iso_date,
    iso_time,
    patient_identity,
    study_identity,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20070425", "2007-04-25"),
        ("2007.04.25", "2007-04-25"),  # the old ACR-NEMA form
        (" 20070425 ", "2007-04-25"),
        ("", None),
        (None, None),
        ("20071325", None),  # no 13th month
        ("2007-04", None),
        ("yesterday", None),
    ],
)
def test_dates_are_read_strictly(value: object, expected: str | None) -> None:
    assert iso_date(value) == expected


def test_identity_from_a_real_header(fixtures_dir: Path) -> None:
    path = sorted((fixtures_dir / "mr_brain_t1").iterdir())[0]
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert study_identity(header) == {
        "study_date": "1992-04-02",
        "study_description": "FH-HEAD^Brain Protocols",
        "accession_number": "5686274134839343",
    }


def test_identity_text_is_one_bounded_line() -> None:
    header = Dataset()
    header.StudyDescription = "CHEST\r\n<img src=x onerror=alert(1)>"
    header.AccessionNumber = "A" * 16
    header.StudyDate = "not a date"
    identity = study_identity(header)
    # Kept as text (the page shows it as text, never as HTML); control characters go.
    assert identity["study_description"] == "CHEST <img src=x onerror=alert(1)>"
    assert identity["accession_number"] == "A" * 16
    assert identity["study_date"] is None
    header.StudyDescription = "x" * 500
    assert len(study_identity(header)["study_description"] or "") == MAX_TEXT_LENGTH
    assert study_identity(None) == {
        "study_date": None,
        "study_description": None,
        "accession_number": None,
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("093015", "09:30:15"),
        ("093015.123456", "09:30:15"),
        ("0930", "09:30:00"),
        ("09", "09:00:00"),
        ("09:30:15", "09:30:15"),  # the old ACR-NEMA form
        ("250000", None),
        ("noon", None),
        ("", None),
    ],
)
def test_times_are_read_strictly(value: str, expected: str | None) -> None:
    assert iso_time(value) == expected


def test_the_patient_identity_is_read_as_text_and_bounded() -> None:
    header = Dataset()
    header.update(
        {
            "PatientName": "Doe^Jane^^Dr",
            "PatientID": " 12345 ",
            "IssuerOfPatientID": "HOSP-A",
            "PatientBirthDate": "19610203",
            "PatientAge": "061Y",
            "PatientSex": "f",
            "StudyTime": "141502.5",
            "Modality": "CT",
            "ReferringPhysicianName": "Who^" + "x" * 500,
        }
    )
    identity = patient_identity(header)
    assert identity is not None
    assert identity.patient_name == "Doe^Jane^^Dr"
    assert identity.patient_id == "12345"
    assert identity.issuer_of_patient_id == "HOSP-A"
    assert identity.patient_birth_date == "1961-02-03"
    assert identity.patient_age == "061Y"
    assert identity.patient_sex == "F"
    assert identity.study_time == "14:15:02"
    assert identity.modality == "CT"
    assert len(identity.referring_physician_name or "") == MAX_TEXT_LENGTH
    header.PatientSex = "unknown"
    patient = patient_identity(header)
    assert patient is not None
    assert patient.patient_sex is None
    assert patient_identity(None) is None


def test_report_files_leave_the_identity_out(tmp_path: Path) -> None:
    """The identity travels in the result message and the registry, never in report files."""
    from services.core.reports import write_reports
    from services.core.schemas import PatientIdentity, ProcessingStatus, StudyReport

    report = StudyReport(
        path_to_study="a.zip",
        processing_status=ProcessingStatus.FAILURE,
        identity=PatientIdentity(patient_name="Qwyx^Patient", patient_id="ID-77"),
    )
    files = write_reports([report], tmp_path)
    for path in [files.xlsx, files.warnings, *files.json_files]:
        content = path.read_bytes()
        assert b"Qwyx" not in content, path.name
        assert b"ID-77" not in content, path.name
    assert "identity" not in files.json_files[0].read_text()
