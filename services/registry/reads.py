"""What the registry answers: a page of studies (filtered, newest first, by cursor), one
study, a patient's studies, a task's studies, an earlier upload of the same bytes."""

from __future__ import annotations

import base64
import json
import statistics
from datetime import UTC, datetime, time, timedelta

from sqlalchemy import ColumnElement, exists, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from services.core.outcome import Outcome
from services.core.quality import QualityFlag
from services.core.schemas import PatientIdentity
from services.registry.models import SEARCHED, HiddenStudy, SrDelivery, Study
from services.registry.models import Review as ReviewRow
from services.registry.records import (
    Delivery,
    Door,
    PipelineTask,
    Priority,
    ResultFileLink,
    Review,
    ReviewSummary,
    StageTimes,
    StudyFilter,
    StudyPage,
    StudyRecord,
    StudyState,
)
from services.registry.writes import IDENTITY_FIELDS

MAX_PAGE = 500
SEARCHED_COLUMNS = tuple(getattr(Study, name) for name in SEARCHED)


class BadCursor(ValueError):
    """A cursor this registry did not hand out."""


def to_record(row: Study) -> StudyRecord:
    identity_values = {name: getattr(row, name) for name in IDENTITY_FIELDS}
    identity = (
        PatientIdentity(**identity_values)
        if any(value is not None for value in identity_values.values())
        else None
    )
    return StudyRecord(
        id=row.id,
        task_id=row.task_id,
        report_index=row.report_index,
        door=Door(row.door),
        sender=row.sender,
        priority=Priority(row.priority),
        original_filename=row.original_filename,
        study_path=row.study_path,
        state=StudyState(row.state),
        stage=row.stage,
        progress=row.progress,
        adapter_id=row.adapter_id,
        received_at=row.received_at,
        queued_at=row.queued_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        processing_status=row.processing_status,
        outcome=Outcome(row.outcome) if row.outcome else None,
        probability_of_pathology=row.probability_of_pathology,
        pathology=row.pathology,
        most_dangerous_finding=row.most_dangerous_finding,
        findings=list(row.findings or []),
        failure_reason=row.failure_reason,
        warnings=list(row.warnings or []),
        model_version=row.model_version,
        demo_weights=row.demo_weights,
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        accession_number=row.accession_number,
        study_date=row.study_date,
        study_description=row.study_description,
        identity=identity,
        files=[ResultFileLink(**item) for item in row.files or []],
        content_sha256=row.content_sha256,
        purged_at=row.purged_at,
        quality_flags=[QualityFlag(name) for name in (row.quality_flags or "").split(",") if name],
        review=(
            ReviewSummary(
                reviewer=row.reviewed_by, reviewed_at=row.reviewed_at, agrees=row.review_agrees
            )
            if row.reviewed_by and row.reviewed_at is not None and row.review_agrees is not None
            else None
        ),
    )


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _contains(
    column: InstrumentedAttribute[str | None], pattern: str, dialect: str
) -> ColumnElement[bool]:
    """``pattern`` in ``column``, whatever the case. SQLite's LIKE ignores case already (for
    ASCII letters, as its lower() does), so ILIKE's lower() on each side would only add two
    function calls per column and row: a search that finds little tests every row (0002)."""
    if dialect == "sqlite":
        return column.like(pattern, escape="\\")
    return column.ilike(pattern, escape="\\")


