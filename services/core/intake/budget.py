"""The limits of one input, counted across every archive inside it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from services.core.config import IntakeSettings
from services.core.errors import IntakeError


@dataclass
class IntakeBudget:
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
                f"{format_bytes(self.limits.max_uncompressed_bytes)} "
                "(intake.max_uncompressed_bytes)"
            )


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
