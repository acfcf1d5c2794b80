"""Pure functions from registry rows to what the worklist shows: one row per study, as plain
data.

The page renders every value as text (services/frontend/static/*.js sets textContent, never
innerHTML): DICOM headers and file names are not trusted. The rows are sorted by urgency:
PATHOLOGY first (most probable first), then Failure (a study that was not screened may hide
anything), then NORMAL, then studies in progress and in the queue.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from enum import Enum
from typing import Any

from services.core.access import Permission, Principal, PrincipalKind
from services.core.reports import DEMO_NOTICE
from services.core.schemas import StudyReport
from services.frontend.queue_status import QueuePlace
from services.registry.records import StudyRecord, StudyState

GUIDE = """
1. **Add studies**: a **.zip** or **.tar** / **.tar.gz** of a study's DICOM files (an archive
   holding several studies gives one row per study), a **.nii** / **.nii.gz** volume, or the
   loose **.dcm** files of one series (screened together as one study). Then press
   **Screen the studies**.
2. **The worklist** is the department's: every study, whatever brought it (this page, the
   REST API, the PACS over DICOM), the most urgent first: **PATHOLOGY**, then **Failure**
   (not screened: the reason is in the row), then **NORMAL**, then studies in progress and in
   the queue (with their place in line). Click a column title to sort, type in the filter box
   to narrow the list, click a row to open the study; ✕ takes a row off *your* list only.
3. **A study** shows the call, the findings above their thresholds first, the data-quality
   warnings, the chest-CT check, the patient's other studies and a slice viewer of the series
   that was read (a refused series too): scroll with the mouse wheel or the slider, switch
   plane, pick a window (lung, mediastinum, bone) or drag with the right mouse button for
   window/level.
4. **Download all** gives the xlsx of every finished study on your list.

A file that was screened before is not screened again: the upload says so and its row is
shown. **Demo weights**: the probabilities mean nothing.
"""

DEMO_BANNER_HTML = (
    '<div id="demo-weights-banner" style="background:#b00020;color:white;padding:6px 12px;'
    'border-radius:6px;font-weight:600">' + DEMO_NOTICE + "</div>"
)


SIGN_IN_OFF_BANNER_HTML = (
    '<div id="sign-in-off" role="alert" style="background:#b00020;color:white;padding:6px 12px;'
    'border-radius:6px;font-weight:600">Sign-in is OFF (frontend.sign_in: false): anyone who '
    "can reach this page sees every study with the patient's identity, and nothing records "
    "who did.</div>"
)
USER_BAR_HTML = '<div class="ub" aria-label="signed in"></div>'
USER_BAR_CSS = (
    ".ub { display: flex; gap: 10px; align-items: center; justify-content: flex-end;"
    " font-size: 13px; white-space: nowrap; }"
    " .ub-name { font-weight: 700; } .ub-role { color: #546e7a; }"
    " .ub button { padding: 3px 10px; border: 1px solid #90a4ae; border-radius: 4px;"
    " background: #fff; cursor: pointer; }"
)


def user_bar(principal: Principal, *, sign_in: bool) -> dict[str, object]:
    """What the user bar shows (user_bar.js draws it as text)."""
    if principal.kind is PrincipalKind.OPEN:
        return {"name": "Sign-in off", "role": "", "sign_in": False, "audit": False}
    return {
        "name": principal.name,
        "role": principal.role.value,
        "sign_in": sign_in,
        "audit": principal.may(Permission.AUDIT),
    }


def download_all_link(enabled: bool, browser_token: str | None) -> str:
    """The "Download all (xlsx)" link: the caller's worklist through /worklist.xlsx (checked
    and audited there); without sign-in it names the browser, whose hidden rows it leaves out."""
    if not enabled:
        return (
            '<span id="download-all" class="dl-all dl-off" aria-disabled="true">'
            "Download all (xlsx)</span>"
        )
    query = f"?b={browser_token}" if browser_token and browser_token.isalnum() else ""
    return (
        f'<a id="download-all" class="dl-all" href="worklist.xlsx{query}" download>'
        "Download all (xlsx)</a>"
    )


class Badge(str, Enum):
    PATHOLOGY = "pathology"
    FAILURE = "failure"
    NORMAL = "normal"
    PROCESSING = "processing"
    QUEUED = "queued"


BADGE_TEXT = {
    Badge.PATHOLOGY: "PATHOLOGY",
    Badge.FAILURE: "Failure",
    Badge.NORMAL: "NORMAL",
    Badge.PROCESSING: "Processing",
    Badge.QUEUED: "Queued",
}
URGENCY = {badge: rank for rank, badge in enumerate(Badge)}  # the order above


def row_key(task_id: str, index: int) -> str:
    return f"{task_id}:{index}"


def parse_row_key(value: object) -> tuple[str, int] | None:
    if not isinstance(value, str) or ":" not in value:
        return None
    task_id, _, index = value.partition(":")
    return (task_id, int(index)) if task_id and index.isdigit() else None


def report_badge(report: StudyReport) -> Badge:
    if not report.succeeded:
        return Badge.FAILURE
    return Badge.PATHOLOGY if report.pathology == 1 else Badge.NORMAL


def record_badge(record: StudyRecord) -> Badge:
    """The outcome of a registry row, in the worklist's words."""
    if record.state is StudyState.QUEUED:
        return Badge.QUEUED
    if record.state is StudyState.PROCESSING:
        return Badge.PROCESSING
    if record.state is StudyState.FAILED or record.processing_status != "Success":
        return Badge.FAILURE
    return Badge.PATHOLOGY if record.pathology else Badge.NORMAL