def _conditions(wanted: StudyFilter, dialect: str) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    equal = {
        Study.patient_id: wanted.patient_id,
        Study.issuer_of_patient_id: wanted.issuer_of_patient_id,
        Study.accession_number: wanted.accession_number,
        Study.study_instance_uid: wanted.study_instance_uid,
        Study.sender: wanted.sender,
        Study.task_id: wanted.task_id,
    }
    conditions += [column == value for column, value in equal.items() if value is not None]
    if wanted.states:
        conditions.append(Study.state.in_([state.value for state in wanted.states]))
    if wanted.outcomes:
        conditions.append(Study.outcome.in_([outcome.value for outcome in wanted.outcomes]))
    if wanted.doors:
        conditions.append(Study.door.in_([door.value for door in wanted.doors]))
    if wanted.quality_flags:
        conditions.append(
            or_(*(Study.quality_flags.contains(f",{flag.value},") for flag in wanted.quality_flags))
        )
    if wanted.reviewed is not None:
        reviewed = Study.reviewed_at.is_not(None)
        conditions.append(reviewed if wanted.reviewed else ~reviewed)
    if wanted.received_from is not None:
        start = datetime.combine(wanted.received_from, time.min, tzinfo=UTC)
        conditions.append(Study.received_at >= start)
    if wanted.received_to is not None:
        end = datetime.combine(wanted.received_to + timedelta(days=1), time.min, tzinfo=UTC)
        conditions.append(Study.received_at < end)
    if wanted.text:
        pattern = _like(wanted.text.strip())
        matches = (_contains(column, pattern, dialect) for column in SEARCHED_COLUMNS)
        conditions.append(or_(*matches))
    if wanted.hidden_for is not None:
        hidden = exists().where(
            HiddenStudy.study_id == Study.id, HiddenStudy.viewer == wanted.hidden_for
        )
        conditions.append(~hidden)
    return conditions


