"""The triage worklist's rows (services/frontend/worklist_rows.py), pure: outcome classes,
the triage order with reviews, identity in words, the call and its findings, quality chips,
times in the site's zone and turnaround."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from test_frontend_logic import NOW, failure, record, success

from services.broker.schemas import WAITING_FOR_PREPARATION
from services.core.config import load_settings
from services.core.quality import QualityFlag
from services.core.schemas import FailureKind, PatientIdentity
from services.frontend.queue_status import QueuePlace
from services.frontend.site_time import SiteClock
from services.frontend.worklist_rows import (
    Badge,
    Rank,
    age_sex_text,
    call_note,
    patient_text,
    worklist,
)
from services.registry import ReviewSummary, StudyRecord, StudyState
from services.registry.records import Priority


def finished(row: StudyRecord, *, after_s: float) -> StudyRecord:
    return row.model_copy(update={"finished_at": row.received_at + timedelta(seconds=after_s)})


def reviewed(
    row: StudyRecord, *, agrees: bool = True, pathology: bool | None = None
) -> StudyRecord:
    summary = ReviewSummary(reviewer="dr.grey", reviewed_at=NOW, agrees=agrees, pathology=pathology)
    return row.model_copy(update={"review": summary})


def test_reviewed_studies_sink_below_every_unreviewed_one() -> None:
    rows = [
        reviewed(record("seen-pathology.zip", success(0.99))),
        record("pathology.zip", success(0.6)),
        record("normal.zip", success(0.1, uid="2", positives=0)),
        record("broken.zip", failure("intake failed: not a zip"), minute=1),
        record(
            "head.zip",
            failure("not a chest CT", failure_kind=FailureKind.NOT_ANALYSED),
            minute=2,
        ),
        record("waiting.zip", state=StudyState.QUEUED, task_id="waiting"),
    ]
    listed = worklist(rows, clock=SiteClock(), now=NOW)
    assert [row.file for row in listed.rows] == [
        "pathology.zip",
        "normal.zip",
        "broken.zip",
        "waiting.zip",
        "head.zip",
        "seen-pathology.zip",
    ]
    assert [row.rank for row in listed.rows][-1] is Rank.REVIEWED
    # The tab title's count: PATHOLOGY nobody has reviewed yet.
    assert listed.unreviewed_pathology == 1
    seen = listed.rows[-1]
    assert seen.reviewed
    assert seen.review.startswith("agreed · dr.grey · ")


def test_a_reviewed_row_says_what_the_reader_decided() -> None:
    """The corrected call, not only "disagreed"; a study without a call (Not analysed,
    Failed) is confirmed or given the reader's own call, never "agreed" with."""
    head = record("head.zip", failure("not a chest CT", failure_kind=FailureKind.NOT_ANALYSED))
    rows = [
        reviewed(record("a.zip", success(0.9)), agrees=False, pathology=False),
        reviewed(head),
        reviewed(
            record("mr.zip", failure("no CT series", failure_kind=FailureKind.NOT_ANALYSED)),
            agrees=False,
            pathology=True,
        ),
        reviewed(record("broken.zip", failure("intake failed: not a zip"))),
    ]
    said = {row.file: row.review.split(" · ")[0] for row in worklist(rows).rows}
    assert said == {
        "a.zip": "disagreed: NORMAL",
        "head.zip": "confirmed Not analysed",
        "mr.zip": "own call: PATHOLOGY",
        "broken.zip": "confirmed Failed",
    }


def test_identity_reads_as_a_person_and_is_absent_without_the_right() -> None:
    identity = PatientIdentity(
        patient_name="Doe^Jane^Q", patient_id="PID-1", patient_age="061Y", patient_sex="F"
    )
    assert patient_text(identity) == "DOE, Jane Q"
    assert age_sex_text(identity) == "61 y F"
    assert age_sex_text(PatientIdentity(patient_age="003M")) == "3 m"
    assert patient_text(None) == ""
    report = success(0.7).model_copy(update={"identity": identity})
    row = worklist([record("a.zip", report)]).rows[0]
    assert (row.patient, row.patient_id, row.age_sex) == ("DOE, Jane Q", "PID-1", "61 y F")
    # What a role without identity gets (services/frontend/study_access.shown): no identity.
    stripped = record("a.zip", report).model_copy(update={"identity": None})
    assert worklist([stripped]).identity is False
    assert worklist([stripped]).rows[0].patient == ""


