"""``python -m services.registry import-storage``: every result already in a storage root
(``results/<task_id>.json``, from before the registry or from a time it could not be
reached) brought into the registry; run it again and nothing changes.

The door is read from where the study lies (``uploads/``: the web page or the REST API, told
apart by the upload folder's name; ``dicom/studies/``: the listener, with the calling AE
title from its batch record); anything else is marked ``import``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from services.broker.schemas import StudyResult
from services.broker.storage import RESULTS_DIR, load_result
from services.core.config import Settings
from services.registry.records import Door, Submission
from services.registry.registry import Registry

DICOM_STUDIES = Path("dicom") / "studies"


@dataclass
class ImportReport:
    results: int = 0
    recorded: int = 0
    already_known: int = 0
    unreadable: int = 0

    def summary(self) -> str:
        return (
            f"{self.results} result(s) in the storage: {self.recorded} recorded, "
            f"{self.already_known} already in the registry, {self.unreadable} unreadable"
        )


def _door_and_sender(storage_root: Path, result: StudyResult) -> tuple[Door, str | None]:
    if result.study_path.startswith(f"{DICOM_STUDIES.as_posix()}/"):
        record = storage_root / DICOM_STUDIES / f"{result.task_id}.json"
        sender = None
        try:
            from services.dicom_listener.studies import BatchRecord

            sender = BatchRecord.model_validate_json(record.read_bytes()).calling_ae
        except (OSError, ValueError):
            pass
        return Door.DICOM, sender
    if result.study_path.startswith("uploads/"):
        return Door.UPLOAD, None
    return Door.IMPORT, None


def import_storage(settings: Settings, registry: Registry | None = None) -> ImportReport:
    owned = registry is None
    registry = registry or Registry.open(settings)
    root = settings.storage.root
    report = ImportReport()
    try:
        for path in sorted((root / RESULTS_DIR).glob("*.json")):
            report.results += 1
            result = load_result(root, path.stem)
            if result is None:
                report.unreadable += 1
                continue
            door, sender = _door_and_sender(root, result)
            received = result.started_at or result.finished_at
            registry.record_submission(
                Submission(
                    task_id=result.task_id,
                    door=door,
                    sender=sender,
                    original_filename=result.original_filename,
                    study_path=result.study_path,
                    received_at=received,
                    queued_at=received,
                )
            )
            if registry.record_result(result):
                report.recorded += 1
            else:
                report.already_known += 1
    finally:
        if owned:
            registry.close()
    logger.info("import-storage: {}", report.summary())
    return report
