"""Pure pieces of the page that are not the worklist's rows (worklist_rows.py) or the study
view (study_view.py): the guide, the banners, the user bar, the download link, texts for a
study's state and for upload messages.

The page renders every value as text (services/frontend/static/*.js sets textContent, never
innerHTML): DICOM headers and file names are not trusted.
"""

from __future__ import annotations

import html
import math

from services.core.access import Permission, Principal, PrincipalKind
from services.core.reports import DEMO_NOTICE
from services.frontend.queue_status import QueuePlace, in_line
from services.registry.records import StudyRecord

GUIDE = """
1. **Add studies** with **Add studies** or by dropping files onto the worklist: a **.zip** or
   **.tar** / **.tar.gz** of a study's DICOM files (an archive holding several studies gives
   one row per study), a **.nii** / **.nii.gz** volume, or the loose **.dcm** files of one
   series. Tick **STAT** first for an emergency: it goes ahead of the routine queue.
2. **The worklist** is the department's: every study, whatever brought it (this page, the
   REST API, the PACS over DICOM), in triage order: unreviewed **PATHOLOGY** (most probable
   first), unreviewed **NORMAL**, **Failed** (red: unreadable data or an error, the reason in
   the row), studies in progress and in the queue, **Not analysed** (grey: not a chest CT,
   with the reason), then the reviewed studies. Chips name data-quality problems; click one
   to list the studies that have it. Click a column title to sort, type in the filter box,
   click a row to open the study; ✕ takes a row off *your* list only.
3. **A study** shows the patient, the call, the findings above their thresholds first, the
   data-quality warnings, the chest-CT check, the patient's other studies and a slice viewer
   (wheel or slider: slices; plane and window buttons; right-drag: window/level; Ctrl+wheel:
   zoom; drag: pan; slices filled by interpolation are marked). **Review** records that you
   read it: agree or disagree with the call, mark findings, add a comment.
4. The tab's title counts the unreviewed PATHOLOGY studies; **Alerts** asks the browser to
   notify you (and optionally beep) when a new one arrives. **Download all** gives the xlsx.

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


def row_key(task_id: str, index: int) -> str:
    return f"{task_id}:{index}"


def parse_row_key(value: object) -> tuple[str, int] | None:
    if not isinstance(value, str) or ":" not in value:
        return None
    task_id, _, index = value.partition(":")
    return (task_id, int(index)) if task_id and index.isdigit() else None


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


def waits_in_line(record: StudyRecord) -> bool:
    """Queued, or checked first and waiting in a preparation lane: either has a place in
    the line (services/frontend/queue_status.py)."""
    return in_line(record.state, record.stage)


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


_MARKDOWN_SPECIAL = "\\`*_{}[]()#+-.!|>~"


def markdown_text(text: str) -> str:
    """Text shown through gr.Markdown as it is: HTML and Markdown characters escaped (file
    names come from the user's disk)."""
    # Quotes stay as they are: an entity such as &#x27; would have its "#" escaped below and
    # show as text.
    escaped = html.escape(text, quote=False)
    return "".join("\\" + char if char in _MARKDOWN_SPECIAL else char for char in escaped)
