"""Pure functions from task views to what the worklist shows: one row per study, as plain data.

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

from services.core.reports import DEMO_NOTICE
from services.core.schemas import StudyReport
from services.frontend.task_view import TaskState, TaskView

GUIDE = """
1. **Add studies**: a **.zip** or **.tar** / **.tar.gz** of a study's DICOM files (an archive
   holding several studies gives one row per study), a **.nii** / **.nii.gz** volume, or the
   loose **.dcm** files of one series (screened together as one study). Then press
   **Screen the studies**.
2. **The worklist** shows one row per study, the most urgent first: **PATHOLOGY**, then
   **Failure** (not screened: the reason is in the row), then **NORMAL**, then studies in
   progress and in the queue (with their place in line). Click a column title to sort, type
   in the filter box to narrow the list, click a row to open the study.
3. **A study** shows the call, the findings above their thresholds first, the data-quality
   warnings, the chest-CT check and a slice viewer of the series that was read (a refused
   series too): scroll with the mouse wheel or the slider, switch plane, pick a window
   (lung, mediastinum, bone) or drag with the right mouse button for window/level.
4. **Download all** gives the xlsx of every study of this browser session.

The same file uploaded twice is not screened again: it is marked as a duplicate and shows the
first result. Your studies stay listed after a page reload (this browser keeps a private
session key). **Demo weights**: the probabilities mean nothing.
"""

DEMO_BANNER_HTML = (
    '<div id="demo-weights-banner" style="background:#b00020;color:white;padding:6px 12px;'
    'border-radius:6px;font-weight:600">' + DEMO_NOTICE + "</div>"
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


def failure_reason(view: TaskView, report: StudyReport | None) -> str:
    if report is not None and report.failure_reason:
        return report.failure_reason
    return view.message or "the study could not be processed"


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


def queue_text(view: TaskView) -> str:
    """ "3 ahead, about 4 min to the result" and the like, for a queued study."""
    if view.workers == 0:
        return "waiting: no worker is connected to the queue"
    if view.ahead is None:
        return "waiting for a free worker"
    place = "next in line" if view.ahead == 0 else f"{view.ahead} ahead in the queue"
    if view.expected_wait_s is None:
        return f"{place} (no study finished yet to time the wait)"
    return f"{place}, result in {minutes_text(view.expected_wait_s)}"


def _study_rows(view: TaskView) -> list[tuple[int, StudyReport | None]]:
    reports = view.result.reports if view.result is not None else []
    return list(enumerate(reports)) if reports else [(0, None)]


def _base_row(view: TaskView, index: int, n_studies: int) -> dict[str, Any]:
    name = view.task.original_filename
    if n_studies > 1:
        name = f"{name} (study {index + 1} of {n_studies})"
    submitted = view.task.submitted_at
    return {
        "key": row_key(view.task.task_id, index),
        "task_id": view.task.task_id,
        "file": name,
        "submitted": submitted.strftime("%Y-%m-%d %H:%M"),
        "submitted_ts": submitted.timestamp(),
        "probability": None,
        "finding": "",
        "positives": 0,
        "date": "",
        "description": "",
        "accession": "",
        "status": "",
        "detail": "",  # the whole text when "status" is shortened
        "fraction": None,
        "flags": [],
    }


def worklist_row(view: TaskView, index: int, report: StudyReport | None, n: int) -> dict[str, Any]:
    """One worklist row: plain values only (the page shows them as text)."""
    row = _base_row(view, index, n)
    if view.state is TaskState.QUEUED:
        badge, row["status"] = Badge.QUEUED, queue_text(view)
    elif view.state is TaskState.PROCESSING:
        badge, row["status"] = Badge.PROCESSING, view.message
        row["fraction"] = round(view.fraction, 3)
    elif view.state is TaskState.FAILED or report is None or not report.succeeded:
        badge, row["detail"] = Badge.FAILURE, failure_reason(view, report)
        row["status"] = short_reason(row["detail"])
    else:
        badge = report_badge(report)
        positives = [finding for finding in report.findings if finding.positive]
        row["positives"] = len(positives)
        if positives:
            row["status"] = f"{len(positives)} finding(s) above threshold"
    if report is not None:
        probability = report.probability_of_pathology
        row["probability"] = None if probability is None else round(probability, 3)
        row["finding"] = report.most_dangerous_pathology_type or ""
        row["date"] = report.study_date or ""
        row["description"] = report.study_description or ""
        row["accession"] = report.accession_number or ""
    row["badge"] = badge.value
    row["badge_text"] = BADGE_TEXT[badge]
    row["urgency"] = URGENCY[badge]
    if view.duplicate_of is not None or view.task.duplicate_of:
        row["flags"].append(duplicate_text(view))
    return row


def duplicate_text(view: TaskView) -> str:
    original = view.duplicate_of
    if original is None:
        return "duplicate of an earlier upload: its result is shown, not recomputed"
    when = original.submitted_at.strftime("%H:%M")
    return (
        f"duplicate of {original.original_filename} (uploaded {when}): "
        "same file, result reused, not recomputed"
    )


def _same_study_flags(rows: list[dict[str, Any]], uids: dict[str, str]) -> None:
    """Flag different uploads of one study (same StudyInstanceUID, other files)."""
    by_uid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        uid = uids.get(row["key"])
        if uid and not any(flag.startswith("duplicate of") for flag in row["flags"]):
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


def worklist(task_views: list[TaskView]) -> dict[str, Any]:
    """What the worklist component shows: rows in urgency order and counts per badge."""
    rows = []
    uids: dict[str, str] = {}
    for view in task_views:
        studies = _study_rows(view)
        for index, report in studies:
            row = worklist_row(view, index, report, len(studies))
            rows.append(row)
            if report is not None and report.study_uid:
                uids[row["key"]] = report.study_uid
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
