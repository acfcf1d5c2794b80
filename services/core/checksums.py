"""The sha256 of a file, read in chunks (model provenance, upload identity, training data)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 16 * 1024 * 1024


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
