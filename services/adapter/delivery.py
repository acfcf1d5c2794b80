"""The adapter's delivery rules: what to do with a task message, as pure functions.

The consumer (services/adapter/consumer.py) asks these functions and only executes the
answer: store the result once, publish it to the submitter, then ack, give back or
dead-letter the message. The rules:

* malformed message -> a Failure result to its ``reply_to`` (when it has one; not stored,
  since its task id cannot be trusted), then dead-lettered;
* the task already has a stored result (a redelivery after a crash between storing and
  acking) -> that result is republished and acked, nothing is recomputed;
* delivery number > max_deliveries (the adapter died on every earlier attempt) -> a stored
  Failure result, dead-lettered for a human;
* the study ran: its result is stored, published and acked (a study that failed is a
  result too: its Failure rows);
* the preparation stage prepared studies that need the model: the ModelTask that names them
  is published (confirmed) to the model lane, then the task is acked;
* the preparation stage checked a task first and a study of it passed (the first that does
  ends the check): the task is published (confirmed) to its preparation lane, then the
  message is acked;
* the error policy (services/core/errors.py) decides the rest: RETRY_LATER gives the task
  back (a study missing from the shared storage after a short wait, at most
  max_deliveries times, then a stored Failure result and the dead letters); STOP gives it
  back and stops the adapter (a broken deployment must not fail study after study);
  FAILURE_ROW (an error outside the pipeline's own handling) is a stored Failure result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from services.broker.schemas import (
    ModelTask,
    ResultFile,
    StudyResult,
    StudyTask,
    TaskStatus,
    check_safe_id,
    new_task_id,
    utc_now,
)
from services.core.errors import ErrorPolicy, StudyNotFound, WorkInterrupted, policy_of
from services.core.schemas import ProcessingStatus, StudyReport

# A study missing from the shared storage is given back after this wait: a shared volume
# may show a new file late, and another adapter may mount it properly.
MISSING_STUDY_RETRY_DELAY_S = 2.0
UNREADABLE_TASK_NAME = "(unreadable task message)"


class Action(str, Enum):
    ACK = "ack"  # done: the message leaves the queue
    REQUEUE = "requeue"  # given back: a later delivery tries again
    DEAD_LETTER = "dead_letter"  # to the dead-letter queue with its reason, for a human


@dataclass(frozen=True)
class Decision:
    action: Action
    result: StudyResult | None = None  # published to the submitter before the action
    store: bool = False  # stored once (the first stored result of a task wins) before publishing
    delay_s: float = 0.0  # wait before giving the message back
    stop_adapter: bool = False  # the deployment is broken: stop taking tasks
    note: str = ""  # for the log line; never patient data
    # Published before the ack: a ModelTask to the model stage, a checked StudyTask to its
    # preparation lane.
    handoff: ModelTask | StudyTask | None = None
    # Why a dead-lettered message is there: its x-cts-reason header (services/adapter/dead_letters.py).
    reason: str = ""


def failure_report(task: StudyTask, reason: str) -> StudyReport:
    """The customer's Failure row for a task that could not be processed at all."""
    return StudyReport(
        path_to_study=task.original_filename or task.study_path,
        processing_status=ProcessingStatus.FAILURE,
        failure_reason=reason,
    )


def failed_result(
    task: StudyTask,
    reason: str,
    *,
    adapter_id: str,
    attempt: int,
    started_at: datetime | None = None,
) -> StudyResult:
    finished = utc_now()
    return StudyResult(
        task_id=task.task_id,
        correlation_id=task.reply_correlation_id,
        status=TaskStatus.FAILED,
        reports=[failure_report(task, reason)],
        error=reason,
        original_filename=task.original_filename,
        study_path=task.study_path,
        adapter_id=adapter_id,
        attempt=attempt,
        started_at=started_at,
        finished_at=finished,
        seconds=(finished - started_at).total_seconds() if started_at else 0.0,
    )


def completed_result(
    task: StudyTask,
    reports: list[StudyReport],
    files: list[ResultFile],
    *,
    adapter_id: str,
    attempt: int,
    started: datetime,
    seconds: float,
    prepare_seconds: float,
    model_seconds: float | None = None,
    check_seconds: float | None = None,
) -> StudyResult:
    """The task's result once its pipeline ran (its studies may be Failure rows)."""
    return StudyResult(
        task_id=task.task_id,
        correlation_id=task.reply_correlation_id,
        status=TaskStatus.COMPLETED,
        reports=reports,
        files=files,
        original_filename=task.original_filename,
        study_path=task.study_path,
        adapter_id=adapter_id,
        attempt=attempt,
        started_at=started,
        finished_at=utc_now(),
        seconds=seconds,
        prepare_seconds=round(prepare_seconds, 4),
        model_seconds=None if model_seconds is None else round(model_seconds, 4),
        check_seconds=None if check_seconds is None else round(check_seconds, 4),
    )


