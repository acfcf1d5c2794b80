"""Safe extraction of zip archives: every member checked before and while it is written.

* a member whose name is absolute, contains ``..``, holds a NUL byte or is a symbolic link
  is refused, and members are written to flat, generated names in the target folder, so
  nothing can land outside it whatever the archive says;
* the declared sizes are checked against the limits first, and the bytes actually written
  are counted while extracting, because declared sizes can lie;
* encrypted, truncated, corrupt and empty archives stop the input with a clear reason.
"""

from __future__ import annotations

import importlib
import lzma
import re
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import IO

try:  # Intel ISA-L (python-isal): the same deflate format, inflated about twice as fast.
    isal_zlib: ModuleType | None = importlib.import_module("isal.isal_zlib")
except ImportError:  # pragma: no cover - a dependency; zlib is the fallback where it is missing
    isal_zlib = None

from services.core.errors import IntakeError
from services.core.intake.budget import IntakeBudget, format_bytes

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # local file header, empty archive
CHUNK_BYTES = 1024 * 1024
# Small members legitimately compress very well (headers, text, blank images); they
# cannot exhaust anything, so the ratio guard only looks at members above this size.
RATIO_CHECK_MIN_BYTES = 1024 * 1024
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
# The errors of a damaged member, besides IntakeError: one tuple for one except clause.
DAMAGED_MEMBER_ERRORS: tuple[type[Exception], ...] = (*INFLATE_ERRORS, lzma.LZMAError)
_ZLIB_INFLATE = type(zlib.decompressobj(-15))
_SAFE_NAME = re.compile(r"[^\w.\- ]+", re.UNICODE)


def extract_zip(
    archive_path: Path, name: str, target: Path, budget: IntakeBudget
) -> list[tuple[str, Path]]:
    """Check and extract one zip into ``target`` (created here); (member name, file) pairs.

    ``name`` is how reasons name the archive (its path inside the input).
    """
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
            f"{name} is not a readable zip archive (truncated or corrupt: {error_text(error)})"
        ) from error
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if not members:
            raise IntakeError(f"{name} is an empty archive")
        _check_members(name, members, budget)
        target.mkdir(parents=True, exist_ok=False)
        extracted = _extract_members(archive, name, members, target, budget)
    return [(info.filename, path) for info, path in zip(members, extracted, strict=True)]


def _check_members(name: str, members: list[zipfile.ZipInfo], budget: IntakeBudget) -> None:
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
            f"{name} declares {format_bytes(declared_total)} of content, above the "
            f"{format_bytes(limits.max_uncompressed_bytes)} limit (intake.max_uncompressed_bytes)"
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
    budget: IntakeBudget,
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
    for future in futures:
        error = future.exception()
        if error is not None:
            # The first member in archive order that failed: the same reason a serial run
            # gives whenever only one member is bad.
            raise error
    paths = [future.result() for future in futures]
    return [path for path in paths if path is not None]


def _extract_member(
    archive: zipfile.ZipFile,
    archive_name: str,
    info: zipfile.ZipInfo,
    target: Path,
    index: int,
    budget: IntakeBudget,
    open_lock: threading.Lock,
) -> Path:
    """Stream one member to a generated file name, counting the bytes really produced."""
    limits = budget.limits
    destination = target / f"{index:06d}_{safe_basename(info.filename)}"
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
                        f"declared {format_bytes(info.file_size)} (declared sizes lie)"
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
    except DAMAGED_MEMBER_ERRORS as error:
        destination.unlink(missing_ok=True)
        raise IntakeError(
            f"{archive_name} is truncated or corrupt (member {info.filename!r}: its compressed "
            f"data is damaged: {error_text(error)})"
        ) from error
    except (*ZIP_STRUCTURE_ERRORS, OSError) as error:
        destination.unlink(missing_ok=True)
        raise IntakeError(
            f"{archive_name} is truncated or corrupt (member {info.filename!r}: "
            f"{error_text(error)})"
        ) from error
    return destination


@contextmanager
def _open_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, lock: threading.Lock
) -> Iterator[IO[bytes]]:
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
        setattr(source, "_decompressor", isal_zlib.decompressobj(-15))  # noqa: B010
    try:
        yield source
    finally:
        with lock:
            source.close()


def error_text(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def safe_basename(member_name: str) -> str:
    """The member's own file name, reduced to characters that are safe in one path component.

    Non-ASCII letters are kept (\\w is Unicode-aware); separators and control characters are
    not. The length is capped well below the 255-byte limit of common file systems.
    """
    base = member_name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _SAFE_NAME.sub("_", base).strip(" .") or "member"
    while len(cleaned.encode("utf-8")) > 120:
        cleaned = cleaned[:-1]
    return cleaned
