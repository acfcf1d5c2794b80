"""The who and when of a study view: the patient (for roles allowed identity), the study's
identifiers and times in the site's zone, and its reviews. Pure, as study_view.py."""

from __future__ import annotations

from datetime import UTC, datetime

from services.core.schemas import StudyReport
from services.frontend.site_time import SiteClock
from services.frontend.study_models import ReviewLine
from services.frontend.worklist_rows import (
    Badge,
    age_sex_text,
    duration_text,
    patient_text,
    review_verdict,
    turnaround_seconds,
)
from services.registry.records import Review, StudyRecord


def patient_lines(record: StudyRecord, clock: SiteClock) -> list[list[str]]:
    """The header's patient and study: empty for a role not allowed the identity."""
    identity = record.identity
    if identity is None:
        return []
    lines = [
        ["patient", patient_text(identity) or "—"],
        ["patient ID", identity.patient_id or "—"],
        ["birth date", identity.patient_birth_date or "—"],
        ["age, sex", age_sex_text(identity) or "—"],
        ["accession number", record.accession_number or "—"],
    ]
    when = " ".join(part for part in (record.study_date, identity.study_time) if part)
    lines.append(["study date and time", when or "—"])
    if identity.referring_physician_name:
        lines.append(["referring physician", identity.referring_physician_name.replace("^", " ")])
    return lines


def identity(record: StudyRecord, report: StudyReport | None, clock: SiteClock) -> list[list[str]]:
    fields = [["file", record.original_filename], ["received by", _door_text(record)]]
    if report is not None:
        fields += [
            ["study date", report.study_date or "—"],
            ["description", report.study_description or "—"],
            ["accession number", record.accession_number or "—"],
            ["StudyInstanceUID", report.study_uid or "—"],
            ["SeriesInstanceUID (analysed)", report.series_uid or "—"],
        ]
    fields.append(["received", clock.full(record.received_at)])
    if record.finished_at is not None and record.state.final:
        fields.append(["result", clock.full(record.finished_at)])
    turnaround = turnaround_seconds(record)
    if turnaround is not None:
        fields.append(["turnaround", duration_text(turnaround)])
    return fields


def review_lines(reviews: list[Review], clock: SiteClock, badge: Badge) -> list[ReviewLine]:
    """Every review of the study, newest first, each saying what the reader decided."""
    return [
        {
            "who": review.reviewer,
            "when": clock.full(review.reviewed_at) if review.reviewed_at else "",
            "verdict": review_verdict(badge, review.agrees, review.pathology),
            "findings": [
                f"{label}: {'present' if present else 'absent'}"
                for label, present in sorted(review.findings.items())
            ],
            "comment": review.comment,
        }
        for review in sorted(
            reviews, key=lambda item: item.reviewed_at or record_time_zero(), reverse=True
        )
    ]


def record_time_zero() -> datetime:
    return datetime.min.replace(tzinfo=UTC)


DOOR_TEXT = {
    "upload": "the web page",
    "rest": "the REST API",
    "dicom": "DICOM",
    "amqp": "RabbitMQ",
    "batch": "the batch",
    "import": "an import of earlier results",
}


def _door_text(record: StudyRecord) -> str:
    text = DOOR_TEXT.get(record.door.value, record.door.value)
    return f"{text} ({record.sender})" if record.sender else text
