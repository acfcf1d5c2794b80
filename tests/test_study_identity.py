"""What a reader recognises a study by: date, description, accession number from the headers
(services/core/dicom/study_identity.py)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from services.core.dicom.study_identity import MAX_TEXT_LENGTH, iso_date, study_identity


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
