"""Intake: turn a zip, a folder or loose files into a list of candidate DICOM files.

Archives are hostile until proven otherwise. Every zip (and every zip inside it, up to
``max_nesting_depth``) is checked before and while it is unpacked:

* a member whose name is absolute, contains ``..`` or is a symbolic link is refused, and
  members are written to flat, generated names under ``work_dir`` so that nothing can land
  outside it whatever the archive says;
* the declared sizes are checked against the limits first, and the bytes actually written
  are counted while extracting, because declared sizes can lie;
* encrypted, truncated, corrupt and empty archives stop the input with a clear reason.

Files that are not DICOM are skipped and counted, DICOMDIR files are ignored and counted,
and a file without the 128-byte preamble is accepted when it parses as a DICOM data set
that carries the tags the pipeline needs.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pydicom
from loguru import logger

try:  # Intel ISA-L (python-isal): the same deflate format, inflated about twice as fast.
    from isal import isal_zlib
except ImportError:  # pragma: no cover - a dependency; zlib is the fallback where it is missing
    isal_zlib = None

from services.core.config import IntakeSettings
from services.core.schemas import IntakeSummary

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
PREAMBLE_LENGTH = 128
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # local file header, empty archive
CHUNK_BYTES = 1024 * 1024
# Small members legitimately compress very well (headers, text, blank images); they
# cannot exhaust anything, so the ratio guard only looks at members above this size.
RATIO_CHECK_MIN_BYTES = 1024 * 1024
# Tags a file without a preamble must carry to be taken for a DICOM image.
REQUIRED_TAGS_WITHOUT_PREAMBLE = ("Modality", "Rows", "Columns")
MAX_PROBLEMS_LISTED = 20
# Members are inflated by this many threads: zlib and ISA-L release the GIL while they
# inflate, which is most of the intake time of a deflate zip. Every member is still
# streamed and counted.
EXTRACT_THREADS = 2
# What the zipfile module raises for a damaged archive besides BadZipFile.
ZIP_STRUCTURE_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, struct.error)
# What a damaged deflate stream raises.
INFLATE_ERRORS: tuple[type[Exception], ...] = (
    (zlib.error,) if isal_zlib is None else (zlib.error, isal_zlib.error)
)
_ZLIB_INFLATE = type(zlib.decompressobj(-15))
_SAFE_NAME = re.compile(r"[^\w.\- ]+", re.UNICODE)


class IntakeError(Exception):
    """The input as a whole cannot be used; ``str(error)`` is the reason for the report."""

    def __init__(self, reason: str, summary: IntakeSummary | None = None) -> None:
        super().__init__(reason)
        self.summary = summary


@dataclass
class IntakeResult:
    dicom_files: list[Path]  # candidate DICOM files; archive members are extracted under work_dir
    summary: IntakeSummary


@dataclass
class _Budget:
    """Running totals shared by every archive of one input."""

    limits: IntakeSettings
    bytes_written: int = 0
    files_seen: int = 0
    archives_opened: int = 0
    # Members are extracted by several threads; the byte total must stay exact.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_file(self) -> None:
        self.files_seen += 1
        if self.files_seen > self.limits.max_files:
            raise IntakeError(
                f"the input holds more than {self.limits.max_files} files (intake.max_files)"
            )

    def add_bytes(self, count: int) -> None:
        with self.lock:
            self.bytes_written += count
            total = self.bytes_written
        if total > self.limits.max_uncompressed_bytes:
            raise IntakeError(
                "the input unpacks to more than "
                f"{_format_bytes(self.limits.max_uncompressed_bytes)} "
                "(intake.max_uncompressed_bytes)"
            )


@dataclass
class _Collector:
    work_dir: Path
    budget: _Budget
    summary: IntakeSummary = field(default_factory=IntakeSummary)
    dicom_files: list[Path] = field(default_factory=list)
    labels: dict[Path, str] = field(default_factory=dict)  # extracted file -> "archive/member"

    def label(self, path: Path) -> str:
        return self.labels.get(path, path.name)

    def note(self, problem: str) -> None:
        if len(self.summary.problems) < MAX_PROBLEMS_LISTED:
            self.summary.problems.append(problem)
        elif len(self.summary.problems) == MAX_PROBLEMS_LISTED:
            self.summary.problems.append("further problems not listed")


def collect_dicom_files(input_path: Path, work_dir: Path, limits: IntakeSettings) -> IntakeResult:
    """Find every candidate DICOM file of one input (zip, folder or single file).

    Raises IntakeError when the input cannot be used at all (missing, unsafe or broken
    archive, limits exceeded, no DICOM file found); the error carries the summary so far.
    """
    input_path = Path(input_path)
    work_dir = Path(work_dir)
    if not input_path.exists():
        raise IntakeError(f"input not found: {input_path.name}")
    work_dir.mkdir(parents=True, exist_ok=True)
    collector = _Collector(work_dir=work_dir.resolve(), budget=_Budget(limits))
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
    if not collector.dicom_files:
        raise IntakeError(_no_dicom_reason(summary), summary)
    logger.info(
        "intake: {} DICOM files, {} not DICOM, {} DICOMDIR, {} nested archives",
        summary.dicom_files,
        summary.skipped_non_dicom,
        summary.skipped_dicomdir,
        summary.nested_archives,
    )
    return IntakeResult(dicom_files=sorted(collector.dicom_files), summary=summary)


def _no_dicom_reason(summary: IntakeSummary) -> str:
    if summary.files_total == 0:
        return "no files found in the input"
    parts = []
    if summary.skipped_non_dicom:
        parts.append(f"{summary.skipped_non_dicom} not DICOM")
    if summary.skipped_dicomdir:
        parts.append(f"{summary.skipped_dicomdir} DICOMDIR")
    return f"no DICOM image files found ({summary.files_total} files: {', '.join(parts)})"


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


def _collect_file(path: Path, collector: _Collector, depth: int, top_level: bool) -> None:
    head = _read_head(path)
    if head[:4] in ZIP_MAGICS or (top_level and path.suffix.lower() == ".zip"):
        if not top_level:
            collector.summary.nested_archives += 1
        _collect_archive(path, collector, depth=depth + 1)
        return
    collector.budget.count_file()
    collector.summary.files_total += 1
    kind = classify_file(path, head)
    if kind == "dicom":
        collector.dicom_files.append(path)
    elif kind == "dicomdir":
        collector.summary.skipped_dicomdir += 1
    else:
        collector.summary.skipped_non_dicom += 1


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(PREAMBLE_LENGTH + 4)
    except OSError as error:
        raise IntakeError(f"cannot read {path.name}: {error.strerror}") from error


def classify_file(path: Path, head: bytes | None = None) -> str:
    """'dicom', 'dicomdir' or 'other' for one file, reading as little of it as possible."""
    if head is None:
        head = _read_head(path)
    has_preamble = head[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == b"DICM"
    if has_preamble:
        try:
            meta = pydicom.filereader.read_file_meta_info(path)
            # Values are parsed lazily: a damaged element raises here, not above.
            sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        except Exception:  # noqa: BLE001 - a file meta that does not parse is not DICOM
            return "other"
        if sop_class == DICOMDIR_SOP_CLASS:
            return "dicomdir"
        return "dicom"
    if path.name.upper() == "DICOMDIR":
        return "dicomdir"
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
        return "other"
    if all(keyword in dataset for keyword in REQUIRED_TAGS_WITHOUT_PREAMBLE):
        return "dicom"
    return "other"


def _collect_archive(archive_path: Path, collector: _Collector, depth: int) -> None:
    limits = collector.budget.limits
    name = collector.label(archive_path)
    if depth > limits.max_nesting_depth:
        raise IntakeError(
            f"archives are nested more than {limits.max_nesting_depth} levels deep "
            f"({name}; intake.max_nesting_depth)"
        )
    try:
        archive = zipfile.ZipFile(archive_path)
    except OSError as error:
        raise IntakeError(f"cannot open {name}: {error}") from error
    except NotImplementedError as error:  # e.g. "zip file version 15.5"
        raise IntakeError(f"{name} uses a zip feature that is not supported ({error})") from error
    except ZIP_STRUCTURE_ERRORS as error:
        # A damaged central directory surfaces as any of these (a name that is not UTF-8
        # despite its flag raises UnicodeDecodeError, a short record struct.error).
        raise IntakeError(
            f"{name} is not a readable zip archive (truncated or corrupt: {_error_text(error)})"
        ) from error
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if not members:
            raise IntakeError(f"{name} is an empty archive")
        _check_members(name, members, collector.budget)
        collector.budget.archives_opened += 1
        target = collector.work_dir / f"archive_{collector.budget.archives_opened:04d}"
        target.mkdir(parents=True, exist_ok=False)
        extracted_files = _extract_members(archive, name, members, target, collector.budget)
        for info, extracted in zip(members, extracted_files, strict=True):
            collector.labels[extracted] = f"{name}/{info.filename}"
            _collect_file(extracted, collector, depth=depth, top_level=False)
            head = _read_head(extracted) if extracted.exists() else b""
            if head[:4] in ZIP_MAGICS:
                # The nested archive's members were extracted; its own bytes are not needed.
                extracted.unlink(missing_ok=True)


def _check_members(name: str, members: list[zipfile.ZipInfo], budget: _Budget) -> None:
    """Refuse the archive before writing anything if any member is unsafe or over a limit."""
    limits = budget.limits
    declared_total = 0
    for info in members:
        member = info.filename
        if info.flag_bits & 0x1:
            raise IntakeError(f"{name} is encrypted (password-protected member {member!r})")
        unsafe = unsafe_member_reason(info)
        if unsafe:
            raise IntakeError(f"{name} has an unsafe member {member!r}: {unsafe}")
        if info.file_size > RATIO_CHECK_MIN_BYTES:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise IntakeError(
                    f"{name}: member {member!r} declares a compression ratio of {ratio:.0f}:1, "
                    f"above the {limits.max_compression_ratio:.0f}:1 limit (possible zip bomb)"
                )
        declared_total += info.file_size
    if budget.bytes_written + declared_total > limits.max_uncompressed_bytes:
        raise IntakeError(
            f"{name} declares {_format_bytes(declared_total)} of content, above the "
            f"{_format_bytes(limits.max_uncompressed_bytes)} limit (intake.max_uncompressed_bytes)"
        )
    if budget.files_seen + len(members) > limits.max_files:
        raise IntakeError(
            f"{name} holds {len(members)} files, above the {limits.max_files} limit "
            "(intake.max_files)"
        )


def unsafe_member_reason(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this member could write outside the target folder, or None if it is safe."""
    raw = info.filename
    if "\x00" in raw:
        return "the name contains a NUL byte"
    normalised = raw.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"^[A-Za-z]:", normalised):
        return "absolute path"
    if any(part == ".." for part in PurePosixPath(normalised).parts):
        return "path escapes the extraction folder ('..')"
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):  # 3: Unix
        return "symbolic link"
    return None


