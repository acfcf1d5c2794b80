"""What a reader recognises a study by: its date, description and accession number.

Read from one header (the selected series' first file, else the study's first), as text;
a malformed date is left out rather than guessed.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from services.core.dicom.values import tag_value, text

_DICOM_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
MAX_TEXT_LENGTH = 200  # a description is one line in a worklist; longer text is a broken tag


def iso_date(value: object) -> str | None:
    """A DICOM DA value (``YYYYMMDD``; old ``YYYY.MM.DD`` too) as ``YYYY-MM-DD``, else None."""
    match = _DICOM_DATE.match(text(value).replace(".", ""))
    if match is None:
        return None
    year, month, day = match.groups()
    if not (1 <= int(month) <= 12 and 1 <= int(day) <= 31):
        return None
    return f"{year}-{month}-{day}"


def _short_text(value: object) -> str | None:
    cleaned = " ".join(text(value).split())  # control characters and newlines become spaces
    return cleaned[:MAX_TEXT_LENGTH] or None


def study_identity(header: Dataset | None) -> dict[str, str | None]:
    """``study_date``, ``study_description`` and ``accession_number`` of a StudyReport."""
    return {
        "study_date": iso_date(tag_value(header, "StudyDate")),
        "study_description": _short_text(tag_value(header, "StudyDescription")),
        "accession_number": _short_text(tag_value(header, "AccessionNumber")),
    }
