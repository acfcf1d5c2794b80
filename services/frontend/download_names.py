"""The name a study's file downloads under, for the page's links, the page's file route and
the REST API alike: every task writes ``output.xlsx`` and ``warnings_and_errors.txt``, so the
stored name says nothing once it is in a Downloads folder.

    chest-ct_2007-04-25_task-1a2b3c4d_report.xlsx

The study date when the task's studies share one, and the start of the task id; never the
patient's name or ID, nor the accession number: a file name is copied, mailed and listed
where identity must not go, and where a purge cannot follow (the registry blanks the
accession number with the identity, services/registry/retention.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from services.core.reports import WARNINGS_NAME, XLSX_NAME
from services.registry.records import StudyRecord

PREFIX = "chest-ct"
TASK_ID_CHARACTERS = 8
# What each of a task's own files is called in a download.
PLAIN_NAMES = {XLSX_NAME: "report.xlsx", WARNINGS_NAME: "warnings.txt"}
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _part(text: str, limit: int) -> str:
    """Letters, digits, dots, hyphens and underscores only (no path, quote or header trick survives)."""
    return UNSAFE.sub("-", text).strip("._-")[:limit].strip("._-")


def _shared(values: Sequence[str | None]) -> str | None:
    """The value every study of the task has, if they agree on one."""
    found = {value for value in values if value}
    return found.pop() if len(found) == 1 and all(values) else None


def download_name(records: Sequence[StudyRecord], stored_name: str) -> str:
    """The name ``stored_name`` (a file of the task of ``records``) downloads under."""
    parts = [PREFIX]
    if date := _shared([record.study_date for record in records]):
        parts.append(_part(date, 10))
    if records:
        parts.append("task-" + _part(records[0].task_id, TASK_ID_CHARACTERS))
    name = PLAIN_NAMES.get(stored_name, stored_name)
    stem, dot, suffix = name.rpartition(".")
    tail = f"{_part(stem, 60)}.{_part(suffix, 10)}" if dot else _part(name, 60)
    return "_".join(part for part in [*parts, tail] if part)
