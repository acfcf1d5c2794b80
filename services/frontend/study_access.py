"""What of a study a principal may see, for the page, the study files and the REST API alike
(the rights themselves: services/core/access.py).

* Which studies: a role that sees all sees the department's; anyone else sees the studies
  they sent through the page or the REST API (their name is the row's sender).
* Identity (the patient's name, ID, birth date, sex, age; the accession number): only to a
  role allowed to see it; otherwise the row comes without it.
* Files (images, previews, SR, json, xlsx): they carry identity or pixels, so a role must
  see the study and see identity.
"""

from __future__ import annotations

from collections.abc import Callable

from services.broker.schemas import check_safe_id
from services.core.access import Permission, Principal, PrincipalKind
from services.registry import Door, Registry, StudyFilter, StudyRecord

OWN_DOORS = [Door.UPLOAD, Door.REST]  # the doors a person or a system sends through


class StudyRefused(Exception):
    """Why a task cannot be opened: 404 (no such task) or 403 (not this principal's)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def readable_task(
    registry: Registry,
    principal: Principal,
    task_id: str,
    check: Callable[[Principal, StudyRecord], bool],
) -> list[StudyRecord]:
    """The task's studies when ``check`` lets the principal open one of them."""
    try:
        check_safe_id(task_id)
    except ValueError:
        raise StudyRefused(404, "no such study") from None
    records = registry.task_studies(task_id)
    if not records:
        raise StudyRefused(404, "no such study")
    if not any(check(principal, record) for record in records):
        raise StudyRefused(403, "this study is not yours to open")
    return records


def visible(wanted: StudyFilter, principal: Principal) -> StudyFilter:
    """The listing narrowed to what the principal may see."""
    if principal.may(Permission.SEE_ALL_STUDIES):
        return wanted
    return wanted.model_copy(update={"sender": principal.name, "doors": OWN_DOORS})


def may_see(principal: Principal, record: StudyRecord) -> bool:
    if principal.may(Permission.SEE_ALL_STUDIES):
        return True
    return record.door in OWN_DOORS and principal.may_see(record.sender)


def may_read_files(principal: Principal, record: StudyRecord) -> bool:
    return may_see(principal, record) and principal.may(Permission.SEE_IDENTITY)


def shown(record: StudyRecord, principal: Principal) -> StudyRecord:
    """The record as this principal may see it: without identity unless allowed."""
    if principal.may(Permission.SEE_IDENTITY):
        return record
    return record.model_copy(update={"identity": None, "accession_number": None})


def viewer_name(principal: Principal, browser_token: str | None) -> str:
    """Whose hidden rows and downloads: a signed-in user or key by name; without sign-in,
    the browser (its random token)."""
    if principal.kind is PrincipalKind.OPEN:
        return f"browser:{browser_token or 'unknown'}"
    return f"{principal.kind.value}:{principal.name}"


def sender_name(principal: Principal) -> str | None:
    """What the registry records as the sender of an upload (None without sign-in)."""
    return None if principal.kind is PrincipalKind.OPEN else principal.name