def _extract_members(
    archive: zipfile.ZipFile,
    archive_name: str,
    members: list[zipfile.ZipInfo],
    target: Path,
    budget: _Budget,
) -> list[Path]:
    """Extract every member (in parallel when there are several); their paths, in order.

    zipfile serialises the reads of the shared archive file, so each thread only inflates.
    The first failure stops the members not yet started and is raised once every running
    member has finished (a failing member removes its own partial file).
    """
    open_lock = threading.Lock()
    if len(members) < 2 or EXTRACT_THREADS < 2:
        return [
            _extract_member(archive, archive_name, info, target, index, budget, open_lock)
            for index, info in enumerate(members)
        ]
    stop = threading.Event()

    def extract(index: int) -> Path | None:
        if stop.is_set():
            return None
        try:
            return _extract_member(
                archive, archive_name, members[index], target, index, budget, open_lock
            )
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(max_workers=EXTRACT_THREADS, thread_name_prefix="unzip") as pool:
        futures = [pool.submit(extract, index) for index in range(len(members))]
    errors = [future.exception() for future in futures if future.exception() is not None]
    if errors:
        # The first member in archive order that failed: the same reason a serial run gives
        # whenever only one member is bad.
        raise errors[0]  # type: ignore[misc]
    paths = [future.result() for future in futures]
    return [path for path in paths if path is not None]


