"""Reviews: a radiologist agreeing with a study's call or correcting it, for the page and the
REST API alike (one set of checks, one audit row).

    record_review(access, principal, client, task_id, request) -> ReviewItem
    reviews_of(access, principal, client, task_id, index=0) -> list[ReviewItem]

Both raise ``StudyRefused`` (services/frontend/study_access.py) with the HTTP status the
REST API answers: 404 no such task or study, 403 not this principal's study or a role
without ``Permission.REVIEW``, 409 the study has no result yet, 422 a disagreement without
a call to set against the model's.

The audit row names the study and what the reader said (agree, the call, how many findings
marked), never the comment: a comment is free text and may name the patient.
"""

from __future__ import annotations

from services.core.access import Permission, Principal
from services.frontend.api.models import ReviewItem, ReviewRequest
from services.frontend.auth.access import AccessControl
from services.frontend.study_access import StudyRefused, may_see, readable_task
from services.registry import Review, StudyRecord
from services.registry.audit import AuditAction


def _study(
    access: AccessControl, principal: Principal, client: str | None, task_id: str, index: int
) -> StudyRecord:
    """The task's study ``index`` when the principal may see it; refusals of another's
    study are audited as the REST API's are."""
    try:
        records = readable_task(access.registry, principal, task_id, may_see)
    except StudyRefused as refusal:
        if refusal.status == 403:
            access.audit(principal, AuditAction.ACCESS_REFUSED, client, task_id=task_id)
        raise
    for record in records:
        if record.report_index == index:
            return record
    raise StudyRefused(404, f"the task has no study {index}")


def corrected_call(record: StudyRecord, request: ReviewRequest) -> bool | None:
    """The call as the reader makes it: None when they agree; when they disagree, the call
    they gave or else the opposite of the model's (a study without a call needs theirs)."""
    if request.agrees:
        if request.pathology is not None and request.pathology != record.pathology:
            raise StudyRefused(422, "an agreeing review cannot change the call")
        return None
    if request.pathology is not None:
        return request.pathology
    if record.pathology is None:
        raise StudyRefused(422, "the study has no call: say which call you make (pathology)")
    return not record.pathology


def _audit_detail(door: str, record: StudyRecord, review: Review) -> str:
    said = "agrees" if review.agrees else f"disagrees, pathology={int(bool(review.pathology))}"
    model_call = "none" if record.pathology is None else str(int(record.pathology))
    return f"{door} study {record.report_index}: {said} (call {model_call}), " + (
        f"{len(review.findings)} finding(s) marked"
    )


def record_review(
    access: AccessControl,
    principal: Principal,
    client: str | None,
    task_id: str,
    request: ReviewRequest,
    *,
    door: str = "page",
) -> ReviewItem:
    """Keeps the principal's review of the task's study ``request.report_index`` and audits
    it; the kept review (with its time) comes back. ``door`` names the caller in the audit
    row's detail ("page" or "rest")."""
    if not principal.may(Permission.REVIEW):
        access.audit(principal, AuditAction.ACCESS_REFUSED, client, task_id=task_id)
        raise StudyRefused(403, f"the role {principal.role.value} does not review studies")
    record = _study(access, principal, client, task_id, request.report_index)
    if not record.state.final:
        raise StudyRefused(409, "the study has no result yet; review it when it is done")
    review = Review(
        task_id=task_id,
        report_index=record.report_index,
        reviewer=principal.name,
        agrees=request.agrees,
        pathology=corrected_call(record, request),
        findings=dict(request.findings),
        comment=request.comment,
    )
    if not access.registry.record_review(review):  # removed or reset meanwhile
        raise StudyRefused(409, "the study has no result to review")
    access.audit(
        principal,
        AuditAction.REVIEW,
        client,
        task_id=task_id,
        study_instance_uid=record.study_instance_uid,
        detail=_audit_detail(door, record, review),
    )
    kept = [
        item
        for item in access.registry.reviews(task_id, record.report_index)
        if item.reviewer == principal.name
    ]
    return ReviewItem.of(kept[-1])


def reviews_of(
    access: AccessControl, principal: Principal, client: str | None, task_id: str, index: int = 0
) -> list[ReviewItem]:
    """Every review of the study, oldest first, for anyone who may see the study (a review
    names staff, never the patient)."""
    record = _study(access, principal, client, task_id, index)
    return [ReviewItem.of(item) for item in access.registry.reviews(task_id, record.report_index)]