def failure_reason(record: StudyRecord) -> str:
    return record.failure_reason or "the study could not be processed"


SHORT_REASON_CHARACTERS = 90  # about two lines of the worklist's reason column


def short_reason(reason: str) -> str:
    """The reason without its parenthesised numbers when it is long (the row shows this, the
    study view and the row's tooltip the whole text)."""
    if len(reason) <= SHORT_REASON_CHARACTERS or " (" not in reason:
        return reason
    return reason.split(" (", 1)[0].rstrip(" ;,:")


def minutes_text(seconds: float) -> str:
    if seconds < 90:
        return f"about {max(5, 5 * math.ceil(seconds / 5)):.0f} s"
    return f"about {math.ceil(seconds / 60)} min"


def queue_text(place: QueuePlace | None) -> str:
    """ "3 ahead, about 4 min to the result" and the like, for a queued study."""
    if place is None:
        return "waiting for a free worker"
    if place.workers == 0:
        return "waiting: no worker is connected to the queue"
    where = "next in line" if place.ahead == 0 else f"{place.ahead} ahead in the queue"
    if place.expected_wait_s is None:
        return f"{where} (no study finished yet to time the wait)"
    return f"{where}, result in {minutes_text(place.expected_wait_s)}"


def progress_text(record: StudyRecord) -> str:
    stage = record.stage or "started"
    return f"{stage.replace('_', ' ')} ({round(record.progress * 100)}%)"


def display_name(record: StudyRecord, n_studies: int) -> str:
    name = record.original_filename or record.task_id
    if n_studies > 1:
        name = f"{name} (study {record.report_index + 1} of {n_studies})"
    return name


