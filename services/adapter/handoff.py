"""What the preparation stage leaves for the model stage: ``storage/prepared/<task_id>/``.

The folder holds one ``studyN.npy`` model input per study that needs the model (unless the
preparing adapter keeps it in memory for its own model stage, services/adapter/held_inputs.py)
and ``handoff.json`` (a :class:`PreparedTask`): every study's report so far, which input file
is its own, the SR evidence read while the source files existed (pydicom's JSON form), the side
files (previews, viewer) already written, and when the task started. ``handoff.json`` is
written last and atomically: a folder without it is an unfinished preparation, prepared
again on the next delivery. The model stage removes the folder once the task's result is
stored (a redelivery after that republishes the stored result and never needs it).

A task checked first and waiting in a preparation lane has a folder here too, before its
preparation: ``intake/`` (the input its check unpacked, used again by the preparation) and
``check.json`` (the check's time and delivery); both go with the folder.

The shared storage already holds the upload with its patient identity; the evidence here
is the same data, under a folder named by the task id only.
"""

from __future__ import annotations

import shutil
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset

from services.broker.schemas import ModelTask, StudyTask
from services.broker.storage import (
    HANDOFF_FILE,
    PREPARED_DIR,
    prepared_dir,
    relative_to_storage,
    result_json_path,
    write_atomically,
)
from services.core.arrays import ModelInput
from services.core.schemas import StudyReport
from services.sr.evidence import StudyEvidence

# A task checked first (services/adapter/stages.py) and waiting for its full preparation:
KEPT_INTAKE_DIR = "intake"  # its unpacked input (services/core/intake/kept.py)
CHECK_FILE = "check.json"  # how long its check took


class PreparedEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    report: StudyReport  # final when input_file is None, else waiting for the model's fields
    index: int
    n_studies: int
    input_file: str | None = None  # name of the .npy model input in the folder
    input_in_memory: bool = False  # not written: held by the preparing adapter (prepared_by)
    evidence: list[dict[str, Any]] | None = None  # the SR's source instances (pydicom JSON)


class PreparedTask(BaseModel):
    """The preparation stage's record of one task, complete once written."""

    model_config = ConfigDict(extra="forbid")

    task_id: str
    entries: list[PreparedEntry] = Field(default_factory=list)
    side_files: list[str] = Field(default_factory=list)  # relative to the storage root
    started_at: datetime
    prepare_seconds: float
    check_seconds: float | None = None  # of prepare_seconds: the task's check first
    prepared_by: str = ""


def model_input_name(index: int) -> str:
    return f"study{index + 1}.npy"


def save_model_input(folder: Path, name: str, model_input: ModelInput) -> None:
    """The study's model input as ``name`` (model_input_name: written whole, then renamed, so
    a reader never sees half a file). Each writer has a partial file of its own: two
    preparations of one task (a redelivery while the first still runs) never write into
    the same file, and the last complete one wins."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{name}.{uuid.uuid4().hex}.partial"
    started = time.perf_counter()
    try:
        with partial.open("wb") as handle:
            np.save(handle, model_input, allow_pickle=False)
        partial.replace(folder / name)
    finally:
        partial.unlink(missing_ok=True)  # only where the write or the rename failed
    # Fresh page-cache pages are slow on virtual machines with free page reporting: 0.21-0.52 s
    # for this file on 2026-12-06's EPYC, 0.03 s over pages freed moments before.
    logger.debug("model input written in {:.3f} s", time.perf_counter() - started)


def load_model_input(folder: Path, name: str) -> ModelInput | None:
    """The input written for the model stage; None if there is no such file."""
    try:
        array = np.load(folder / Path(name).name, allow_pickle=False)
    except FileNotFoundError:
        return None
    return np.ascontiguousarray(array, dtype=np.float32)


def evidence_to_json(evidence: StudyEvidence | None) -> list[dict[str, Any]] | None:
    if evidence is None:
        return None
    return [instance.to_json_dict() for instance in evidence.instances]


def evidence_from_json(items: list[dict[str, Any]] | None) -> StudyEvidence | None:
    if not items:
        return None
    return StudyEvidence(tuple(Dataset.from_json(item) for item in items))


def write_handoff(storage_root: Path, prepared: PreparedTask) -> Path:
    folder = prepared_dir(storage_root, prepared.task_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / HANDOFF_FILE
    # input_in_memory only where it is true: the release before it reads every other record.
    written = {
        index: {"input_in_memory"}
        for index, entry in enumerate(prepared.entries)
        if not entry.input_in_memory
    }
    record = prepared.model_dump_json(exclude={"entries": written} if written else None)
    write_atomically(path, record.encode("utf-8"))
    return path


def read_handoff(storage_root: Path, task_id: str) -> PreparedTask | None:
    """The task's complete preparation, or None (never prepared, or still unfinished)."""
    path = prepared_dir(storage_root, task_id) / HANDOFF_FILE
    try:
        return PreparedTask.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None


def model_task(
    storage_root: Path, task: StudyTask, prepared: PreparedTask, *, attempt: int
) -> ModelTask:
    return ModelTask(
        task=task,
        prepared_path=relative_to_storage(
            storage_root, prepared_dir(storage_root, prepared.task_id)
        ),
        prepared_by=prepared.prepared_by,
        prepare_attempt=attempt,
    )


def remove_prepared(storage_root: Path, task_id: str) -> None:
    shutil.rmtree(prepared_dir(storage_root, task_id), ignore_errors=True)


def kept_intake_dir(storage_root: Path, task_id: str) -> Path:
    """Where a task checked first keeps its unpacked input for its full preparation."""
    return prepared_dir(storage_root, task_id) / KEPT_INTAKE_DIR


class CheckRecord(BaseModel):
    """What a task waiting in its preparation lane brings to its full preparation: its
    check first (passed), or its send-back from the model stage (its model input gone)."""

    model_config = ConfigDict(extra="forbid")

    seconds: float  # counted in the preparation's time, which the wait estimates read
    attempt: int  # the delivery that checked or sent it back: the next ones count on


def record_check(storage_root: Path, task_id: str, record: CheckRecord) -> None:
    path = prepared_dir(storage_root, task_id) / CHECK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, record.model_dump_json().encode("utf-8"))


def read_check(storage_root: Path, task_id: str) -> CheckRecord | None:
    """The task's passed check, or None (not checked first, or never passed)."""
    try:
        return CheckRecord.model_validate_json(
            (prepared_dir(storage_root, task_id) / CHECK_FILE).read_bytes()
        )
    except FileNotFoundError:
        return None


def sweep_prepared(storage_root: Path) -> list[str]:
    """Remove the prepared folders of tasks whose result is stored; returns their task ids.

    The model stage removes a task's folder right after storing its result, but an adapter
    killed in between, or a task given up in its preparation (its FAILED result stored by
    the delivery rules), leaves the folder: the model inputs, 221 MB each. A stored result
    is final (services/broker/storage.py), so nothing reads the folder again.
    """
    try:
        names = [path.name for path in (Path(storage_root) / PREPARED_DIR).iterdir()]
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        if result_json_path(storage_root, name).exists():
            shutil.rmtree(Path(storage_root) / PREPARED_DIR / name, ignore_errors=True)
            removed.append(name)
    if removed:
        logger.warning("removed the prepared folders of {} finished task(s)", len(removed))
    return removed
