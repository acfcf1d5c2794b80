"""Pure functions from registry rows to the worklist a triage shift reads: one typed row per
study, in the order a radiologist works through them.

Outcome classes (services/core/outcome.py): PATHOLOGY and NORMAL are the model's call; Not
analysed (grey) is out of scope (not CT, not a chest, no series that is a volume), nothing
wrong with the data; Failed (red) is unreadable data or a processing error, which someone
should look at. Default order: unreviewed PATHOLOGY (most probable first), unreviewed NORMAL,
Failed, studies in progress and in the queue, Not analysed, then every reviewed study.

Call and findings (one rule, README "Reading the worklist"): the call is the binary head's
alone; the 20 finding heads are separate models with their own thresholds. When the call is
NORMAL while findings exceed their thresholds, or PATHOLOGY while none does, the row and the
study view say so in words rather than leave the reader to notice.

Every value reaches the page as text (static/worklist.js sets textContent, never innerHTML).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import datetime, timedelta
from enum import Enum

from pydantic import BaseModel, Field

from services.core.outcome import OUTCOME_WORDS, Outcome
from services.core.quality import QUALITY_FLAG_TEXT, QualityFlag
from services.core.schemas import PatientIdentity
from services.frontend.queue_status import QueuePlace
from services.frontend.site_time import SiteClock
from services.frontend.views import (
    display_name,
    failure_reason,
    progress_text,
    queue_text,
    short_reason,
    waits_in_line,
)
from services.registry.records import StudyRecord, StudyState

TURNAROUND_WINDOW = timedelta(hours=1)
PRIORITY_ORDER = {"stat": 0, "urgent": 1, "routine": 2}  # the lanes, taken in this order
FLAG_ORDER = list(
    QualityFlag
)  # chips in the enum's order, whatever order they were stored in  # the header's median turnaround looks this far back


class Badge(str, Enum):
    PATHOLOGY = "pathology"
    NORMAL = "normal"
    FAILED = "failed"
    NOT_ANALYSED = "not_analysed"
    PROCESSING = "processing"
    QUEUED = "queued"


OUTCOME_BADGE = {
    Outcome.PATHOLOGY: Badge.PATHOLOGY,
    Outcome.NORMAL: Badge.NORMAL,
    Outcome.NOT_ANALYSED: Badge.NOT_ANALYSED,
    Outcome.FAILED: Badge.FAILED,
}
# The outcomes in services/core/outcome.py's words; the two states before an outcome.
BADGE_TEXT = {OUTCOME_BADGE[outcome]: words for outcome, words in OUTCOME_WORDS.items()} | {
    Badge.PROCESSING: "Processing",
    Badge.QUEUED: "Queued",
}
BADGE_TEXT_BY_VALUE = {badge.value: BADGE_TEXT[badge] for badge in Badge}


class Rank(int, Enum):
    """The triage groups of the default order, most urgent first."""

    UNREVIEWED_PATHOLOGY = 0
    UNREVIEWED_NORMAL = 1
    FAILED = 2
    IN_FLIGHT = 3
    NOT_ANALYSED = 4
    REVIEWED = 5


class QualityChip(BaseModel):
    flag: QualityFlag
    text: str


class WorklistRow(BaseModel):
    """One study as its row shows it; identity fields are empty for a role not allowed it."""

    key: str
    task_id: str
    file: str
    door: str
    priority: str
    badge: Badge
    badge_text: str
    rank: Rank
    probability: float | None = None
    finding: str = ""
    positives: int = 0
    call_note: str = ""  # the call and the findings disagree (the rule above), in short
    patient: str = ""
    patient_id: str = ""
    age_sex: str = ""
    accession: str = ""
    date: str = ""
    description: str = ""
    received: str
    received_ts: float
    turnaround: str = ""
    turnaround_s: float | None = None
    status: str = ""
    detail: str = ""  # the whole text when "status" is shortened
    fraction: float | None = None
    flags: list[str] = Field(default_factory=list)
    quality: list[QualityChip] = Field(default_factory=list)
    reviewed: bool = False
    review: str = ""


class Worklist(BaseModel):
    rows: list[WorklistRow]
    counts: dict[str, int]
    badges: dict[str, str] = Field(default_factory=lambda: dict(BADGE_TEXT_BY_VALUE))
    unreviewed_pathology: int = 0
    median_turnaround: str = ""  # of the results of the last hour
    time_zone: str = "UTC"
    identity: bool = False  # whether any row carries the patient's identity


def record_badge(record: StudyRecord) -> Badge:
    """The outcome of a registry row, in the worklist's words."""
    if waits_in_line(record):
        return Badge.QUEUED
    if record.state is StudyState.PROCESSING:
        return Badge.PROCESSING
    if record.outcome is not None:
        return OUTCOME_BADGE[record.outcome]
    if record.processing_status != "Success":
        return Badge.FAILED
    return Badge.PATHOLOGY if record.pathology else Badge.NORMAL


