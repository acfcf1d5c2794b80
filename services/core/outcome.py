"""What became of a study, in the four words a reader triages by: PATHOLOGY and NORMAL (the
model's call), NOT_ANALYSED (out of scope: not CT, not a chest, no series that is a volume;
nothing is wrong with the data) and FAILED (unreadable data or a processing error: someone
should look). One rule, used by the worklist, the registry and the SR's series description.
"""

from __future__ import annotations

from enum import Enum

from services.core.schemas import FailureKind, StudyReport


class Outcome(str, Enum):
    PATHOLOGY = "pathology"
    NORMAL = "normal"
    NOT_ANALYSED = "not_analysed"
    FAILED = "failed"


OUTCOME_WORDS = {
    Outcome.PATHOLOGY: "PATHOLOGY",
    Outcome.NORMAL: "NORMAL",
    Outcome.NOT_ANALYSED: "Not analysed",
    Outcome.FAILED: "Failed",
}


def study_outcome(report: StudyReport) -> Outcome:
    if report.succeeded:
        return Outcome.PATHOLOGY if report.pathology == 1 else Outcome.NORMAL
    if report.failure_kind is FailureKind.NOT_ANALYSED:
        return Outcome.NOT_ANALYSED
    return Outcome.FAILED
