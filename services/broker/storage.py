"""Where the stack keeps studies and results on the shared storage volume.

    <root>/uploads/<task_id>/<file>      what a frontend received (tasks point here)
    <root>/results/<task_id>.json        the StudyResult, exactly as sent to reply_to
    <root>/results/<task_id>/            output.xlsx, warnings_and_errors.txt, json/, previews/
    <root>/prepared/<task_id>/handoff.json  a prepared task for the model stage
                                         (services/adapter/handoff.py)

A result file is written atomically (temporary file + rename): a reader sees the whole
document or none, and its presence means the task is finished (adapters republish it
instead of recomputing when a task is redelivered). Adapters store with
:func:`store_result_once`: when two of them finished the same task (a redelivery while the
first was still working, e.g. after a broker restart), the first stored result stays the
task's one result and both publish that same document.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from services.broker.schemas import StudyResult, check_safe_id

UPLOADS_DIR = "uploads"
RESULTS_DIR = "results"
PREPARED_DIR = "prepared"
HANDOFF_FILE = "handoff.json"


def result_json_path(storage_root: Path, task_id: str) -> Path:
    return Path(storage_root) / RESULTS_DIR / f"{task_id}.json"


def result_files_dir(storage_root: Path, task_id: str) -> Path:
    return Path(storage_root) / RESULTS_DIR / task_id


DELIVERED_MARK = ".delivered"


def delivered_mark_path(storage_root: Path, task_id: str) -> Path:
    """Present once the broker confirmed the task's result to the registry's queue and to the
    submitter named in it: a later delivery of the same task to the same submitter (its ack
    was lost with a connection) is acked without sending the result again."""
    return result_files_dir(storage_root, check_safe_id(task_id)) / DELIVERED_MARK


def mark_delivered(storage_root: Path, task_id: str, reply_to: str | None) -> None:
    write_atomically(delivered_mark_path(storage_root, task_id), (reply_to or "").encode())


def was_delivered(storage_root: Path, task_id: str, reply_to: str | None) -> bool:
    """Whether the result went to this submitter before (another submitter of the same task
    still gets it)."""
    try:
        return delivered_mark_path(storage_root, task_id).read_bytes() == (reply_to or "").encode()
    except OSError:
        return False


def prepared_dir(storage_root: Path, task_id: str) -> Path:
    return Path(storage_root) / PREPARED_DIR / check_safe_id(task_id)


def handoff_path(storage_root: Path, task_id: str) -> Path:
    """Present once the task's preparation is complete (written last, atomically)."""
    return prepared_dir(storage_root, task_id) / HANDOFF_FILE


def upload_dir(storage_root: Path, task_id: str) -> Path:
    return Path(storage_root) / UPLOADS_DIR / task_id


def relative_to_storage(storage_root: Path, path: Path) -> str:
    return Path(path).resolve().relative_to(Path(storage_root).resolve()).as_posix()


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def store_result(storage_root: Path, result: StudyResult) -> Path:
    path = result_json_path(storage_root, result.task_id)
    write_atomically(path, result.model_dump_json(indent=2).encode("utf-8"))
    return path


def store_result_once(storage_root: Path, result: StudyResult) -> StudyResult:
    """Store ``result`` unless the task already has one; return the task's stored result.

    The document is written to a temporary file and hard-linked to its final name: the link
    fails if the name exists, so exactly one writer wins even between processes and hosts
    sharing the volume (NFS and local file systems create links atomically).
    """
    path = result_json_path(storage_root, result.task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(result.model_dump_json(indent=2).encode("utf-8"))
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            existing = load_result(storage_root, result.task_id)
            if existing is not None:
                return existing
            # An unreadable leftover (an incompatible version): this result replaces it.
            os.replace(temporary, path)
            return result
    finally:
        Path(temporary).unlink(missing_ok=True)
    return result


def load_result(storage_root: Path, task_id: str) -> StudyResult | None:
    """The stored result of a task, or None when there is none (or it is unreadable)."""
    path = result_json_path(storage_root, task_id)
    try:
        return StudyResult.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        # A result written by an incompatible version: recompute rather than crash.
        return None