def rank_of(badge: Badge, reviewed: bool) -> Rank:
    if reviewed:
        return Rank.REVIEWED
    return {
        Badge.PATHOLOGY: Rank.UNREVIEWED_PATHOLOGY,
        Badge.NORMAL: Rank.UNREVIEWED_NORMAL,
        Badge.FAILED: Rank.FAILED,
        Badge.NOT_ANALYSED: Rank.NOT_ANALYSED,
    }.get(badge, Rank.IN_FLIGHT)


def call_note(badge: Badge, positives: int, *, short: bool = False) -> str:
    """Words for a call that the findings do not bear out (the module's rule): the row's
    short form, the study view's whole sentence."""
    if badge is Badge.NORMAL and positives:
        if short:
            return f"NORMAL call, yet {positives} finding(s) above threshold"
        return (
            f"NORMAL call, yet {positives} finding(s) above their thresholds: the call is the "
            "pathology head's alone and the finding heads are separate models; read the findings"
        )
    if badge is Badge.PATHOLOGY and not positives:
        if short:
            return "PATHOLOGY call, no finding above threshold"
        return (
            "PATHOLOGY call with no finding above its threshold: the pathology head sees "
            "something that none of the 20 finding heads names with confidence"
        )
    return ""


def patient_text(identity: PatientIdentity | None) -> str:
    """DICOM PN "Family^Given^Middle" as "FAMILY, Given Middle"."""
    if identity is None or not identity.patient_name:
        return ""
    family, _, rest = identity.patient_name.partition("^")
    given = " ".join(part for part in rest.split("^") if part)
    return f"{family.upper()}, {given}" if given else family.upper()


def age_sex_text(identity: PatientIdentity | None) -> str:
    """ "061Y" and "F" as "61 y F"; weeks, months and days keep their unit."""
    if identity is None:
        return ""
    parts = []
    age = identity.patient_age or ""
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        parts.append(f"{int(age[:3])} {age[3].lower()}")
    if identity.patient_sex:
        parts.append(identity.patient_sex)
    return " ".join(parts)


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def turnaround_seconds(record: StudyRecord) -> float | None:
    """Received to result; None until the result."""
    if not record.state.final or record.finished_at is None:
        return None
    return max(0.0, (record.finished_at - record.received_at).total_seconds())


CALL_WORDS = {True: "PATHOLOGY", False: "NORMAL"}


def has_call(badge: Badge) -> bool:
    """A study the model made a call on; Not analysed and Failed have none to agree with."""
    return badge in (Badge.PATHOLOGY, Badge.NORMAL)


def review_verdict(badge: Badge, agrees: bool, pathology: bool | None) -> str:
    """What the reader decided, as the row says it: "agreed", "disagreed: NORMAL"; on a study
    without a call, "confirmed Not analysed" or the reader's own "call: PATHOLOGY"."""
    call = CALL_WORDS.get(pathology) if pathology is not None else None
    if has_call(badge):
        if agrees:
            return "agreed"
        return f"disagreed: {call}" if call else "disagreed"
    if agrees:
        return f"confirmed {BADGE_TEXT[badge]}"
    return f"own call: {call}" if call else "own call"


def review_text(record: StudyRecord, clock: SiteClock) -> str:
    review = record.review
    if review is None:
        return ""
    verdict = review_verdict(record_badge(record), review.agrees, review.pathology)
    return f"{verdict} · {review.reviewer} · {clock.short(review.reviewed_at)}"


def status_of(record: StudyRecord, badge: Badge, place: QueuePlace | None) -> tuple[str, str]:
    """(what the row says, the whole text when that is shortened)."""
    if badge is Badge.QUEUED:
        return queue_text(place), ""
    if badge is Badge.PROCESSING:
        return progress_text(record), ""
    if badge in (Badge.FAILED, Badge.NOT_ANALYSED):
        reason = failure_reason(record)
        return short_reason(reason), reason
    if record.findings:
        return f"{len(record.findings)} finding(s) above threshold", ""
    return "", ""


