"""What a reader recognises a study by: its date, description and accession number, and the
patient it belongs to.

Read from one header (the selected series' first file, else the study's first), as text;
a malformed date or time is left out rather than guessed. Identity values are never logged.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from services.core.dicom.values import tag_value, text
from services.core.schemas import PatientIdentity

_DICOM_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DICOM_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.\d+)?$")
SEXES = frozenset({"M", "F", "O"})
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


def iso_time(value: object) -> str | None:
    """A DICOM TM value (``HHMMSS.FFFFFF``, shorter forms too) as ``HH:MM:SS``, else None."""
    match = _DICOM_TIME.match(text(value).replace(":", ""))
    if match is None:
        return None
    hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    return f"{hours:02d}:{minutes:02d}:{min(seconds, 59):02d}"


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


def patient_identity(header: Dataset | None) -> PatientIdentity | None:
    """The patient and the study's time and kind; None without a header (a NIfTI, a broken
    input)."""
    if header is None:
        return None
    sex = text(tag_value(header, "PatientSex")).upper()
    return PatientIdentity(
        patient_name=_short_text(tag_value(header, "PatientName")),
        patient_id=_short_text(tag_value(header, "PatientID")),
        issuer_of_patient_id=_short_text(tag_value(header, "IssuerOfPatientID")),
        patient_birth_date=iso_date(tag_value(header, "PatientBirthDate")),
        patient_age=_short_text(tag_value(header, "PatientAge")),
        patient_sex=sex if sex in SEXES else None,
        study_time=iso_time(tag_value(header, "StudyTime")),
        modality=_short_text(tag_value(header, "Modality")),
        referring_physician_name=_short_text(tag_value(header, "ReferringPhysicianName")),
    )