def _extract_member(
    archive: zipfile.ZipFile,
    archive_name: str,
    info: zipfile.ZipInfo,
    target: Path,
    index: int,
    budget: _Budget,
    open_lock: threading.Lock,
) -> Path:
    """Stream one member to a generated file name, counting the bytes really produced."""
    limits = budget.limits
    destination = target / f"{index:06d}_{_safe_basename(info.filename)}"
    # Belt and braces: the generated name is flat, but make sure of it.
    if destination.resolve().parent != target.resolve():
        raise IntakeError(f"{archive_name} has an unsafe member {info.filename!r}")
    written = 0
    try:
        with (
            _open_member(archive, info, open_lock) as source,
            destination.open("wb") as sink,
        ):
            while True:
                chunk = source.read(CHUNK_BYTES)
                if not chunk:
                    break
                written += len(chunk)
                budget.add_bytes(len(chunk))
                if written > info.file_size:
                    raise IntakeError(
                        f"{archive_name}: member {info.filename!r} unpacks to more than its "
                        f"declared {_format_bytes(info.file_size)} (declared sizes lie)"
                    )
                if (
                    written > RATIO_CHECK_MIN_BYTES
                    and written / max(info.compress_size, 1) > limits.max_compression_ratio
                ):
                    raise IntakeError(
                        f"{archive_name}: member {info.filename!r} expands more than "
                        f"{limits.max_compression_ratio:.0f}:1 (possible zip bomb)"
                    )
                sink.write(chunk)
    except IntakeError:
        destination.unlink(missing_ok=True)
        raise
    except RuntimeError as error:  # e.g. "File ... is encrypted, password required"
        destination.unlink(missing_ok=True)
        raise IntakeError(f"{archive_name}: cannot extract {info.filename!r}: {error}") from error
    except (*INFLATE_ERRORS, lzma.LZMAError) as error:
        destination.unlink(missing_ok=True)
        raise IntakeError(
            f"{archive_name} is truncated or corrupt (member {info.filename!r}: its compressed "
            f"data is damaged: {_error_text(error)})"
        ) from error
    except (*ZIP_STRUCTURE_ERRORS, OSError) as error:
        destination.unlink(missing_ok=True)
        raise IntakeError(
            f"{archive_name} is truncated or corrupt (member {info.filename!r}: "
            f"{_error_text(error)})"
        ) from error
    return destination


