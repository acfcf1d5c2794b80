"""Every change to the registry, each idempotent and keyed by the task id: a door's
submission, an adapter's progress, a task's result, a viewer hiding a row, an SR's delivery.

Exactly once: a submission that exists is not written again; progress never moves a row
back from a final state; the first final result of a task is its result (the adapter stores
results the same way, services/broker/storage.py) and a repeat changes nothing. A race
between two writers of one task ends in one IntegrityError, retried by the caller.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.broker.schemas import StudyProgress, StudyResult, TaskStatus
from services.core.outcome import study_outcome
from services.core.quality import QualityFlag
from services.core.schemas import StudyReport
from services.registry.models import HiddenStudy, SrDelivery, Study, WebhookNotification
from services.registry.models import Review as ReviewRow
from services.registry.records import Delivery, Door, Priority, StudyState, Submission
from services.registry.records import Review as ReviewInput

ACCESSION_KEY = "accession_number"  # of a webhook's message (services/registry/webhooks.py)
IDENTITY_FIELDS = (
    "patient_name",
    "patient_id",
    "issuer_of_patient_id",
    "patient_birth_date",
    "patient_age",
    "patient_sex",
    "study_time",
    "modality",
    "referring_physician_name",
)


def record_submission(session: Session, submission: Submission, now: datetime) -> bool:
    """The task's first row, unless the task is known already; True when written."""
    exists = session.scalar(
        select(Study.id).where(Study.task_id == submission.task_id, Study.report_index == 0)
    )
    if exists is not None:
        return False
    session.add(
        _queued_row(
            0,
            updated_at=now,
            task_id=submission.task_id,
            door=submission.door.value,
            sender=submission.sender,
            priority=submission.priority.value,
            original_filename=submission.original_filename,
            study_path=submission.study_path,
            content_sha256=submission.content_sha256,
            received_at=submission.received_at,
            queued_at=submission.queued_at,
        )
    )
    return True


def _task_rows(session: Session, task_id: str) -> dict[int, Study]:
    rows = session.scalars(select(Study).where(Study.task_id == task_id).with_for_update())
    return {row.report_index: row for row in rows}


def _unknown_task(
    task_id: str, at: datetime, now: datetime, priority: str = Priority.ROUTINE.value
) -> Study:
    """A task no door recorded (published to RabbitMQ by another system)."""
    return Study(
        task_id=task_id,
        report_index=0,
        door=Door.AMQP.value,
        priority=priority,
        original_filename="",
        study_path="",
        state=StudyState.QUEUED.value,
        progress=0.0,
        received_at=at,
        updated_at=now,
        findings=[],
        warnings=[],
        files=[],
    )


def record_progress(session: Session, progress: StudyProgress, now: datetime) -> bool:
    """The task's first row moves to processing at the adapter's stage; a final row stays
    final. True when written."""
    rows = _task_rows(session, progress.task_id)
    first = rows.get(0)
    if first is None:
        priority = progress.priority.value if progress.priority else Priority.ROUTINE.value
        first = _unknown_task(progress.task_id, progress.at, now, priority)
        session.add(first)
    elif StudyState(first.state).final:
        return False
    first.state = StudyState.PROCESSING.value
    first.stage = progress.stage[:64]
    first.progress = progress.fraction
    first.adapter_id = progress.adapter_id or first.adapter_id
    first.started_at = first.started_at or progress.at
    first.updated_at = now
    return True


def record_result(session: Session, result: StudyResult, now: datetime) -> bool:
    """One row per study of the result; False when the task already has its result."""
    rows = _task_rows(session, result.task_id)
    if any(StudyState(row.state).final for row in rows.values()):
        return False
    first = rows.get(0)
    if first is None:
        first = _unknown_task(result.task_id, result.started_at or result.finished_at, now)
        session.add(first)
    state = StudyState.FAILED if result.status is TaskStatus.FAILED else StudyState.DONE
    files = [item.model_dump() for item in result.files]
    for index, report in enumerate(result.reports):
        row = first if index == 0 else rows.get(index)
        if row is None:
            row = _sibling(first, index)
            session.add(row)
        row.state = state.value
        row.stage = None
        row.progress = 1.0
        row.adapter_id = result.adapter_id or row.adapter_id
        row.attempt = result.attempt
        row.started_at = result.started_at or row.started_at
        row.finished_at = result.finished_at
        row.prepare_seconds = result.prepare_seconds
        row.model_seconds = result.model_seconds
        row.check_seconds = result.check_seconds
        row.updated_at = now
        row.original_filename = row.original_filename or result.original_filename
        row.study_path = row.study_path or result.study_path
        row.files = files
        apply_report(row, report)
    return True


# The columns of a task's submission: the same on every row of the task.
SUBMISSION_COLUMNS = (
    "task_id",
    "door",
    "sender",
    "priority",
    "original_filename",
    "study_path",
    "content_sha256",
    "received_at",
    "queued_at",
)


