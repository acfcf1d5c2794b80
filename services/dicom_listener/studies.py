"""Received instances grouped into batches, a batch closed into a StudyTask exactly once.

    <root>/dicom/studies/<task_id>/          the instances of one batch, as received
    <root>/dicom/studies/<task_id>.json      its record (BatchRecord): state, counts, task

A batch holds what arrived for one study until ``dicom.study_quiet_seconds`` passed without
a new instance; then it is closed: its record gets the StudyTask (by reference: the task's
study_path is the batch folder) and only then is the task published, and the record says so.
Every step is a record written atomically, so a restart of the listener picks up where it
stopped: a batch still receiving goes on receiving (its quiet time counts from its newest
file), a closed batch is published (again, with the same task id, if the listener stopped
between the broker's confirm and the record; adapters store one result per task id), a
published one waits for its result. Instances of a study that arrive after its batch closed
open a new batch, flagged as late (part 2, 3, ...).

Names on disk are task ids and hashes: no patient data, and no UID of the study either.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path

from loguru import logger
from pydantic import BaseModel, ConfigDict
from pydicom.filereader import read_file_meta_info

from services.broker.schemas import Priority, StudyTask, new_task_id, utc_now
from services.broker.storage import write_atomically
from services.dicom_listener.contexts import is_image
from services.dicom_listener.priority import more_urgent, study_priority

DICOM_DIR = "dicom"
STUDIES_DIR = "studies"
INSTANCE_SUFFIX = ".dcm"
SUBMITTED_BY = "dicom-listener"


class BatchState(str, Enum):
    RECEIVING = "receiving"  # instances may still come
    CLOSED = "closed"  # complete; its task is decided but not yet known to be published
    PUBLISHED = "published"  # the broker confirmed the task
    EXPORTED = "exported"  # its result's SRs are in the outbox of every destination
    DISCARDED = "discarded"  # not screened (too large, no image): the reason says why


class BatchRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str
    study_key: str  # a hash of the StudyInstanceUID
    calling_ae: str
    part: int  # 1: the study's first batch; 2, 3, ...: instances that came after it closed
    state: BatchState = BatchState.RECEIVING
    opened_at: datetime
    closed_at: datetime | None = None
    instances: int = 0
    images: int = 0
    bytes: int = 0
    oversized: bool = False
    reason: str | None = None
    task: StudyTask | None = None
    # The most urgent RequestedProcedurePriority of its instances (services/dicom_listener/priority.py).
    requested_priority: Priority | None = None

    @property
    def late(self) -> bool:
        return self.part > 1


def study_key(study_uid: str) -> str:
    return hashlib.sha256(study_uid.encode("utf-8")).hexdigest()[:20]


def instance_file_name(sop_instance_uid: str) -> str:
    """A UID is digits and dots; anything else (a hostile sender) is hashed."""
    if (
        sop_instance_uid
        and len(sop_instance_uid) <= 64
        and all(character.isdigit() or character == "." for character in sop_instance_uid)
    ):
        return sop_instance_uid.strip(".") + INSTANCE_SUFFIX
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:40] + INSTANCE_SUFFIX


def describe(record: BatchRecord) -> str:
    """The task's original_filename: where it came from, what it holds, whether it is late."""
    text = f"DICOM from {record.calling_ae}: {record.images} images"
    if record.late:
        text += f" (late instances after the study was complete, part {record.part})"
    return text


@dataclass
class _OpenBatch:
    record: BatchRecord
    last_at: float  # wall clock of the newest instance (restored from file times)
    in_flight: int = 0


@dataclass(frozen=True)
class InstanceSlot:
    """Where one incoming instance goes; handed back to :meth:`StudyBook.end_instance`."""

    task_id: str
    path: Path
    size: int
    replaces: bool  # the same SOP instance again in the same batch