@contextmanager
def _open_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, lock: threading.Lock
) -> Iterator[zipfile.ZipExtFile]:
    """``archive.open(info)`` for one of several threads.

    Reads of the shared archive file are locked by zipfile itself, but opening and closing
    a member update the archive's count of open handles without a lock; a lost update
    could close the archive file under another thread's member.
    """
    with lock:
        source = archive.open(info)
    # zipfile inflates with zlib.decompressobj(-15); ISA-L's object has the same interface
    # (decompress with max_length, eof, unconsumed_tail, unused_data), and zipfile's own
    # size and CRC-32 checks still run on what it produces. Swapped before the first read,
    # and only where this CPython's ZipExtFile holds a zlib object; otherwise zlib stays.
    if isal_zlib is not None and isinstance(getattr(source, "_decompressor", None), _ZLIB_INFLATE):
        source._decompressor = isal_zlib.decompressobj(-15)
    try:
        yield source
    finally:
        with lock:
            source.close()


def _error_text(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _safe_basename(member_name: str) -> str:
    """The member's own file name, reduced to characters that are safe in one path component.

    Non-ASCII letters are kept (\\w is Unicode-aware); separators and control characters are
    not. The length is capped well below the 255-byte limit of common file systems.
    """
    base = member_name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _SAFE_NAME.sub("_", base).strip(" .") or "member"
    while len(cleaned.encode("utf-8")) > 120:
        cleaned = cleaned[:-1]
    return cleaned


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def _format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
