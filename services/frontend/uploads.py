"""Checks of uploaded files before anything is queued: sizes, declared unpacked sizes, names.

Refused here, not after a worker unpacked gigabytes: the adapter's intake would refuse the
same files anyway (same settings), but only after the upload took a queue slot.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from services.core.checksums import sha256_of as _file_sha256
from services.core.config import Settings
from services.frontend.metrics import Refusal

ZIP_SUFFIX = ".zip"
# Files that are a study (or a set of studies) on their own: each becomes one task.
SINGLE_FILE_SUFFIXES = (ZIP_SUFFIX, ".tar", ".tar.gz", ".tgz", ".nii", ".nii.gz")
UPLOAD_FILE_TYPES = [*SINGLE_FILE_SUFFIXES, ".dcm"]


def safe_file_name(name: str) -> str:
    """A file name without folders or odd characters (it becomes part of a storage path)."""
    base = Path(name.replace("\\", "/")).name
    cleaned = re.sub(r"[^\w.\-]+", "_", base).strip("._")
    return cleaned[:120] or "upload"


def human_bytes(count: int) -> str:
    if count >= 1024**3:
        return f"{count / 1024**3:.1f} GB"
    return f"{count / 1024**2:.1f} MB"


def declared_unpacked_bytes(path: Path) -> int | None:
    """The unpacked size a zip declares for its members (its central directory, read
    without unpacking); None if it is not a readable zip -- the worker then reports why."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


@dataclass
class UploadPlan:
    """What becomes a task: each archive or NIfTI file alone, the loose DICOM files of one
    upload together."""

    groups: list[list[Path]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # one line per refused file, with the reason
    refusals: list[Refusal] = field(default_factory=list)  # why, one per line (metrics)

    def refuse(self, reason: Refusal, line: str) -> None:
        self.refused.append(line)
        self.refusals.append(reason)


def plan_uploads(files: list[Path], settings: Settings) -> UploadPlan:
    plan = UploadPlan()
    limit_bytes = settings.frontend.max_upload_mb * 1024 * 1024
    unpacked_limit = settings.intake.max_uncompressed_bytes
    singles: list[Path] = []  # archives and NIfTI files: one task each
    loose: list[Path] = []
    for path in map(Path, files):
        size = path.stat().st_size if path.exists() else 0
        name = path.name
        if not path.is_file():
            plan.refuse(Refusal.NOT_ARRIVED, f"{name}: the upload did not arrive, please try again")
        elif size > limit_bytes:
            plan.refuse(
                Refusal.TOO_LARGE,
                f"{name}: {size / 1024**2:.0f} MB is over the "
                f"{settings.frontend.max_upload_mb} MB limit",
            )
        elif name.lower().endswith(SINGLE_FILE_SUFFIXES):
            # Only a zip declares its unpacked size up front; tars are counted by the intake.
            unpacked = declared_unpacked_bytes(path) if name.lower().endswith(ZIP_SUFFIX) else None
            if unpacked is not None and unpacked > unpacked_limit:
                plan.refuse(
                    Refusal.UNPACKED_TOO_LARGE,
                    f"{name}: {human_bytes(unpacked)} unpacked is over the "
                    f"{human_bytes(unpacked_limit)} limit per study "
                    "(intake.max_uncompressed_bytes)",
                )
            else:
                singles.append(path)
        else:
            loose.append(path)
    loose_bytes = sum(path.stat().st_size for path in loose)
    if loose_bytes > unpacked_limit:
        plan.refuse(
            Refusal.UNPACKED_TOO_LARGE,
            f"{len(loose)} DICOM files: {human_bytes(loose_bytes)} together is over the "
            f"{human_bytes(unpacked_limit)} limit per study (intake.max_uncompressed_bytes)",
        )
        loose = []
    plan.groups = [[path] for path in singles] + ([loose] if loose else [])
    return plan


def is_zip_group(group: list[Path]) -> bool:
    """A group of one archive or NIfTI file (stored under its own name, not as loose DICOM)."""
    return len(group) == 1 and group[0].name.lower().endswith(SINGLE_FILE_SUFFIXES)


def content_sha256(group: list[Path]) -> str:
    """The identity of an upload's bytes: a file's sha256, or for loose files the sha256 of
    their sorted sha256s (the same files in another order are the same upload)."""
    digests = sorted(_file_sha256(path) for path in group)
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def stored_bytes(path: Path) -> int:
    """The size of a stored upload: a file, or a folder of files."""
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def upload_audit_detail(door: str, priority: str, size_bytes: int) -> str:
    """An upload's audit row: the door, the priority and the size, never the file's name
    (names can hold a patient's; the trail is append-only and never purged)."""
    return f"{door} upload, {priority}, {size_bytes} bytes"