def worklist_row(
    record: StudyRecord,
    clock: SiteClock,
    *,
    n_studies: int = 1,
    place: QueuePlace | None = None,
) -> WorklistRow:
    badge = record_badge(record)
    reviewed = record.review is not None
    identity = record.identity
    status, detail = status_of(record, badge, place)
    positives = len(record.findings) if badge in (Badge.PATHOLOGY, Badge.NORMAL) else 0
    turnaround = turnaround_seconds(record)
    return WorklistRow(
        key=record.key,
        task_id=record.task_id,
        file=display_name(record, n_studies),
        door=record.door.value,
        priority=record.priority.value,
        badge=badge,
        badge_text=BADGE_TEXT[badge],
        rank=rank_of(badge, reviewed),
        probability=(
            round(record.probability_of_pathology, 3)
            if record.probability_of_pathology is not None
            else None
        ),
        finding=record.most_dangerous_finding or "",
        positives=positives,
        call_note=call_note(badge, positives, short=True),
        patient=patient_text(identity),
        patient_id=(identity.patient_id or "") if identity else "",
        age_sex=age_sex_text(identity),
        accession=record.accession_number or "",
        date=record.study_date or "",
        description=record.study_description or "",
        received=clock.short(record.received_at),
        received_ts=record.received_at.timestamp(),
        turnaround=duration_text(turnaround) if turnaround is not None else "",
        turnaround_s=round(turnaround, 1) if turnaround is not None else None,
        status=status,
        detail=detail,
        fraction=round(record.progress, 3) if badge is Badge.PROCESSING else None,
        quality=[
            QualityChip(flag=flag, text=QUALITY_FLAG_TEXT[flag])
            for flag in sorted(record.quality_flags, key=FLAG_ORDER.index)
        ],
        reviewed=reviewed,
        review=review_text(record, clock),
    )


def sort_for_triage(rows: list[WorklistRow]) -> list[WorklistRow]:
    """The module's default order; in each group the most probable first, newest first, and
    studies in flight in the order the adapters take them (STAT, urgent, routine; oldest
    first)."""

    def key(row: WorklistRow) -> tuple[int, int, float, float]:
        if row.rank is Rank.IN_FLIGHT:  # as the adapters take them: most urgent, then oldest
            return (row.rank.value, PRIORITY_ORDER.get(row.priority, 2), 0.0, row.received_ts)
        return (row.rank.value, 0, -(row.probability or 0.0), -row.received_ts)

    return sorted(rows, key=key)


def same_study_flags(rows: list[WorklistRow], uids: dict[str, str]) -> None:
    """Flag different uploads of one study (same StudyInstanceUID, other files)."""
    by_uid: dict[str, list[WorklistRow]] = defaultdict(list)
    for row in rows:
        uid = uids.get(row.key)
        if uid:
            by_uid[uid].append(row)
    for group in by_uid.values():
        if len({row.task_id for row in group}) < 2:
            continue
        for row in group:
            others = sorted({other.file for other in group if other.task_id != row.task_id})
            row.flags.append(
                "same study (StudyInstanceUID) as " + ", ".join(others) + ", other files"
            )


def median_turnaround(records: list[StudyRecord], now: datetime) -> str:
    recent = [
        seconds
        for record in records
        if record.finished_at is not None
        and now - record.finished_at <= TURNAROUND_WINDOW
        and (seconds := turnaround_seconds(record)) is not None
    ]
    return duration_text(statistics.median(recent)) if recent else ""


def worklist(
    records: list[StudyRecord],
    places: dict[str, QueuePlace] | None = None,
    *,
    clock: SiteClock | None = None,
    now: datetime | None = None,
) -> Worklist:
    """The rows in triage order, counts per badge and the header's numbers."""
    clock = clock or SiteClock()
    places = places or {}
    studies_per_task: dict[str, int] = defaultdict(int)
    for record in records:
        studies_per_task[record.task_id] += 1
    rows = []
    uids: dict[str, str] = {}
    for record in records:
        row = worklist_row(
            record,
            clock,
            n_studies=studies_per_task[record.task_id],
            place=places.get(record.task_id),
        )
        rows.append(row)
        if record.study_instance_uid:
            uids[row.key] = record.study_instance_uid
    same_study_flags(rows, uids)
    return Worklist(
        rows=sort_for_triage(rows),
        counts={badge.value: sum(row.badge is badge for row in rows) for badge in Badge},
        unreviewed_pathology=sum(row.rank is Rank.UNREVIEWED_PATHOLOGY for row in rows),
        median_turnaround=median_turnaround(records, now or clock.now()),
        time_zone=clock.name,
        identity=any(record.identity is not None for record in records),
    )


def summary_text(counts: dict[str, int]) -> str:
    parts = [
        f"{counts[badge.value]} {BADGE_TEXT[badge]}" for badge in Badge if counts.get(badge.value)
    ]
    return " · ".join(parts) if parts else "no studies yet"
