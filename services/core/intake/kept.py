"""An intake kept on disk for a later preparation of the same input.

The adapter's preparation stage may check a task first and prepare it in full later, maybe
on another host (services/adapter/stages.py): the files the check unpacked stay in a folder
of the task's own on the shared storage, with this record of what the intake found, so the
full preparation does not unpack the input again; the folder goes with the task's prepared
folder once its result is stored. Paths are written relative to that folder or to the input
folder: another host may mount the shared storage elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Final

from services.core.config import IntakeSettings
from services.core.intake.collect import IntakeResult, NiftiFile, collect_dicom_files
from services.core.schemas import IntakeSummary

INTAKE_RECORD: Final = "intake.json"
UNPACKED_DIR: Final = "files"
_IN_KEPT, _IN_INPUT, _ELSEWHERE = "kept", "input", "absolute"


def kept_intake(input_path: Path, kept_dir: Path, limits: IntakeSettings) -> IntakeResult:
    """The intake kept in ``kept_dir``, else a new one unpacked and kept there.

    Two adapters may work the same task at once (one cut off from the broker while the
    broker gives the task to another): each unpacks into a folder of its own, which is
    renamed to ``kept_dir`` whole, record included; the later one finds it there and uses
    it. A kept intake is never changed, so nobody reads a folder being written or removed.
    """
    record = kept_dir / INTAKE_RECORD
    if record.is_file():
        return _load(record, input_path, kept_dir)
    own = kept_dir.with_name(f"{kept_dir.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        intake = collect_dicom_files(input_path, own / UNPACKED_DIR, limits)
        _save(own / INTAKE_RECORD, intake, input_path, own)
        try:
            os.rename(own, kept_dir)  # atomic; refused when another one is there already
        except OSError:
            if not record.is_file():
                raise
    finally:
        shutil.rmtree(own, ignore_errors=True)  # gone after the rename, or a loser's copy
    return _load(record, input_path, kept_dir)


def _where(path: Path, input_path: Path, kept_dir: Path) -> list[str]:
    for anchor, base in ((_IN_KEPT, kept_dir), (_IN_INPUT, input_path)):
        try:
            return [anchor, path.resolve().relative_to(base.resolve()).as_posix()]
        except ValueError:
            continue
    return [_ELSEWHERE, str(path)]


def _path(where: list[str], input_path: Path, kept_dir: Path) -> Path:
    anchor, text = where
    if anchor == _IN_KEPT:
        return kept_dir / text
    if anchor == _IN_INPUT:
        return input_path / text
    return Path(text)


def _save(record: Path, intake: IntakeResult, input_path: Path, kept_dir: Path) -> None:
    document = {
        "summary": intake.summary.model_dump(mode="json"),
        "dicom_files": [_where(path, input_path, kept_dir) for path in intake.dicom_files],
        "nifti_files": [
            {"where": _where(nifti.path, input_path, kept_dir), "label": nifti.label}
            for nifti in intake.nifti_files
        ],
    }
    partial = record.with_suffix(".partial")
    partial.write_text(json.dumps(document), encoding="utf-8")
    os.replace(partial, record)  # a reader sees the whole record or none


def _load(record: Path, input_path: Path, kept_dir: Path) -> IntakeResult:
    document = json.loads(record.read_text(encoding="utf-8"))
    return IntakeResult(
        dicom_files=[_path(where, input_path, kept_dir) for where in document["dicom_files"]],
        summary=IntakeSummary.model_validate(document["summary"]),
        nifti_files=[
            NiftiFile(path=_path(item["where"], input_path, kept_dir), label=item["label"])
            for item in document["nifti_files"]
        ],
    )
