"""The audit trail: who did what to which study, from where.

Every door writes one row per action (sign-ins, lists, views, downloads, uploads, reviews,
hides, deletions, purges, account changes, DICOM associations). The table is append-only:
the database refuses UPDATE and DELETE (migration 0004). A row names a study by its task id
and StudyInstanceUID only, never by the patient's identity.

    python -m services.registry audit --since 2026-12-01 --actor jdoe --format jsonl
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from datetime import datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.registry.models import UID_LENGTH, AuditEvent

DETAIL_CHARACTERS = 500  # the column's room; a longer detail is cut, never refused


class AuditAction(str, Enum):
    SIGN_IN = "sign_in"
    SIGN_IN_FAILED = "sign_in_failed"
    SIGN_IN_LOCKED = "sign_in_locked"  # a correct or wrong password while locked out
    SIGN_OUT = "sign_out"
    LIST = "list"  # a worklist page or a REST listing
    VIEW_STUDY = "view_study"
    VIEW_IMAGES = "view_images"
    DOWNLOAD_XLSX = "download_xlsx"
    DOWNLOAD_JSON = "download_json"
    DOWNLOAD_SR = "download_sr"
    DOWNLOAD_FILE = "download_file"  # any other file of a study (a preview, a NIfTI)
    UPLOAD = "upload"
    REVIEW = "review"
    HIDE = "hide"
    UNHIDE = "unhide"
    DELETE = "delete"
    PURGE = "purge"
    USER_ADDED = "user_added"
    USER_DISABLED = "user_disabled"
    USER_ENABLED = "user_enabled"
    ROLE_CHANGED = "role_changed"
    PASSWORD_RESET = "password_reset"
    KEY_ADDED = "key_added"
    KEY_REVOKED = "key_revoked"
    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REFUSED = "association_refused"
    ACCESS_REFUSED = "access_refused"  # an authenticated request its role does not allow


class ActorKind(str, Enum):
    USER = "user"  # a person signed in (a local account or OIDC)
    KEY = "key"  # a system with an API key
    AE = "ae"  # a DICOM application entity, by its calling AE title
    SYSTEM = "system"  # the stack itself (retention) or a command at the server's console
    ANONYMOUS = "anonymous"  # a failed sign-in names the account tried, not a person


class AuditEntry(BaseModel):
    """One row of the trail, as written and as read back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actor: str
    actor_kind: ActorKind
    action: AuditAction
    task_id: str | None = None
    study_instance_uid: str | None = None
    client: str | None = None  # the peer's address (IP, or IP:port for DICOM)
    detail: str = ""
    at: datetime | None = None  # set by the registry when written


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    since: datetime | None = None
    actor: str | None = None
    task_id: str | None = None
    actions: tuple[AuditAction, ...] = ()
    limit: int = 10_000
    newest_first: bool = False  # the admin page: the latest rows


def record(session: Session, entry: AuditEntry, now: datetime) -> None:
    session.add(
        AuditEvent(
            at=entry.at or now,
            actor=entry.actor[:128],
            actor_kind=entry.actor_kind.value,
            action=entry.action.value,
            # Bounded like the columns: a refusal names what the caller asked for, which may
            # be longer than any real id, and must still be written.
            task_id=(entry.task_id or None) and entry.task_id[:UID_LENGTH],
            study_instance_uid=(entry.study_instance_uid or None)
            and entry.study_instance_uid[:UID_LENGTH],
            client=(entry.client or None) and entry.client[:128],
            detail=entry.detail[:DETAIL_CHARACTERS],
        )
    )


def events(session: Session, query: AuditQuery) -> list[AuditEntry]:
    """The rows that match, oldest first (or newest first)."""
    order = (
        (AuditEvent.at.desc(), AuditEvent.id.desc())
        if query.newest_first
        else (
            AuditEvent.at,
            AuditEvent.id,
        )
    )
    statement = select(AuditEvent).order_by(*order)
    if query.since is not None:
        statement = statement.where(AuditEvent.at >= query.since)
    if query.actor is not None:
        statement = statement.where(AuditEvent.actor == query.actor)
    if query.task_id is not None:
        statement = statement.where(AuditEvent.task_id == query.task_id)
    if query.actions:
        statement = statement.where(AuditEvent.action.in_([a.value for a in query.actions]))
    return [_entry(row) for row in session.scalars(statement.limit(query.limit))]


def _entry(row: AuditEvent) -> AuditEntry:
    """The entry of a row: its columns of the same names (actor kind and action as enums)."""
    return AuditEntry.model_validate(row, from_attributes=True)


EXPORT_FIELDS = (
    *("time", "actor", "actor_kind", "action"),
    *("task_id", "study_instance_uid", "client", "detail"),
)


def export_row(entry: AuditEntry) -> dict[str, str | None]:
    """The documented columns (README "Security"): time in ISO 8601 with its offset."""
    return {
        "time": entry.at.isoformat() if entry.at else None,
        "actor": entry.actor,
        "actor_kind": entry.actor_kind.value,
        "action": entry.action.value,
        "task_id": entry.task_id,
        "study_instance_uid": entry.study_instance_uid,
        "client": entry.client,
        "detail": entry.detail,
    }


def as_csv(entries: Iterable[AuditEntry]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow(export_row(entry))
    return out.getvalue()


def as_jsonl(entries: Iterable[AuditEntry]) -> str:
    return "".join(json.dumps(export_row(entry)) + "\n" for entry in entries)