class StudyBook:
    """Every batch of the listener (thread-safe): receiving ones in memory, all on disk."""

    def __init__(
        self,
        storage_root: Path,
        *,
        quiet_s: float,
        max_bytes: int,
        priorities: Mapping[str, str] | None = None,
    ) -> None:
        self.storage_root = Path(storage_root)
        self.priorities = dict(priorities or {})  # calling AE title -> priority
        self.directory = self.storage_root / DICOM_DIR / STUDIES_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.quiet_s = quiet_s
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._open: dict[str, _OpenBatch] = {}  # study key -> its receiving batch
        self._records: dict[str, BatchRecord] = {}  # task id -> record, not yet exported
        self._parts: dict[str, int] = {}  # study key -> batches so far
        self._load()

    # -- persistence ------------------------------------------------------------------------

    def folder(self, task_id: str) -> Path:
        return self.directory / task_id

    def _record_path(self, task_id: str) -> Path:
        return self.directory / f"{task_id}.json"

    def _save(self, record: BatchRecord) -> None:
        write_atomically(
            self._record_path(record.task_id), record.model_dump_json(indent=2).encode()
        )

    def _load(self) -> None:
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = BatchRecord.model_validate_json(path.read_bytes())
            except (OSError, ValueError) as error:
                logger.error("unreadable batch record {}: {}", path.name, type(error).__name__)
                continue
            self._parts[record.study_key] = max(self._parts.get(record.study_key, 0), record.part)
            if record.state is BatchState.RECEIVING:
                self._open[record.study_key] = self._restore(record)
            if record.state not in (BatchState.EXPORTED, BatchState.DISCARDED):
                self._records[record.task_id] = record
        if self._open:
            logger.info("{} studies were still arriving: their quiet time goes on", len(self._open))

    def _restore(self, record: BatchRecord) -> _OpenBatch:
        """A receiving batch after a restart: counts and newest arrival from its files."""
        last_at = record.opened_at.timestamp()
        instances = images = size = 0
        for path in self.folder(record.task_id).glob(f"*{INSTANCE_SUFFIX}"):
            try:
                meta = read_file_meta_info(path)
                stat = path.stat()
            except (OSError, ValueError):
                continue
            instances += 1
            images += is_image(str(meta.get("MediaStorageSOPClassUID", "")))
            size += stat.st_size
            last_at = max(last_at, stat.st_mtime)
        record.instances, record.images, record.bytes = instances, images, size
        return _OpenBatch(record=record, last_at=last_at)

    # -- receiving --------------------------------------------------------------------------

    def begin_instance(
        self,
        study_uid: str,
        sop_instance_uid: str,
        calling_ae: str,
        size: int,
        requested: Priority | None = None,
    ) -> InstanceSlot | None:
        """A slot for an instance of ``size`` bytes, or None when its study would pass
        ``max_bytes`` (the study is then refused as a whole when it closes)."""
        key = study_key(study_uid)
        with self._lock:
            batch = self._open.get(key)
            if batch is None:
                batch = self._open_batch(key, calling_ae)
            record = batch.record
            if requested is not None:
                known = record.requested_priority
                record.requested_priority = (
                    requested if known is None else more_urgent(known, requested)
                )
            path = self.folder(record.task_id) / instance_file_name(sop_instance_uid)
            replaces = path.exists()
            if record.bytes + size > self.max_bytes:
                if not record.oversized:
                    record.oversized = True
                    self._save(record)
                batch.last_at = time.time()
                return None
            record.bytes += size
            batch.in_flight += 1
            return InstanceSlot(record.task_id, path, size, replaces)

    def _open_batch(self, key: str, calling_ae: str) -> _OpenBatch:
        part = self._parts.get(key, 0) + 1
        self._parts[key] = part
        record = BatchRecord(
            task_id=new_task_id(),
            study_key=key,
            calling_ae=calling_ae,
            part=part,
            opened_at=utc_now(),
        )
        self.folder(record.task_id).mkdir(parents=True, exist_ok=True)
        self._save(record)
        self._records[record.task_id] = record
        batch = _OpenBatch(record=record, last_at=time.time())
        self._open[key] = batch
        if record.late:
            logger.warning(
                "study {}: instances after it was complete: batch {} (part {}) is a new task",
                key,
                record.task_id,
                part,
            )
        return batch

    def end_instance(self, slot: InstanceSlot, *, stored: bool, image: bool) -> None:
        with self._lock:
            record = self._records[slot.task_id]
            batch = self._open[record.study_key]
            batch.in_flight -= 1
            batch.last_at = time.time()
            if not stored or slot.replaces:
                record.bytes -= slot.size
            if stored and not slot.replaces:
                record.instances += 1
                record.images += int(image)

    # -- closing and the task's life ----------------------------------------------------------

    def close_due(self, now: float | None = None) -> list[BatchRecord]:
        """Close every batch quiet for ``quiet_s``: a StudyTask, or discarded with a reason."""
        now = time.time() if now is None else now
        closed: list[BatchRecord] = []
        with self._lock:
            for key, batch in list(self._open.items()):
                if batch.in_flight or now - batch.last_at < self.quiet_s:
                    continue
                del self._open[key]
                closed.append(self._close(batch.record))
        return closed

    def _close(self, record: BatchRecord) -> BatchRecord:
        record.closed_at = utc_now()
        if record.oversized:
            record.reason = f"larger than dicom.max_study_mb ({self.max_bytes // 1024**2} MB)"
        elif record.images == 0:
            record.reason = "no image: only structured reports or other non-image objects"
        if record.reason is not None:
            record.state = BatchState.DISCARDED
            shutil.rmtree(self.folder(record.task_id), ignore_errors=True)
            self._records.pop(record.task_id, None)
            logger.warning("study {} not screened: {}", record.study_key, record.reason)
        else:
            record.state = BatchState.CLOSED
            record.task = StudyTask(
                task_id=record.task_id,
                correlation_id=record.task_id,
                study_path=self.folder(record.task_id).relative_to(self.storage_root).as_posix(),
                original_filename=describe(record),
                reply_to=None,  # the result is read from storage (results/<task_id>.json)
                submitted_by=f"{SUBMITTED_BY} {'(late instances)' if record.late else ''}".strip(),
                priority=study_priority(
                    record.calling_ae, record.requested_priority, self.priorities
                ),
                late_instances=record.late,
            )
            logger.info(
                "study {} complete: task {} ({} instances, {} images{})",
                record.study_key,
                record.task_id,
                record.instances,
                record.images,
                ", late" if record.late else "",
            )
        self._save(record)
        return record

    def in_state(self, state: BatchState) -> list[BatchRecord]:
        with self._lock:
            return [record for record in self._records.values() if record.state is state]

    def advance(self, task_id: str, state: BatchState) -> None:
        """Record that a task was published, or its reports exported."""
        with self._lock:
            record = self._records[task_id]
            record.state = state
            self._save(record)
            if state is BatchState.EXPORTED:
                del self._records[task_id]

    def receiving(self) -> int:
        with self._lock:
            return len(self._open)
