"""The webhook outbox (table ``webhook_outbox``, migration 0006): notifications of a study's
first result, added in the transaction that records the result (so a result is never
recorded without them, nor they without it) and kept until delivered or given up.

Why the registry and not a spool folder: the result is recorded exactly once in the
registry, and several frontends (or ``python -m services.registry record``) on several
hosts share it; a row claimed with a lease is sent by one of them, and a sender that dies
mid-send leaves a row the lease gives back to the others after ``lease_s``.

``Registry.outbox`` is this module as one-transaction calls; services/registry/webhooks.py
sends.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import Enum

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.registry.account_book import Read, Write
from services.registry.models import LONG_TEXT, WebhookNotification

CLAIM_LIMIT = 20


class NotificationState(str, Enum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # given up: the backoff's give_up_after_s passed


class NewNotification(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str
    report_index: int
    url: str
    body: str  # the JSON that is sent


class Notification(NewNotification):
    id: int
    state: NotificationState
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_error: str
    finished_at: datetime | None


def add(session: Session, items: list[NewNotification], now: datetime) -> None:
    for item in items:
        session.add(
            WebhookNotification(
                **item.model_dump(),
                state=NotificationState.PENDING.value,
                attempts=0,
                created_at=now,
                next_attempt_at=now,
                last_error="",
            )
        )


def _notification(row: WebhookNotification) -> Notification:
    """The notification of a row: its columns of the same names (state as an enum)."""
    return Notification.model_validate(row, from_attributes=True)


def claim(session: Session, now: datetime, lease_s: float) -> list[Notification]:
    """The due notifications this sender takes: each moved ``lease_s`` into the future by a
    conditional update, so that a sender beside this one skips what this one took."""
    rows = session.scalars(
        select(WebhookNotification)
        .where(
            WebhookNotification.state == NotificationState.PENDING.value,
            WebhookNotification.next_attempt_at <= now,
        )
        .order_by(WebhookNotification.next_attempt_at, WebhookNotification.id)
        .limit(CLAIM_LIMIT)
    ).all()
    taken: list[Notification] = []
    leased_until = now + timedelta(seconds=lease_s)
    for row in rows:
        seen = row.next_attempt_at
        result = session.execute(
            update(WebhookNotification)
            .where(
                WebhookNotification.id == row.id,
                WebhookNotification.next_attempt_at == seen,
                WebhookNotification.state == NotificationState.PENDING.value,
            )
            .values(next_attempt_at=leased_until)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            taken.append(_notification(row))
    return taken


def finish(
    session: Session,
    notification_id: int,
    now: datetime,
    *,
    error: str | None,
    retry_at: datetime | None,
) -> None:
    """After one attempt: sent (``error`` None), due again at ``retry_at``, or given up."""
    row = session.get(WebhookNotification, notification_id)
    if row is None:
        return
    row.attempts += 1
    if error is None:
        row.state, row.finished_at = NotificationState.SENT.value, now
        return
    row.last_error = error[:LONG_TEXT]
    if retry_at is None:
        row.state, row.finished_at = NotificationState.FAILED.value, now
    else:
        row.next_attempt_at = retry_at


def of_task(session: Session, task_id: str) -> list[Notification]:
    rows = session.scalars(
        select(WebhookNotification)
        .where(WebhookNotification.task_id == task_id)
        .order_by(WebhookNotification.id)
    )
    return [_notification(row) for row in rows]


class WebhookOutbox:
    """``Registry.outbox``: each call one transaction."""

    def __init__(self, write: Write, read: Read) -> None:
        self._write = write
        self._read = read

    def claim(self, lease_s: float) -> list[Notification]:
        return self._write(lambda session, now: claim(session, now, lease_s))

    def finish(self, notification_id: int, *, error: str | None, retry_at: datetime | None) -> None:
        self._write(
            lambda session, now: finish(
                session, notification_id, now, error=error, retry_at=retry_at
            )
        )

    def of_task(self, task_id: str) -> list[Notification]:
        with self._read() as session:
            return of_task(session, task_id)
