"""``python -m services.batch --registry-url URL``: each input of the run recorded in a study
registry as a task of the ``batch`` door (who ran it, when, every study's result), so that a
department's batch runs show in the same worklist as its stack. A database without a schema
yet is given this code's; one with another schema is refused (services/registry)."""

from __future__ import annotations

import getpass
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from services.broker.schemas import StudyResult, TaskStatus
from services.core.schemas import StudyReport
from services.registry import Door, Registry, RegistrySchemaError, Submission
from services.registry.database import registry_address, upgrade

BATCH_ADAPTER = "batch"


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "batch"


class BatchRecorder:
    def __init__(self, url: str) -> None:
        address = registry_address(url)  # postgresql:// read with psycopg 3, as the stack does
        try:
            self.registry = Registry(address)
        except RegistrySchemaError as error:
            if "no schema yet" not in str(error):
                raise
            upgrade(address)
            self.registry = Registry(address)
        self.sender = _who()

    def begin(self, input_path: Path) -> tuple[str, datetime]:
        """The input as a queued task; its id and when it began."""
        task_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        self.registry.record_submission(
            Submission(
                task_id=task_id,
                door=Door.BATCH,
                sender=self.sender,
                original_filename=input_path.name,
                study_path=str(input_path),
                received_at=now,
                queued_at=now,
            )
        )
        return task_id, now

    def finish(
        self, task_id: str, input_path: Path, reports: Sequence[StudyReport], started: datetime
    ) -> None:
        finished = datetime.now(UTC)
        self.registry.record_result(
            StudyResult(
                task_id=task_id,
                status=TaskStatus.COMPLETED,
                reports=list(reports),
                original_filename=input_path.name,
                study_path=str(input_path),
                adapter_id=BATCH_ADAPTER,
                started_at=started,
                finished_at=finished,
                seconds=(finished - started).total_seconds(),
            )
        )

    def close(self) -> None:
        self.registry.close()