def encode_cursor(row: StudyRecord) -> str:
    raw = json.dumps([row.received_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        when, study_id = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(when), int(study_id)
    except (ValueError, TypeError) as error:
        raise BadCursor("not a cursor of this listing") from error


def list_studies(
    session: Session, wanted: StudyFilter, *, limit: int, cursor: str | None = None
) -> StudyPage:
    """Newest first (received, then id); ``cursor`` continues after the previous page."""
    limit = max(1, min(limit, MAX_PAGE))
    query = select(Study).where(*_conditions(wanted, session.get_bind().dialect.name))
    if cursor is not None:
        when, study_id = decode_cursor(cursor)
        # After (when, study_id) in (received_at, id) order. The first term alone bounds the
        # index range: without it both databases scan the index from the newest row and
        # filter, and a page half a year back reads half the table (benchmarks/registry.py).
        query = query.where(
            Study.received_at <= when,
            or_(Study.received_at < when, Study.id < study_id),
        )
    query = query.order_by(Study.received_at.desc(), Study.id.desc()).limit(limit + 1)
    rows = [to_record(row) for row in session.scalars(query)]
    more = len(rows) > limit
    items = rows[:limit]
    return StudyPage(items=items, next=encode_cursor(items[-1]) if more else None)


def study(session: Session, task_id: str, report_index: int) -> StudyRecord | None:
    row = session.scalar(
        select(Study).where(Study.task_id == task_id, Study.report_index == report_index)
    )
    return None if row is None else to_record(row)


def task_studies(session: Session, task_id: str) -> list[StudyRecord]:
    rows = session.scalars(
        select(Study).where(Study.task_id == task_id).order_by(Study.report_index)
    )
    return [to_record(row) for row in rows]


def patient_studies(
    session: Session, patient_id: str, issuer: str | None, *, limit: int = 100
) -> list[StudyRecord]:
    """Every study of one patient (same PatientID and issuer), newest study date first."""
    query = select(Study).where(Study.patient_id == patient_id)
    query = query.where(
        Study.issuer_of_patient_id.is_(None)
        if issuer is None
        else Study.issuer_of_patient_id == issuer
    )
    query = query.order_by(Study.study_date.desc(), Study.received_at.desc()).limit(limit)
    return [to_record(row) for row in session.scalars(query)]


def earlier_upload(session: Session, content_sha256: str) -> StudyRecord | None:
    """The newest task of the same bytes that did not fail as a whole (a crash is worth a
    second try)."""
    row = session.scalar(
        select(Study)
        .where(
            Study.content_sha256 == content_sha256,
            Study.report_index == 0,
            Study.state != StudyState.FAILED.value,
        )
        .order_by(Study.received_at.desc())
        .limit(1)
    )
    return None if row is None else to_record(row)


def deliveries(session: Session, task_id: str) -> list[Delivery]:
    rows = session.scalars(
        select(SrDelivery)
        .where(SrDelivery.task_id == task_id)
        .order_by(SrDelivery.report_index, SrDelivery.destination)
    )
    return [Delivery.model_validate(row, from_attributes=True) for row in rows]


def pipeline_tasks(session: Session, *, limit: int = 10_000) -> list[PipelineTask]:
    """The tasks not finished yet (queued or processing), first queued first."""
    rows = session.execute(
        select(Study.task_id, Study.priority, Study.state, Study.stage, Study.started_at)
        .where(
            Study.report_index == 0,
            Study.state.in_([StudyState.QUEUED.value, StudyState.PROCESSING.value]),
        )
        .order_by(Study.queued_at, Study.id)
        .limit(limit)
    )
    return [
        PipelineTask(
            task_id=task_id,
            priority=Priority(priority),
            state=StudyState(state),
            stage=stage,
            started_at=started_at,
        )
        for task_id, priority, state, stage, started_at in rows
    ]


def stage_times(session: Session, *, recent: int = 20) -> StageTimes:
    """The median preparation (of tasks the model screened), model and check times of the
    most recent results that measured them, and the share of those that needed the model."""
    rows = session.execute(
        select(Study.prepare_seconds, Study.model_seconds, Study.check_seconds)
        .where(Study.report_index == 0, Study.prepare_seconds.is_not(None))
        .order_by(Study.finished_at.desc(), Study.id.desc())
        .limit(recent)
    ).all()
    if not rows:
        return StageTimes()
    modelled = [(prepare, model) for prepare, model, _ in rows if prepare is not None and model]
    # A check's time: measured where tasks were checked first, else a refusal's preparation
    # (it stops about where a check stops).
    checks = [check for _, _, check in rows if check is not None]
    checks = checks or [prepare for prepare, model, _ in rows if prepare is not None and not model]
    return StageTimes(
        prepare_s=statistics.median([p for p, _ in modelled]) if modelled else None,
        model_s=statistics.median([m for _, m in modelled]) if modelled else None,
        check_s=statistics.median(checks) if checks else None,
        model_share=len(modelled) / len(rows),
        samples=len(rows),
    )


def tasks_without_delivery(
    session: Session, *, doors: list[Door], destination: str, since: datetime, limit: int
) -> list[str]:
    """Finished tasks of those doors (since ``since``) whose SRs are not on their way to
    ``destination`` yet."""
    delivered = exists().where(
        SrDelivery.task_id == Study.task_id, SrDelivery.destination == destination
    )
    rows = session.execute(
        select(Study.task_id)
        .where(
            Study.report_index == 0,
            Study.door.in_([door.value for door in doors]),
            Study.state.in_([StudyState.DONE.value, StudyState.FAILED.value]),
            Study.finished_at >= since,
            ~delivered,
        )
        .order_by(Study.finished_at)
        .limit(limit)
    )
    return [task_id for (task_id,) in rows]


def earlier_reports_with_sr(session: Session, study_instance_uid: str) -> list[tuple[str, int]]:
    """(task id, report index) of every finished study of that StudyInstanceUID that has an
    SR of its own (``sr`` files are named ``study_<index + 1>_...``), oldest first; the batch's
    SRs (not sent to a PACS) left out."""
    rows = session.execute(
        select(Study.task_id, Study.report_index, Study.files)
        .where(
            Study.study_instance_uid == study_instance_uid,
            Study.state.in_([StudyState.DONE.value, StudyState.FAILED.value]),
            Study.door != Door.BATCH.value,
        )
        .order_by(Study.finished_at, Study.id)
    )
    found = []
    for task_id, index, files in rows:
        prefix = f"study_{index + 1:04d}_"
        names = [
            item.get("path", "").rsplit("/", 1)[-1]
            for item in files or []
            if item.get("kind") == "sr"
        ]
        if any(name.startswith(prefix) for name in names):
            found.append((task_id, index))
    return found


def reviews(session: Session, task_id: str, report_index: int) -> list[Review]:
    """Every review of the study, oldest first."""
    rows = session.execute(
        select(ReviewRow)
        .join(Study, Study.id == ReviewRow.study_id)
        .where(Study.task_id == task_id, Study.report_index == report_index)
        .order_by(ReviewRow.reviewed_at, ReviewRow.id)
    ).scalars()
    return [
        Review(
            task_id=task_id,
            report_index=report_index,
            reviewer=row.reviewer,
            agrees=row.agrees,
            pathology=row.pathology,
            findings=dict(row.findings or {}),
            comment=row.comment,
            reviewed_at=row.reviewed_at,
        )
        for row in rows
    ]
