"""Webhooks (``notifications.webhooks``): a paging system or RIS told of each study's first
result, without the patient's identity.

* What: one POST per study of the task and webhook, JSON (``WebhookPayload``): task id,
  study index, a link to the study, the call (PATHOLOGY, NORMAL, Not analysed, Failed),
  P(pathology), the most dangerous finding, the demo flag; the accession number only where
  the site turned it on for that receiver (DESIGN 12 counts it as identity).
* Signed: ``X-CTS-Signature: sha256=<hex HMAC-SHA256 of the body under the secret>``;
  ``X-CTS-Delivery`` (the outbox row's id: the same on every retry, for the receiver to
  drop a repeat) and ``X-CTS-Event: study.result``.
* When: the recorder adds the messages to the registry's outbox in the transaction that
  records the result (services/registry/outbox.py); ``WebhookSender`` sends them from a
  thread of its own, so a slow or broken receiver never holds a result back.
* Retries: a receiver that does not answer 2xx is tried again after the waits of
  ``notifications.backoff`` (services/core/retry.backoff_delay), kept in the outbox so that a
  restart goes on where it stopped; past its give_up_after_s the message is marked failed.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from loguru import logger
from pydantic import BaseModel, ConfigDict

from services.broker.schemas import StudyResult
from services.core.config import NotificationSettings, Webhook
from services.core.outcome import OUTCOME_WORDS, study_outcome
from services.core.retry import backoff_delay
from services.registry.outbox import NewNotification, Notification
from services.registry.registry import Registry

SIGNATURE_HEADER = "X-CTS-Signature"
DELIVERY_HEADER = "X-CTS-Delivery"
EVENT_HEADER = "X-CTS-Event"
EVENT = "study.result"
LEASE_MARGIN_S = 30.0  # beyond the POST's timeout: a sender that died gives its rows back


class WebhookPayload(BaseModel):
    """The body of a notification. Its fields are listed one by one (extra forbidden) so
    that nothing of the patient can join it by accident."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: str = EVENT
    task_id: str
    report_index: int
    link: str
    call: str  # PATHOLOGY | NORMAL | Not analysed | Failed
    pathology: bool | None
    probability_of_pathology: float | None
    most_dangerous_finding: str | None
    demo_weights: bool | None
    finished_at: datetime | None
    accession_number: str | None = None  # only with include_accession_number


def study_link(settings: NotificationSettings, task_id: str) -> str:
    base = (settings.link_base_url or "").rstrip("/")
    return f"{base}/?study={task_id}"


def notifications_of(settings: NotificationSettings, result: StudyResult) -> list[NewNotification]:
    """The outbox's messages of a result: one per study and webhook."""
    items = []
    for index, report in enumerate(result.reports):
        for webhook in settings.webhooks:
            payload = WebhookPayload(
                task_id=result.task_id,
                report_index=index,
                link=study_link(settings, result.task_id),
                call=OUTCOME_WORDS[study_outcome(report)],
                pathology=None if report.pathology is None else bool(report.pathology),
                probability_of_pathology=report.probability_of_pathology,
                most_dangerous_finding=report.most_dangerous_pathology_type,
                demo_weights=report.demo_weights,
                finished_at=result.finished_at,
                accession_number=report.accession_number
                if webhook.include_accession_number
                else None,
            )
            items.append(
                NewNotification(
                    task_id=result.task_id,
                    report_index=index,
                    url=webhook.url,
                    body=payload.model_dump_json(),
                )
            )
    return items


def signature(key: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def _host(url: str) -> str:
    """How logs name a receiver: its host, never a path or query that may hold a token."""
    return urlsplit(url).hostname or "?"


class WebhookSender:
    """Sends what the outbox holds, until stopped; one per recorder (several share the
    outbox through its leases)."""

    def __init__(self, settings: NotificationSettings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self._webhooks = {webhook.url: webhook for webhook in settings.webhooks}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
        self.sent = 0  # tests and logs

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(follow_redirects=False) as client:
            while not self._stop.is_set():
                try:
                    self.send_due(client)
                except Exception:  # noqa: BLE001 - a database outage pauses, never ends, the sender
                    logger.opt(exception=True).warning("webhook outbox not read; trying again")
                self._stop.wait(self.settings.poll_s)

    def send_due(self, client: httpx.Client) -> int:
        """One pass over the due messages; how many were delivered."""
        lease = max((w.timeout_s for w in self.settings.webhooks), default=0.0) + LEASE_MARGIN_S
        delivered = 0
        for notification in self.registry.outbox.claim(lease):
            if self._stop.is_set():
                break  # its lease gives it back
            delivered += int(self._send(client, notification))
        return delivered

    def _send(self, client: httpx.Client, notification: Notification) -> bool:
        webhook = self._webhooks.get(notification.url)
        if webhook is None:
            self.registry.outbox.finish(
                notification.id, error="the webhook is no longer configured", retry_at=None
            )
            return False
        error = self._post(client, webhook, notification)
        if error is None:
            self.registry.outbox.finish(notification.id, error=None, retry_at=None)
            self.sent += 1
            logger.info("webhook {} told of task {}", _host(webhook.url), notification.task_id)
            return True
        retry_at = self._retry_at(notification)
        logger.warning(
            "webhook {} for task {} failed ({}); {}",
            _host(webhook.url),
            notification.task_id,
            error,
            f"next attempt at {retry_at:%H:%M:%S}" if retry_at else "given up",
        )
        self.registry.outbox.finish(notification.id, error=error, retry_at=retry_at)
        return False

    def _post(
        self, client: httpx.Client, webhook: Webhook, notification: Notification
    ) -> str | None:
        body = notification.body.encode("utf-8")
        try:
            key = webhook.key()
        except OSError as error:
            return f"secret_file unreadable ({type(error).__name__})"
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(key, body),
            DELIVERY_HEADER: str(notification.id),
            EVENT_HEADER: EVENT,
        }
        try:
            answer = client.post(
                webhook.url, content=body, headers=headers, timeout=webhook.timeout_s
            )
        except httpx.HTTPError as error:
            return type(error).__name__
        if 200 <= answer.status_code < 300:
            return None
        return f"HTTP {answer.status_code}"

    def _retry_at(self, notification: Notification) -> datetime | None:
        """When to try again after this failure, or None past the backoff's give-up time."""
        backoff = self.settings.backoff
        now = datetime.now(UTC)
        wait = backoff_delay(backoff, notification.attempts + 1)
        retry_at = now + timedelta(seconds=wait)
        limit = backoff.give_up_after_s
        if limit is not None and (retry_at - notification.created_at).total_seconds() > limit:
            return None
        return retry_at