def with_demo_flag(result: StudyResult, demo: bool) -> StudyResult:
    """The result with every row saying whether the deployment's model is a demo (a task
    that failed before the pipeline ran has rows the pipeline never flagged)."""
    if all(report.demo_weights == demo for report in result.reports):
        return result
    reports = [report.model_copy(update={"demo_weights": demo}) for report in result.reports]
    return result.model_copy(update={"reports": reports})


def on_delivery(
    task: StudyTask,
    *,
    attempt: int,
    max_deliveries: int,
    stored: StudyResult | None,
    adapter_id: str,
    delivered: bool = False,
) -> Decision | None:
    """Before any work; None means "screen the study". ``delivered``: the stored result was
    confirmed to the registry and the submitter before (only the ack was lost)."""
    if stored is not None and delivered:
        return Decision(Action.ACK, note="its result was delivered before: acked, not sent again")
    if stored is not None:
        return Decision(Action.ACK, result=stored, note="already has a stored result: republished")
    if attempt > max_deliveries:
        reason = (
            f"given up after {max_deliveries} attempts: the adapter stopped or crashed while "
            "processing this study every time"
        )
        return _given_up(task, reason, note=reason, adapter_id=adapter_id, attempt=attempt)
    return None


def _given_up(
    task: StudyTask, reason: str, *, note: str, adapter_id: str, attempt: int
) -> Decision:
    """Dead-lettered for a human with its reason, its Failure result stored (and sent)."""
    result = failed_result(task, reason, adapter_id=adapter_id, attempt=attempt)
    return Decision(Action.DEAD_LETTER, result=result, store=True, note=note, reason=reason)


def on_outcome(
    task: StudyTask,
    outcome: StudyResult | ModelTask | StudyTask | BaseException,
    *,
    attempt: int,
    max_deliveries: int,
    adapter_id: str,
) -> Decision:
    """After the work: its result, or the error that ended it."""
    if isinstance(outcome, StudyResult):
        return Decision(Action.ACK, result=outcome, store=True, note=outcome.status.value)
    if isinstance(outcome, ModelTask):
        return Decision(Action.ACK, handoff=outcome, note="prepared: handed to the model stage")
    if isinstance(outcome, StudyTask):
        # Checked first, or back from the model stage (its model input gone).
        return Decision(Action.ACK, handoff=outcome, note="put in its preparation lane")
    error = outcome
    policy = policy_of(error)
    if isinstance(error, StudyNotFound):
        if attempt < max_deliveries:
            return Decision(
                Action.REQUEUE,
                delay_s=MISSING_STUDY_RETRY_DELAY_S,
                note=f"study not in the shared storage (attempt {attempt}): given back",
            )
        return _given_up(
            task,
            f"{error} (tried {attempt} times)",
            note="study not in the shared storage: given up",
            adapter_id=adapter_id,
            attempt=attempt,
        )
    if policy is ErrorPolicy.RETRY_LATER:
        what = "the adapter is stopping" if isinstance(error, WorkInterrupted) else repr(error)
        return Decision(Action.REQUEUE, note=f"given back: {what}")
    if policy is ErrorPolicy.STOP:
        return Decision(
            Action.REQUEUE,
            stop_adapter=True,
            note=f"given back, and the adapter stops: {type(error).__name__}: {error}",
        )
    reason = f"{type(error).__name__}: {error}"
    result = failed_result(task, reason, adapter_id=adapter_id, attempt=attempt)
    return Decision(Action.ACK, result=result, store=True, note="failed unexpectedly")


def unreadable_task_id(body: bytes, correlation_id: str | None, message_id: str | None) -> str:
    """The id a submitter can match the failure of an unreadable message with: the body's
    ``task_id`` if the body is a JSON object that has a valid one, else the AMQP
    correlation_id or message_id, else a new id."""
    candidates: list[object] = []
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict):
        candidates.append(document.get("task_id"))
    candidates.extend([correlation_id, message_id])
    for candidate in candidates:
        if isinstance(candidate, str):
            try:
                return check_safe_id(candidate)
            except ValueError:
                continue
    return "unreadable-" + new_task_id()


def on_malformed(
    body: bytes,
    error: BaseException,
    *,
    correlation_id: str | None,
    message_id: str | None,
    adapter_id: str,
) -> Decision:
    """A message that is not a readable task: a Failure result for its sender, dead-lettered."""
    task_id = unreadable_task_id(body, correlation_id, message_id)
    reason = f"the task message could not be read: {error}"
    result = StudyResult(
        task_id=task_id,
        correlation_id=correlation_id or task_id,
        status=TaskStatus.FAILED,
        reports=[
            StudyReport(
                path_to_study=UNREADABLE_TASK_NAME,
                processing_status=ProcessingStatus.FAILURE,
                failure_reason=reason,
            )
        ],
        error=reason,
        adapter_id=adapter_id,
    )
    return Decision(Action.DEAD_LETTER, result=result, note="malformed task message", reason=reason)
