"""Safe extraction of tar archives (``.tar``, ``.tar.gz``, ``.tgz``), as strict as the zips.

The archive is read as a stream, once: a gzip-compressed tar cannot be sought cheaply, and
its member list is only known after the whole stream was inflated. So every member is checked
when its header arrives, before any of its bytes are written:

* only regular files are extracted; symbolic and hard links, device files, FIFOs and sparse
  members are refused (a link may point anywhere on the machine, a device file reads
  forever, a sparse member declares gigabytes it does not carry);
* a name that is absolute, contains ``..`` or a NUL byte is refused, and members are
  written to flat, generated names in the target folder whatever the archive says;
* the bytes actually written are counted against the input's budget while extracting, and
  for a compressed tar the stream's inflation ratio (bytes out / compressed bytes read) is
  checked against ``max_compression_ratio`` as it goes: a tar bomb stops early;
* a truncated, corrupt or empty archive stops the input with a clear reason.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from services.core.errors import IntakeError
from services.core.intake.budget import IntakeBudget, format_bytes
from services.core.intake.zip_archive import (
    CHUNK_BYTES,
    RATIO_CHECK_MIN_BYTES,
    error_text,
    safe_basename,
)

GZIP_MAGIC = b"\x1f\x8b"
# POSIX ustar and GNU tar headers carry "ustar" at byte 257 of the first block.
TAR_MAGIC_OFFSET = 257
TAR_MAGIC = b"ustar"
TAR_BLOCK_BYTES = 512
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# What a damaged tar or gzip stream raises while it is read.
DAMAGED_STREAM_ERRORS: tuple[type[Exception], ...] = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    OSError,
)


def has_tar_suffix(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def is_tar_header(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file or of its inflated stream) opens a tar."""
    return head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + len(TAR_MAGIC)] == TAR_MAGIC


def gzip_head(path: Path, count: int = TAR_BLOCK_BYTES) -> bytes:
    """The first ``count`` inflated bytes of a gzip file (b"" when it does not inflate)."""
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read(count)
    except (OSError, EOFError, zlib.error):
        return b""


class _CountingReader:
    """A read-only file object that counts the compressed bytes consumed from it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.consumed += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        # gzip seeks back only to rewind, which a tar read as a stream never asks for.
        return self.raw.seek(offset, whence)


@dataclass
class _Inflation:
    """Bytes produced by one compressed archive against the compressed bytes read for them."""

    compressed: _CountingReader | None  # None for a plain tar: nothing to inflate
    produced: int = 0

    def ratio(self) -> float:
        if self.compressed is None:
            return 1.0
        return self.produced / max(self.compressed.consumed, 1)


def unsafe_tar_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why this member must not be extracted, or None for a regular file with a safe name."""
    name = member.name
    if "\x00" in name:
        return "the name contains a NUL byte"
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        return "absolute path"
    if any(part == ".." for part in PurePosixPath(normalised).parts):
        return "path escapes the extraction folder ('..')"
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    if member.issparse():
        return "sparse file"
    if not member.isfile():
        return f"not a regular file (type {member.type!r})"
    return None


def extract_tar(
    archive_path: Path, name: str, target: Path, budget: IntakeBudget
) -> list[tuple[str, Path]]:
    """Check and extract one tar (plain or gzip-compressed) into ``target`` (created here).

    Returns (member name, extracted file) pairs in archive order; ``name`` is how reasons
    name the archive (its path inside the input).
    """
    try:
        with Path(archive_path).open("rb") as raw:
            compressed = raw.read(len(GZIP_MAGIC)) == GZIP_MAGIC
            raw.seek(0)
            target.mkdir(parents=True, exist_ok=False)
            if compressed:
                counting = _CountingReader(raw)
                with gzip.GzipFile(fileobj=counting, mode="rb") as inflated:
                    extracted = _extract_stream(
                        inflated, _Inflation(counting), name, target, budget
                    )
            else:
                extracted = _extract_stream(raw, _Inflation(None), name, target, budget)
    except OSError as error:
        if isinstance(error, gzip.BadGzipFile) or error.strerror is None:
            raise IntakeError(
                f"{name} is not a readable tar archive (corrupt: {error_text(error)})"
            ) from error
        raise IntakeError(f"cannot open {name}: {error.strerror}") from error
    if not extracted:
        raise IntakeError(f"{name} is an empty archive")
    return extracted


def _extract_stream(
    stream: io.BufferedIOBase,
    inflation: _Inflation,
    name: str,
    target: Path,
    budget: IntakeBudget,
) -> list[tuple[str, Path]]:
    extracted: list[tuple[str, Path]] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if member.isdir():
                    continue
                unsafe = unsafe_tar_member_reason(member)
                if unsafe:
                    raise IntakeError(f"{name} has an unsafe member {member.name!r}: {unsafe}")
                budget.count_file()
                destination = target / f"{len(extracted):06d}_{safe_basename(member.name)}"
                source = archive.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members always have data
                    raise IntakeError(f"{name}: member {member.name!r} has no data")
                _copy_member(source, destination, member, inflation, name, budget)
                extracted.append((member.name, destination))
    except IntakeError:
        raise
    except DAMAGED_STREAM_ERRORS as error:
        if not extracted and isinstance(error, tarfile.ReadError) and "empty" in str(error):
            raise IntakeError(f"{name} is an empty archive") from error
        raise IntakeError(
            f"{name} is not a readable tar archive (truncated or corrupt: {error_text(error)})"
        ) from error
    return extracted


def _copy_member(
    source: IO[bytes],
    destination: Path,
    member: tarfile.TarInfo,
    inflation: _Inflation,
    archive_name: str,
    budget: IntakeBudget,
) -> None:
    """Stream one member to its generated name, counting bytes and the inflation ratio."""
    limit = budget.limits.max_compression_ratio
    written = 0
    try:
        with destination.open("wb") as sink:
            while chunk := source.read(CHUNK_BYTES):
                written += len(chunk)
                inflation.produced += len(chunk)
                budget.add_bytes(len(chunk))
                if written > member.size:
                    raise IntakeError(
                        f"{archive_name}: member {member.name!r} unpacks to more than its "
                        f"declared {format_bytes(member.size)}"
                    )
                if inflation.produced > RATIO_CHECK_MIN_BYTES and inflation.ratio() > limit:
                    raise IntakeError(
                        f"{archive_name} expands more than {limit:.0f}:1 while unpacking "
                        "(possible tar bomb)"
                    )
                sink.write(chunk)
    except BaseException:
        destination.unlink(missing_ok=True)
        raise
    if written < member.size:
        destination.unlink(missing_ok=True)
        raise IntakeError(
            f"{archive_name} is truncated (member {member.name!r} holds {format_bytes(written)} "
            f"of its {format_bytes(member.size)})"
        )
