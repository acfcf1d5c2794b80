"""``python -m services.registry purge``: ``registry.retention_days`` applied.

A task received more than that many days ago (and finished) loses what identifies its
patient: its uploaded or received DICOM, the slice viewer's data, the previews, the SRs and
the per-study files (``uploads/<task>``, ``dicom/studies/<task>``, ``results/<task>/``) and
the DICOM listener's outbox items of its SRs (a copy waiting to be sent or refused, which
carries the patient's identity, and the notes of where each went); its stored result is
rewritten without the identity, the accession number and the file name; its registry rows
keep the times, the call, the findings and the model version, with the identity, the UIDs
(its SRs' deliveries' too) and the file name blanked (``purged_at`` says when).
"""

from __future__ import annotations

import getpass
import glob
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loguru import logger
from sqlalchemy import select

from services.broker.storage import (
    load_result,
    result_files_dir,
    store_result,
    upload_dir,
)
from services.core.config import Settings
from services.registry.audit import ActorKind, AuditAction, AuditEntry
from services.registry.import_storage import DICOM_STUDIES
from services.registry.models import Study
from services.registry.records import StudyState
from services.registry.registry import Registry
from services.registry.writes import IDENTITY_FIELDS

# services/dicom_listener/outbox.py: <root>/dicom/outbox/<destination>/<task>_<SR file>.dcm
# waiting, failed/ the refused ones (.dcm and a .json note), sent/ a .json note each; an SR
# file is study_<NNNN>_<hash>.dcm (services/sr/document.sr_file_name).
DICOM_OUTBOX = Path("dicom") / "outbox"
OUTBOX_FOLDERS = (".", "failed", "sent")
PURGED_NAME = "(purged)"
DELETED_NAME = "(deleted)"
BLANKED = (
    *IDENTITY_FIELDS,
    "accession_number",
    "study_description",
    "study_instance_uid",
    "series_instance_uid",
)


@dataclass
class PurgeOutcome:
    dry_run: bool
    cutoff: datetime | None
    tasks: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.cutoff is None:
            return "registry.retention_days is not set: every study is kept"
        verb = "would be purged" if self.dry_run else "purged"
        return f"{len(self.tasks)} task(s) received before {self.cutoff:%Y-%m-%d %H:%M} UTC {verb}"


def due_tasks(registry: Registry, cutoff: datetime) -> list[str]:
    """Finished tasks received before ``cutoff`` and not purged yet."""
    with registry.reading() as session:
        rows = session.execute(
            select(Study.task_id)
            .where(
                Study.report_index == 0,
                Study.received_at < cutoff,
                Study.purged_at.is_(None),
                Study.state.in_([StudyState.DONE.value, StudyState.FAILED.value]),
            )
            .order_by(Study.received_at)
        )
        return [task_id for (task_id,) in rows]


def outbox_items(root: Path, task_id: str) -> list[Path]:
    """The task's SRs in every destination's outbox (waiting, refused) and their notes."""
    pattern = f"{glob.escape(task_id)}_study_[0-9][0-9][0-9][0-9]_*"
    return [
        path
        for destination in sorted((root / DICOM_OUTBOX).glob("*/"))
        for folder in OUTBOX_FOLDERS
        for path in sorted((destination / folder).glob(pattern))
        if path.is_file()
    ]


def purge_task_files(settings: Settings, task_id: str, *, name: str = PURGED_NAME) -> None:
    root = settings.storage.root
    for folder in (
        upload_dir(root, task_id),
        root / DICOM_STUDIES / task_id,
        result_files_dir(root, task_id),
    ):
        shutil.rmtree(folder, ignore_errors=True)
    for item in outbox_items(root, task_id):
        item.unlink(missing_ok=True)
    result = load_result(root, task_id)
    if result is not None:
        reports = [
            report.model_copy(
                update={"identity": None, "accession_number": None, "path_to_study": name}
            )
            for report in result.reports
        ]
        store_result(
            root,
            result.model_copy(
                update={
                    "reports": reports,
                    "files": [],
                    "original_filename": name,
                    "study_path": "",
                }
            ),
        )


def delete_task(settings: Settings, registry: Registry, task_id: str) -> None:
    """An administrator's deletion of one task: what retention does to an old task, now (its
    files and identity go; the row keeps its times and call for the department's numbers)."""
    purge_task_files(settings, task_id, name=DELETED_NAME)
    registry.blank_task(task_id, purged_name=DELETED_NAME, fields=BLANKED)


def purge(
    settings: Settings, *, dry_run: bool = False, now: datetime | None = None
) -> PurgeOutcome:
    days = settings.registry.retention_days
    if days is None:
        return PurgeOutcome(dry_run=dry_run, cutoff=None)
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    registry = Registry.open(settings)
    try:
        outcome = PurgeOutcome(dry_run=dry_run, cutoff=cutoff, tasks=due_tasks(registry, cutoff))
        if dry_run:
            return outcome
        actor = getpass.getuser()
        for task_id in outcome.tasks:
            purge_task_files(settings, task_id)
            registry.blank_task(task_id, purged_name=PURGED_NAME, fields=BLANKED)
            registry.audit.record(
                AuditEntry(
                    actor=actor,
                    actor_kind=ActorKind.SYSTEM,
                    action=AuditAction.PURGE,
                    task_id=task_id,
                    detail=f"retention {days} days",
                )
            )
            logger.info("purged task {}", task_id)
    finally:
        registry.close()
    return outcome
