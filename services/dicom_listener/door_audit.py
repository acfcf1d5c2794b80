"""The audit rows of the DICOM door: every association accepted or refused, and every
connection whose TLS handshake failed, in the registry's append-only audit trail.

The association's thread never waits for the database: ``record`` writes the row to a spool
folder (one small file, atomically; ``<root>/dicom/audit/``) and returns, and one thread
writes the spooled rows to the registry, oldest first, removing each file only after its
commit. While the database is away the rows wait on disk (retried with
``registry.unavailable_backoff``) and survive a restart of the listener; a crash between a
commit and the file's removal writes that row twice, which an append-only trail prefers to
losing it. A row that cannot even be spooled (the disk refuses) waits in memory and is
logged; only those still unwritten when the listener stops are lost, each counted in
``cts_dicom_audit_rows_lost_total`` and logged as an error, never silently.

Rows name the calling AE title, the peer's address and the reason: never patient data.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from contextlib import suppress
from pathlib import Path

from loguru import logger
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from services.broker.schemas import utc_now
from services.broker.storage import write_atomically
from services.core.config import Backoff
from services.core.errors import WorkInterrupted
from services.core.retry import log_retry, retrying_until_stopped
from services.dicom_listener.metrics import ListenerMetrics
from services.registry import Registry
from services.registry.audit import ActorKind, AuditAction, AuditEntry

AUDIT_DIR = "audit"
IDLE_POLL_S = 2.0
NO_ASSOCIATION = "(no association)"  # the actor of a connection that never got that far
# The database away, locked or unreachable: wait and write again. Any other error of the
# database would fail again: that row is set aside (logged and counted as lost).
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    PoolTimeout,
    OSError,
)


def door_entry(action: AuditAction, calling_ae: str, peer: str, detail: str) -> AuditEntry:
    return AuditEntry(
        actor=calling_ae or NO_ASSOCIATION,
        actor_kind=ActorKind.AE,
        action=action,
        client=peer,
        detail=detail,
        at=utc_now(),  # when it happened, however late the row is written
    )


class DoorAudit(threading.Thread):
    """``record(entry)`` from any thread; ``start()``, then ``stop()``."""

    def __init__(
        self, folder: Path, registry: Registry, backoff: Backoff, metrics: ListenerMetrics
    ) -> None:
        super().__init__(name="door-audit", daemon=True)
        self.folder = folder
        self.registry = registry
        self.backoff = backoff
        self.metrics = metrics
        self._unspooled: deque[AuditEntry] = deque()
        self._stopping = threading.Event()
        self._wake = threading.Event()

    def record(self, entry: AuditEntry) -> None:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        try:
            write_atomically(self.folder / name, entry.model_dump_json().encode())
        except OSError as error:
            logger.error("audit row not spooled ({}): kept in memory", type(error).__name__)
            self._unspooled.append(entry)
        self._count()
        self._wake.set()

    def _count(self) -> None:
        self.metrics.audit_pending.set(len(self.pending()) + len(self._unspooled))

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._write_all()
            except WorkInterrupted:
                break
            self._count()
            self._wake.wait(IDLE_POLL_S)
            self._wake.clear()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self.join(timeout_s)
        with suppress(WorkInterrupted):  # the last rows: one attempt each, else on disk
            self._write_all()
        if self._unspooled:
            lost = len(self._unspooled)
            self.metrics.audit_rows_lost.inc(lost)
            logger.error(
                "{} audit row(s) of the DICOM door lost: neither spooled nor written", lost
            )

    def _write_all(self) -> None:
        while self._unspooled:
            if not self._write(self._unspooled[0]):
                self.metrics.audit_rows_lost.inc()
            self._unspooled.popleft()
        for path in self.pending():
            try:
                entry = AuditEntry.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as error:
                self._set_aside(path, "unreadable", type(error).__name__)
                continue
            if self._write(entry):
                path.unlink()
                self._count()
            else:
                self._set_aside(path, "refused", "the database refused it")

    def _set_aside(self, path: Path, suffix: str, why: str) -> None:
        logger.error("audit row {} not written ({}): set aside as .{}", path.name, why, suffix)
        path.rename(path.with_suffix(f".{suffix}"))
        self.metrics.audit_rows_lost.inc()

    def _write(self, entry: AuditEntry) -> bool:
        """Commit one row, retrying while the database is away (WorkInterrupted on stop);
        False when the database refused it."""
        attempt = retrying_until_stopped(
            self._stopping,
            retry_on=UNAVAILABLE,
            backoff=self.backoff,
            before_sleep=log_retry("writing an audit row of the DICOM door"),
        )
        try:
            attempt(self.registry.audit.record, entry)
        except UNAVAILABLE as error:  # the last attempt, cut short by the stop
            raise WorkInterrupted("stopping") from error
        except SQLAlchemyError as error:
            logger.error("audit row refused by the database ({})", type(error).__name__)
            return False
        return True