def worklist_row(
    record: StudyRecord, *, n_studies: int = 1, place: QueuePlace | None = None
) -> dict[str, Any]:
    """One worklist row: plain values only (the page shows them as text)."""
    received = record.received_at
    row: dict[str, Any] = {
        "key": record.key,
        "task_id": record.task_id,
        "file": display_name(record, n_studies),
        "submitted": received.strftime("%Y-%m-%d %H:%M"),
        "submitted_ts": received.timestamp(),
        "door": record.door.value,
        "probability": None,
        "finding": record.most_dangerous_finding or "",
        "positives": len(record.findings),
        "date": record.study_date or "",
        "description": record.study_description or "",
        "accession": record.accession_number or "",
        "status": "",
        "detail": "",  # the whole text when "status" is shortened
        "fraction": None,
        "flags": [],
    }
    badge = record_badge(record)
    if badge is Badge.QUEUED:
        row["status"] = queue_text(place)
    elif badge is Badge.PROCESSING:
        row["status"] = progress_text(record)
        row["fraction"] = round(record.progress, 3)
    elif badge is Badge.FAILURE:
        row["detail"] = failure_reason(record)
        row["status"] = short_reason(row["detail"])
    elif record.findings:
        row["status"] = f"{len(record.findings)} finding(s) above threshold"
    if record.probability_of_pathology is not None:
        row["probability"] = round(record.probability_of_pathology, 3)
    row["badge"] = badge.value
    row["badge_text"] = BADGE_TEXT[badge]
    row["urgency"] = URGENCY[badge]
    return row


def _same_study_flags(rows: list[dict[str, Any]], uids: dict[str, str]) -> None:
    """Flag different uploads of one study (same StudyInstanceUID, other files)."""
    by_uid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        uid = uids.get(row["key"])
        if uid:
            by_uid[uid].append(row)
    for group in by_uid.values():
        if len({row["task_id"] for row in group}) < 2:
            continue
        for row in group:
            others = sorted(
                {other["file"] for other in group if other["task_id"] != row["task_id"]}
            )
            row["flags"].append(
                "same study (StudyInstanceUID) as " + ", ".join(others) + ", other files"
            )


IN_FLIGHT = (Badge.PROCESSING.value, Badge.QUEUED.value)


def sort_by_urgency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PATHOLOGY (most probable first), Failure, NORMAL: newest first; then processing and
    queued studies in the order they will finish (oldest first)."""

    def key(row: dict[str, Any]) -> tuple[int, float, float]:
        probability = row["probability"] if row["probability"] is not None else 0.0
        when = row["submitted_ts"] if row["badge"] in IN_FLIGHT else -row["submitted_ts"]
        return (row["urgency"], -probability, when)

    return sorted(rows, key=key)


def worklist(
    records: list[StudyRecord], places: dict[str, QueuePlace] | None = None
) -> dict[str, Any]:
    """What the worklist component shows: rows in urgency order and counts per badge."""
    places = places or {}
    studies_per_task: dict[str, int] = defaultdict(int)
    for record in records:
        studies_per_task[record.task_id] += 1
    rows = []
    uids: dict[str, str] = {}
    for record in records:
        row = worklist_row(
            record, n_studies=studies_per_task[record.task_id], place=places.get(record.task_id)
        )
        rows.append(row)
        if record.study_instance_uid:
            uids[row["key"]] = record.study_instance_uid
    _same_study_flags(rows, uids)
    counts = {badge.value: sum(row["badge"] == badge.value for row in rows) for badge in Badge}
    return {"rows": sort_by_urgency(rows), "counts": counts, "badges": BADGE_TEXT_BY_VALUE}


BADGE_TEXT_BY_VALUE = {badge.value: text for badge, text in BADGE_TEXT.items()}


def summary_text(counts: dict[str, int]) -> str:
    parts = [
        f"{counts[badge.value]} {BADGE_TEXT[badge]}" for badge in Badge if counts.get(badge.value)
    ]
    return " · ".join(parts) if parts else "no studies yet"


_MARKDOWN_SPECIAL = "\\`*_{}[]()#+-.!|>~"


def markdown_text(text: str) -> str:
    """Text shown through gr.Markdown as it is: HTML and Markdown characters escaped (file
    names come from the user's disk)."""
    escaped = html.escape(text, quote=True)
    return "".join("\\" + char if char in _MARKDOWN_SPECIAL else char for char in escaped)