def test_a_call_the_findings_do_not_bear_out_is_said_in_words() -> None:
    normal_with_findings = record("n.zip", success(0.2, positives=2))
    pathology_without = record("p.zip", success(0.9, uid="5", positives=0))
    agreeing = record("a.zip", success(0.9, uid="6", positives=1))
    rows = {
        row.file: row for row in worklist([normal_with_findings, pathology_without, agreeing]).rows
    }
    assert rows["n.zip"].call_note == "NORMAL call, yet 2 finding(s) above threshold"
    assert rows["p.zip"].call_note == "PATHOLOGY call, no finding above threshold"
    assert rows["a.zip"].call_note == ""
    assert call_note(Badge.FAILED, 3) == ""  # no call, nothing to disagree with
    assert "separate models" in call_note(Badge.NORMAL, 2)


def test_quality_chips_turnaround_and_the_site_time_zone() -> None:
    report = success(0.4, positives=0).model_copy(
        update={"quality_flags": [QualityFlag.INTERPOLATED, QualityFlag.GANTRY_TILT]}
    )
    first = finished(record("q.zip", report), after_s=75)
    second = finished(record("r.zip", success(0.3, uid="8", positives=0), minute=1), after_s=45)
    old = finished(record("old.zip", success(0.3, uid="9", positives=0), minute=-120), after_s=999)
    clock = SiteClock("Europe/Berlin")
    listed = worklist([first, second, old], clock=clock, now=NOW + timedelta(minutes=5))
    rows = {row.file: row for row in listed.rows}
    assert [chip.text for chip in rows["q.zip"].quality] == [
        "missing slices interpolated",
        "gantry tilt",
    ]
    assert rows["q.zip"].turnaround == "1 min 15 s"
    assert rows["r.zip"].turnaround == "45 s"
    # The header's median looks at the last hour's results only (not old.zip's 999 s).
    assert listed.median_turnaround == "1 min 00 s"
    # 10:30 UTC on 2 January is 11:30 in Berlin.
    assert clock.full(NOW) == "2026-01-02 11:30:00 Europe/Berlin"
    assert listed.time_zone == "Europe/Berlin"


def test_the_site_time_zone_is_checked_when_the_settings_load() -> None:
    assert load_settings(environ={"CTS__FRONTEND__TIME_ZONE": "Asia/Tokyo"}).frontend.time_zone
    with pytest.raises(ValueError, match="unknown time zone"):
        load_settings(environ={"CTS__FRONTEND__TIME_ZONE": "Mars/Olympus"})


def test_today_shows_the_time_and_other_days_the_date() -> None:
    clock = SiteClock("UTC")
    now = datetime.now(UTC)
    assert len(clock.short(now)) == len("12:34:56")
    assert clock.short(now - timedelta(days=3)).count("-") == 2


def test_studies_in_flight_are_listed_as_the_adapters_take_them() -> None:
    routine = record("routine.zip", state=StudyState.QUEUED, task_id="a", minute=0)
    stat = record("stat.zip", state=StudyState.QUEUED, task_id="b", minute=5).model_copy(
        update={"priority": Priority.STAT}
    )
    assert [row.file for row in worklist([routine, stat]).rows] == ["stat.zip", "routine.zip"]
    assert worklist([stat]).rows[0].priority == "stat"


def test_a_study_checked_first_waits_in_line_with_its_place() -> None:
    """A study the adapter checked while others waited is in a preparation lane: the row
    says Queued with its place and wait, not "processing"."""
    checked = record("checked.zip", state=StudyState.PROCESSING, task_id="c", minute=0)
    checked = checked.model_copy(update={"stage": WAITING_FOR_PREPARATION, "progress": 0.0})
    working = record("working.zip", state=StudyState.PROCESSING, task_id="w", minute=1)
    working = working.model_copy(update={"stage": "volume", "progress": 0.4})
    place = QueuePlace(ahead=1, workers=1, expected_wait_s=95.0)
    rows = {row.file: row for row in worklist([checked, working], {"c": place}).rows}
    assert rows["checked.zip"].badge is Badge.QUEUED
    assert rows["checked.zip"].status == "1 ahead in the queue, result in about 2 min"
    assert rows["working.zip"].badge is Badge.PROCESSING
    assert rows["working.zip"].status == "volume (40%)"
