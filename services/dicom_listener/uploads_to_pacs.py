"""``dicom.send_uploads_to_pacs``: the SRs of studies uploaded through the web page or the
REST API go to the destinations too, found in the study registry (finished tasks of those
doors whose SRs are not on their way to a destination yet). Each SR enqueued is recorded as
a delivery, so it is found once; a task without an SR (a NIfTI study, a broken upload) is
recorded as having none.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from services.broker.storage import load_result
from services.dicom_listener.outbox import Outbox
from services.registry import Door, Registry
from services.registry.records import Delivery

UPLOAD_DOORS = [Door.UPLOAD, Door.REST]
# An upload finished longer ago than this is not sent when the option is turned on later.
UPLOAD_WINDOW = timedelta(days=7)
LOOK_EVERY_S = 5.0  # the registry is asked this often
NO_REPORT = "none"  # the delivery state of a task that has no SR to send
# <task_id>_study_<NNNN>_<hash>.dcm: an outbox item (services/sr/document.sr_file_name)
_ITEM = re.compile(r"^(?P<task>[A-Za-z0-9][A-Za-z0-9_-]*?)_study_(?P<number>\d{4})_")


def report_position(item_name: str) -> tuple[str, int] | None:
    """(task id, report index) of an outbox item, or None for a name of another form."""
    match = _ITEM.match(item_name)
    if match is None:
        return None
    return match["task"], int(match["number"]) - 1


class UploadsToPacs:
    def __init__(self, storage_root: Path, registry: Registry, outboxes: Sequence[Outbox]) -> None:
        self.storage_root = storage_root
        self.registry = registry
        self.outboxes = list(outboxes)
        self._next_look = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + LOOK_EVERY_S
        return True

    def collect(self) -> list[tuple[str, list[Path]]]:
        """(task id, its SR files) of every upload not yet on its way to some destination."""
        since = datetime.now(UTC) - UPLOAD_WINDOW
        found: dict[str, list[Path]] = {}
        try:
            for outbox in self.outboxes:
                for task_id in self.registry.tasks_without_delivery(
                    doors=UPLOAD_DOORS, destination=outbox.name, since=since
                ):
                    result = load_result(self.storage_root, task_id)
                    if result is not None:
                        found[task_id] = [
                            self.storage_root / item.path for item in result.files_of_kind("sr")
                        ]
        except SQLAlchemyError as error:
            logger.warning("uploads' SRs not looked for: {}", type(error).__name__)
        return list(found.items())

    def record_none(self, task_id: str, destination: str) -> None:
        try:
            self.registry.record_delivery(
                Delivery(
                    task_id=task_id,
                    report_index=0,
                    destination=destination,
                    state=NO_REPORT,
                    updated_at=datetime.now(UTC),
                )
            )
        except SQLAlchemyError as error:
            logger.warning("task {}: no SR, not recorded: {}", task_id, type(error).__name__)
