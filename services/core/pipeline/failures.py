"""Failure reports: the customer's Failure row, built the same way wherever a study fails."""

from __future__ import annotations

from services.core.schemas import FailureKind, IntakeSummary, ProcessingStatus, StudyReport

NOT_CHEST_PREFIX = "not a chest CT"


def failure_report(
    display_name: str,
    reason: str,
    *,
    study_uid: str | None = None,
    intake: IntakeSummary | None = None,
    warnings: list[str] | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> StudyReport:
    stages = dict(stage_seconds or {})
    return StudyReport(
        path_to_study=display_name,
        study_uid=study_uid,
        processing_status=ProcessingStatus.FAILURE,
        time_of_processing=round(sum(stages.values()), 4),
        failure_reason=reason,
        failure_kind=FailureKind.FAILED,
        warnings=list(warnings or []),
        intake=intake,
        stage_seconds=stages,
    )


def not_chest_reason(reason: str) -> str:
    """``not a chest CT: <reason>``, without doubling a prefix the check already wrote."""
    reason = reason.strip()
    if reason.lower().startswith(NOT_CHEST_PREFIX.lower()):
        return reason
    return f"{NOT_CHEST_PREFIX}: {reason}"
