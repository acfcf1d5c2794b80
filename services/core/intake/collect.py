"""Intake: turn a zip, a tar, a folder or loose files into candidate DICOM and NIfTI files.

Archives are hostile until proven otherwise: zip_archive.py and tar_archive.py check every
member before and while it is written, and budget.py counts sizes and files across every
archive of the input (nested up to ``max_nesting_depth``). Archives and NIfTI files are
recognised by their content (zip and gzip magic, the tar header, the NIfTI magic), so a
renamed file is still what it is; a top-level input named ``.zip``/``.tar``/``.tgz`` that is
not readable as one fails with the archive's reason. Files that are not DICOM are skipped and counted,
DICOMDIR files are ignored and counted, and a file without the 128-byte preamble is accepted
when it parses as a DICOM data set that carries the tags the pipeline needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import pydicom
from loguru import logger
from pydicom.uid import MediaStorageDirectoryStorage

from services.core.config import IntakeSettings
from services.core.errors import IntakeError
from services.core.intake.budget import IntakeBudget
from services.core.intake.tar_archive import (
    GZIP_MAGIC,
    extract_tar,
    gzip_head,
    has_tar_suffix,
    is_tar_header,
)
from services.core.intake.zip_archive import ZIP_MAGICS, extract_zip
from services.core.nifti.reader import NIFTI2_HEADER_BYTES, nifti_version
from services.core.schemas import IntakeSummary

PREAMBLE_LENGTH = 128
# Enough of a file to tell DICOM (preamble + "DICM"), tar ("ustar" at 257) and NIfTI apart.
HEAD_BYTES = 1024
# Tags a file without a preamble must carry to be taken for a DICOM image.
REQUIRED_TAGS_WITHOUT_PREAMBLE = ("Modality", "Rows", "Columns")
MAX_PROBLEMS_LISTED = 20


class FileKind(str, Enum):
    DICOM = "dicom"
    DICOMDIR = "dicomdir"
    NIFTI = "nifti"
    OTHER = "other"


class ArchiveKind(str, Enum):
    ZIP = "zip"
    TAR = "tar"


@dataclass(frozen=True)
class NiftiFile:
    """A NIfTI volume found in the input: one study (services/core/nifti/study.py)."""

    path: Path  # where it is (archive members are extracted under work_dir)
    label: str  # its name within the input, e.g. "export.tar/CT/train_1_a_1.nii.gz"

    @property
    def name(self) -> str:
        return self.label.replace("\\", "/").rsplit("/", 1)[-1]

    @property
    def study_uid(self) -> str | None:
        """None until the header is read (the pipeline then derives one; nifti/study.py)."""
        return None


@dataclass
class IntakeResult:
    dicom_files: list[Path]  # candidate DICOM files; archive members are extracted under work_dir
    summary: IntakeSummary
    nifti_files: list[NiftiFile] = field(default_factory=list)


@dataclass
class _Collector:
    work_dir: Path
    budget: IntakeBudget
    summary: IntakeSummary = field(default_factory=IntakeSummary)
    dicom_files: list[Path] = field(default_factory=list)
    nifti_files: list[NiftiFile] = field(default_factory=list)
    labels: dict[Path, str] = field(default_factory=dict)  # extracted file -> "archive/member"

    def label(self, path: Path) -> str:
        return self.labels.get(path, path.name)

    def note(self, problem: str) -> None:
        if len(self.summary.problems) < MAX_PROBLEMS_LISTED:
            self.summary.problems.append(problem)
        elif len(self.summary.problems) == MAX_PROBLEMS_LISTED:
            self.summary.problems.append("further problems not listed")


def collect_dicom_files(input_path: Path, work_dir: Path, limits: IntakeSettings) -> IntakeResult:
    """Find every candidate DICOM and NIfTI file of one input (zip, tar, folder or file).

    Raises IntakeError when the input cannot be used at all (missing, unsafe or broken
    archive, limits exceeded, no DICOM or NIfTI file found); the error carries the summary
    so far.
    """
    input_path = Path(input_path)
    work_dir = Path(work_dir)
    if not input_path.exists():
        raise IntakeError(f"input not found: {input_path.name}")
    work_dir.mkdir(parents=True, exist_ok=True)
    collector = _Collector(work_dir=work_dir.resolve(), budget=IntakeBudget(limits))
    try:
        if input_path.is_dir():
            _collect_folder(input_path, collector, depth=0)
        elif input_path.is_file():
            _collect_file(input_path, collector, depth=0, top_level=True)
        else:
            raise IntakeError(f"input is neither a file nor a folder: {input_path.name}")
    except IntakeError as error:
        error.summary = collector.summary
        raise
    summary = collector.summary
    summary.dicom_files = len(collector.dicom_files)
    summary.nifti_files = len(collector.nifti_files)
    if not collector.dicom_files and not collector.nifti_files:
        raise IntakeError(_no_dicom_reason(summary), summary)
    logger.info(
        "intake: {} DICOM files, {} NIfTI files, {} not DICOM, {} DICOMDIR, {} nested archives",
        summary.dicom_files,
        len(collector.nifti_files),
        summary.skipped_non_dicom,
        summary.skipped_dicomdir,
        summary.nested_archives,
    )
    return IntakeResult(
        dicom_files=sorted(collector.dicom_files),
        summary=summary,
        nifti_files=sorted(collector.nifti_files, key=lambda nifti: nifti.label),
    )


def _no_dicom_reason(summary: IntakeSummary) -> str:
    if summary.files_total == 0:
        return "no files found in the input"
    parts = []
    if summary.skipped_non_dicom:
        parts.append(f"{summary.skipped_non_dicom} not DICOM")
    if summary.skipped_dicomdir:
        parts.append(f"{summary.skipped_dicomdir} DICOMDIR")
    return f"no DICOM image files or NIfTI volumes found ({summary.files_total} files: {', '.join(parts)})"


def _collect_folder(folder: Path, collector: _Collector, depth: int) -> None:
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_symlink():
                # A link in an input folder may point anywhere on the machine: never follow it.
                collector.summary.files_total += 1
                collector.summary.skipped_non_dicom += 1
                collector.note(f"symbolic link ignored: {_display(path, folder)}")
                continue
            _collect_file(path, collector, depth=depth, top_level=False)


def archive_kind(path: Path, head: bytes, *, top_level: bool) -> ArchiveKind | None:
    """Which archive a file is, from its content (or, for the input itself, its name)."""
    if head[:4] in ZIP_MAGICS:
        return ArchiveKind.ZIP
    if is_tar_header(head):
        return ArchiveKind.TAR
    if head[:2] == GZIP_MAGIC and is_tar_header(gzip_head(path)):
        return ArchiveKind.TAR
    if top_level and path.name.lower().endswith(".zip"):
        return ArchiveKind.ZIP
    if top_level and has_tar_suffix(path.name):
        return ArchiveKind.TAR
    return None


def _collect_file(path: Path, collector: _Collector, depth: int, top_level: bool) -> None:
    head = _read_head(path)
    archive = archive_kind(path, head, top_level=top_level)
    if archive is not None:
        if not top_level:
            collector.summary.nested_archives += 1
        _collect_archive(path, archive, collector, depth=depth + 1)
        return
    collector.budget.count_file()
    collector.summary.files_total += 1
    kind = classify_file(path, head)
    if kind == FileKind.DICOM:
        collector.dicom_files.append(path)
    elif kind == FileKind.NIFTI:
        collector.nifti_files.append(NiftiFile(path=path, label=collector.label(path)))
    elif kind == FileKind.DICOMDIR:
        collector.summary.skipped_dicomdir += 1
    else:
        collector.summary.skipped_non_dicom += 1


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(HEAD_BYTES)
    except OSError as error:
        raise IntakeError(f"cannot read {path.name}: {error.strerror}") from error


def classify_file(path: Path, head: bytes | None = None) -> FileKind:
    """What one file is, reading as little of it as possible."""
    if head is None:
        head = _read_head(path)
    if nifti_version(head) is not None:
        return FileKind.NIFTI
    if head[:2] == GZIP_MAGIC:
        inflated = gzip_head(path, NIFTI2_HEADER_BYTES)
        return FileKind.NIFTI if nifti_version(inflated) is not None else FileKind.OTHER
    has_preamble = head[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == b"DICM"
    if has_preamble:
        try:
            meta = pydicom.filereader.read_file_meta_info(path)
            # Values are parsed lazily: a damaged element raises here, not above.
            sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        except Exception:  # noqa: BLE001 - a file meta that does not parse is not DICOM
            return FileKind.OTHER
        if sop_class == MediaStorageDirectoryStorage:
            return FileKind.DICOMDIR
        return FileKind.DICOM
    if path.name.upper() == "DICOMDIR":
        return FileKind.DICOMDIR
    # No preamble: some exporters write the bare data set. Accept it only if it parses and
    # carries the tags an image needs; pydicom's force mode alone accepts almost anything.
    try:
        dataset = pydicom.dcmread(
            path,
            force=True,
            stop_before_pixels=True,
            specific_tags=list(REQUIRED_TAGS_WITHOUT_PREAMBLE),
        )
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return FileKind.OTHER
    if all(keyword in dataset for keyword in REQUIRED_TAGS_WITHOUT_PREAMBLE):
        return FileKind.DICOM
    return FileKind.OTHER


def _collect_archive(
    archive_path: Path, kind: ArchiveKind, collector: _Collector, depth: int
) -> None:
    limits = collector.budget.limits
    name = collector.label(archive_path)
    if depth > limits.max_nesting_depth:
        raise IntakeError(
            f"archives are nested more than {limits.max_nesting_depth} levels deep "
            f"({name}; intake.max_nesting_depth)"
        )
    collector.budget.archives_opened += 1
    target = collector.work_dir / f"archive_{collector.budget.archives_opened:04d}"
    extract = extract_zip if kind is ArchiveKind.ZIP else extract_tar
    for member, extracted in extract(archive_path, name, target, collector.budget):
        collector.labels[extracted] = f"{name}/{member}"
        _collect_file(extracted, collector, depth=depth, top_level=False)
        head = _read_head(extracted) if extracted.exists() else b""
        if archive_kind(extracted, head, top_level=False) is not None:
            # The nested archive's members were extracted; its own bytes are not needed.
            extracted.unlink(missing_ok=True)


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name
