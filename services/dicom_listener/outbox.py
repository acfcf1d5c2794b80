"""The persistent outbox of structured reports, one folder per destination (its name:
``destination_name``).

    <root>/dicom/outbox/<destination>/<task_id>_<name>.dcm          waiting to be sent
    <root>/dicom/outbox/<destination>/sent/<task_id>_<name>.json    sent (when, to whom)
    <root>/dicom/outbox/<destination>/failed/<task_id>_<name>.dcm   refused by the destination
                                                                    (+ .json with its status)

A report is copied in atomically; after the destination confirmed it (C-STORE or
STOW-RS) its "sent" marker is written and only then the copy removed, so a restart resends
nothing that was confirmed. (A stop between the confirm and the marker sends that one
report again on the next start: the SR's UIDs are derived from the task, so the
destination receives the same instance and keeps one.) A purge of the task
(services/registry/retention.py) may remove its items at any time, from another process.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from services.broker.schemas import utc_now
from services.broker.storage import write_atomically
from services.core.config import DimseDestination, ReportDestination
from services.dicom_listener.studies import DICOM_DIR

OUTBOX_DIR = "outbox"
SENT_DIR = "sent"
FAILED_DIR = "failed"
REPORT_SUFFIX = ".dcm"
STOW_RS_PREFIX = "stowrs_"
DEFAULT_HTTP_PORTS = {"http": 80, "https": 443}
MAX_STOW_RS_NAME = 120  # far below a file name's 255 bytes


class DeliveryNote(BaseModel):
    """What the outbox keeps of a sent or refused report."""

    model_config = ConfigDict(extra="forbid")

    destination: str
    at: str
    status: str


def destination_name(destination: ReportDestination) -> str:
    """The outbox folder of a destination: filesystem-safe, from its address only (never
    anything of a report), and different for the two kinds.

    DIMSE keeps the name it had before STOW-RS destinations existed,
    ``<AE title>@<host>_<port>``, so an upgraded listener goes on with the reports waiting
    there and its sent/ markers (nothing is migrated). STOW-RS is
    ``stowrs_<host>_<port>_<path>``. A DIMSE name always holds an "@" and a STOW-RS name
    never does, so a destination of one kind cannot take the folder of the other.
    """
    if isinstance(destination, DimseDestination):
        raw = f"{destination.ae_title}@{destination.host}_{destination.port}"
        return re.sub(r"[^A-Za-z0-9_.@-]+", "_", raw)
    url = urlsplit(destination.url)
    port = url.port or DEFAULT_HTTP_PORTS[url.scheme]
    raw = f"{STOW_RS_PREFIX}{url.hostname}_{port}_{url.path.strip('/')}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).rstrip("_")
    if len(name) > MAX_STOW_RS_NAME:  # a long path: cut, with a digest to keep it unique
        digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
        name = f"{name[: MAX_STOW_RS_NAME - len(digest) - 1]}_{digest}"
    return name


class Outbox:
    """The reports waiting for one destination."""

    def __init__(self, storage_root: Path, destination: ReportDestination) -> None:
        self.destination = destination
        self.name = destination_name(destination)
        self.directory = Path(storage_root) / DICOM_DIR / OUTBOX_DIR / self.name
        for folder in (self.directory, self.directory / SENT_DIR, self.directory / FAILED_DIR):
            folder.mkdir(parents=True, exist_ok=True)
        self._clear_sent_copies()

    def _sent_marker(self, item_name: str) -> Path:
        return self.directory / SENT_DIR / f"{Path(item_name).stem}.json"

    def _clear_sent_copies(self) -> None:
        """Copies whose marker exists: the listener stopped between the two steps."""
        for path in self.pending():
            if self._sent_marker(path.name).exists():
                path.unlink(missing_ok=True)

    def enqueue(self, task_id: str, report: Path) -> bool:
        """Put a copy of ``report`` in the outbox, unless it is there or was sent already."""
        name = f"{task_id}_{report.name}"
        target = self.directory / name
        if target.exists() or self._sent_marker(name).exists():
            return False
        if (self.directory / FAILED_DIR / name).exists():
            return False
        write_atomically(target, report.read_bytes())
        return True

    def pending(self) -> list[Path]:
        """Waiting reports, oldest first (one that a purge removes meanwhile left out)."""
        waiting = []
        for path in self.directory.glob(f"*{REPORT_SUFFIX}"):
            try:
                waiting.append((path.stat().st_mtime, path.name, path))
            except FileNotFoundError:
                continue
        return [path for _mtime, _name, path in sorted(waiting)]

    def mark_sent(self, item: Path, status: str) -> None:
        note = DeliveryNote(destination=self.name, at=utc_now().isoformat(), status=status)
        write_atomically(self._sent_marker(item.name), note.model_dump_json().encode())
        item.unlink(missing_ok=True)

    def mark_failed(self, item: Path, status: str) -> None:
        """A report the destination refused: kept aside (moving it back retries it)."""
        failed = self.directory / FAILED_DIR / item.name
        note = DeliveryNote(destination=self.name, at=utc_now().isoformat(), status=status)
        write_atomically(failed.with_suffix(".json"), note.model_dump_json().encode())
        try:
            shutil.move(item, failed)
        except FileNotFoundError:  # purged meanwhile (services/registry/retention.py)
            failed.with_suffix(".json").unlink(missing_ok=True)

    def sent_count(self) -> int:
        return sum(1 for _path in (self.directory / SENT_DIR).glob("*.json"))