def _queued_row(report_index: int, *, updated_at: datetime, **submission: Any) -> Study:
    """A row of a task that waits in line: its submission (SUBMISSION_COLUMNS), no result."""
    return Study(
        report_index=report_index,
        state=StudyState.QUEUED.value,
        progress=0.0,
        updated_at=updated_at,
        findings=[],
        warnings=[],
        files=[],
        **submission,
    )


def _sibling(first: Study, index: int) -> Study:
    """The row of a task's further study: the task's submission, its own result."""
    submission = {column: getattr(first, column) for column in SUBMISSION_COLUMNS}
    return _queued_row(index, updated_at=first.updated_at, **submission)


def flags_column(flags: list[QualityFlag]) -> str:
    """ ",flag,flag," (sorted, each once): what a LIKE '%,flag,%' finds."""
    names = sorted({flag.value for flag in flags})
    return f",{','.join(names)}," if names else ""


def record_review(session: Session, review: ReviewInput, now: datetime) -> bool:
    """Keeps the review and shows it on the study's row; False when there is no such study
    (or it has no result to review yet)."""
    row = session.scalar(
        select(Study).where(
            Study.task_id == review.task_id, Study.report_index == review.report_index
        )
    )
    if row is None or not StudyState(row.state).final:
        return False
    session.add(
        ReviewRow(
            study_id=row.id,
            reviewer=review.reviewer,
            agrees=review.agrees,
            pathology=None if review.agrees else review.pathology,
            findings=dict(review.findings),
            comment=review.comment,
            reviewed_at=now,
        )
    )
    row.reviewed_by, row.reviewed_at, row.review_agrees = review.reviewer, now, review.agrees
    row.updated_at = now
    return True


def apply_report(row: Study, report: StudyReport) -> None:
    row.processing_status = report.processing_status.value
    row.outcome = study_outcome(report).value
    row.probability_of_pathology = report.probability_of_pathology
    row.pathology = None if report.pathology is None else report.pathology == 1
    row.most_dangerous_finding = report.most_dangerous_pathology_type
    row.findings = [finding.label for finding in report.findings if finding.positive]
    row.failure_reason = report.failure_reason
    row.warnings = list(report.warnings)
    row.quality_flags = flags_column(report.quality_flags)
    row.model_version = report.model.version if report.model is not None else None
    row.demo_weights = report.demo_weights
    row.study_instance_uid = report.study_uid
    row.series_instance_uid = report.series_uid
    row.accession_number = report.accession_number
    row.study_date = report.study_date
    row.study_description = report.study_description
    identity = report.identity
    for name in IDENTITY_FIELDS:
        setattr(row, name, getattr(identity, name) if identity is not None else None)


def hide(session: Session, study_id: int, viewer: str, now: datetime) -> bool:
    """Take a row off one viewer's worklist; True when it was shown before."""
    if session.get(HiddenStudy, (study_id, viewer)) is not None:
        return False
    if session.get(Study, study_id) is None:
        return False
    session.add(HiddenStudy(study_id=study_id, viewer=viewer, hidden_at=now))
    return True


def unhide(session: Session, study_id: int, viewer: str) -> bool:
    """Show a row again to a viewer who hid it; True when it was hidden."""
    row = session.get(HiddenStudy, (study_id, viewer))
    if row is None:
        return False
    session.delete(row)
    return True


def record_delivery(session: Session, delivery: Delivery) -> None:
    """Where one SR stands with one destination (the newest word wins)."""
    row = session.scalar(
        select(SrDelivery).where(
            SrDelivery.task_id == delivery.task_id,
            SrDelivery.report_index == delivery.report_index,
            SrDelivery.destination == delivery.destination,
        )
    )
    if row is None:
        row = SrDelivery(
            task_id=delivery.task_id,
            report_index=delivery.report_index,
            destination=delivery.destination,
        )
        session.add(row)
    row.sop_instance_uid = delivery.sop_instance_uid or row.sop_instance_uid
    row.state = delivery.state
    row.status = delivery.status[:128]
    row.updated_at = delivery.updated_at


def blank_task(
    session: Session, task_id: str, *, purged_name: str, fields: tuple[str, ...], now: datetime
) -> None:
    """Retention: the task's rows keep times, call and model; identity and names go."""
    for row in session.scalars(select(Study).where(Study.task_id == task_id)):
        for name in fields:
            setattr(row, name, None)
        row.original_filename = purged_name
        row.study_path = ""
        row.files = []
        row.purged_at = now
        row.updated_at = now
    for delivery in session.scalars(select(SrDelivery).where(SrDelivery.task_id == task_id)):
        delivery.sop_instance_uid = None  # a UID the PACS files the patient's SR under
    # A webhook's message holds the accession number when its receiver asked for it.
    notifications = select(WebhookNotification).where(WebhookNotification.task_id == task_id)
    for notification in session.scalars(notifications):
        body = json.loads(notification.body)
        if body.get(ACCESSION_KEY) is not None:
            body[ACCESSION_KEY] = None
            notification.body = json.dumps(body, separators=(",", ":"))
