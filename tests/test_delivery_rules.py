"""The adapter's delivery rules and the error policy, as pure functions (no broker needed).

The real broker exercises the same rules end to end in tests/test_adapter.py and
tests/test_fault_suite.py; here every branch is pinned down on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pika
import pytest

from services.adapter.dead_letters import (
    ADAPTER_HEADER,
    DELIVERY_HEADER,
    MAX_REASON_CHARS,
    REASON_HEADER,
    dead_letter_properties,
)
from services.adapter.delivery import (
    MISSING_STUDY_RETRY_DELAY_S,
    UNREADABLE_TASK_NAME,
    Action,
    failed_result,
    on_delivery,
    on_malformed,
    on_outcome,
    with_demo_flag,
)
from services.broker.errors import MessageError, PublishError
from services.broker.schemas import StudyResult, StudyTask, TaskStatus
from services.broker.storage import mark_delivered, was_delivered
from services.core.errors import (
    ConfigurationError,
    ErrorPolicy,
    IntakeError,
    ModelRepositoryError,
    ModelServerUnavailable,
    ModelServerWaitExceeded,
    SeriesDataError,
    StudyNotFound,
    ThresholdError,
    WorkInterrupted,
    policy_of,
    reason_of,
)
from services.core.schemas import ProcessingStatus, StudyReport

MAX_DELIVERIES = 3


@pytest.fixture
def task() -> StudyTask:
    return StudyTask(study_path="uploads/t1/chest.zip", original_filename="chest.zip")


def completed(task: StudyTask) -> StudyResult:
    report = StudyReport(path_to_study="chest.zip", processing_status=ProcessingStatus.SUCCESS)
    return StudyResult(task_id=task.task_id, status=TaskStatus.COMPLETED, reports=[report])


@pytest.mark.parametrize(
    ("error", "policy"),
    [
        (IntakeError("broken zip"), ErrorPolicy.FAILURE_ROW),
        (SeriesDataError("mixed orientations"), ErrorPolicy.FAILURE_ROW),
        (ModelServerWaitExceeded("waited too long"), ErrorPolicy.FAILURE_ROW),
        (MessageError("not a task"), ErrorPolicy.FAILURE_ROW),
        (ValueError("a bug"), ErrorPolicy.FAILURE_ROW),
        (ModelServerUnavailable("down"), ErrorPolicy.RETRY_LATER),
        (StudyNotFound("not there yet"), ErrorPolicy.RETRY_LATER),
        (WorkInterrupted("stopping"), ErrorPolicy.RETRY_LATER),
        (PublishError("no queue"), ErrorPolicy.RETRY_LATER),
        (ThresholdError("unknown finding"), ErrorPolicy.STOP),
        (ModelRepositoryError("no repository"), ErrorPolicy.STOP),
    ],
)
def test_every_error_has_one_policy(error: BaseException, policy: ErrorPolicy) -> None:
    assert policy_of(error) is policy


def test_reasons_name_unexpected_errors_by_type() -> None:
    assert reason_of(SeriesDataError("mixed orientations")) == "mixed orientations"
    assert reason_of(KeyError("Rows")) == "KeyError: 'Rows'"
    assert reason_of(RuntimeError()) == "RuntimeError"
    assert SeriesDataError("gap", warnings=["2 duplicates"]).warnings == ["2 duplicates"]


def test_a_stored_result_is_republished_not_recomputed(task: StudyTask) -> None:
    stored = completed(task)
    decision = on_delivery(
        task, attempt=2, max_deliveries=MAX_DELIVERIES, stored=stored, adapter_id="a"
    )
    assert decision is not None
    assert decision.action is Action.ACK
    assert decision.result is stored
    assert not decision.store


def test_a_result_delivered_before_is_acked_not_sent_again(task: StudyTask, tmp_path: Path) -> None:
    """A broker restart can lose the ack of a task whose result the broker had confirmed:
    the redelivery acks it without a second reply (the chaos soak's duplicate)."""
    stored = completed(task)
    mark_delivered(tmp_path, task.task_id, "cts.replies.frontend-a")
    assert was_delivered(tmp_path, task.task_id, "cts.replies.frontend-a")
    # Another submitter of the same task still gets the stored result.
    assert not was_delivered(tmp_path, task.task_id, "cts.replies.frontend-b")
    assert not was_delivered(tmp_path, "0" * 32, "cts.replies.frontend-a")
    decision = on_delivery(
        task,
        attempt=2,
        max_deliveries=MAX_DELIVERIES,
        stored=stored,
        adapter_id="a",
        delivered=True,
    )
    assert decision is not None
    assert decision.action is Action.ACK
    assert decision.result is None  # nothing published again


def test_a_fresh_task_is_worked_on(task: StudyTask) -> None:
    assert (
        on_delivery(task, attempt=1, max_deliveries=MAX_DELIVERIES, stored=None, adapter_id="a")
        is None
    )
    assert (
        on_delivery(task, attempt=3, max_deliveries=MAX_DELIVERIES, stored=None, adapter_id="a")
        is None
    )


def test_a_task_that_killed_every_worker_is_dead_lettered_with_a_failure(task: StudyTask) -> None:
    decision = on_delivery(
        task, attempt=4, max_deliveries=MAX_DELIVERIES, stored=None, adapter_id="a"
    )
    assert decision is not None
    assert decision.action is Action.DEAD_LETTER
    assert decision.store
    assert decision.result is not None
    assert decision.result.status is TaskStatus.FAILED
    (report,) = decision.result.reports
    assert report.processing_status is ProcessingStatus.FAILURE
    assert report.failure_reason is not None
    assert "given up after 3 attempts" in report.failure_reason
    assert decision.reason == report.failure_reason  # the dead letter says why it is there


def test_a_finished_study_is_stored_and_acked(task: StudyTask) -> None:
    result = completed(task)
    decision = on_outcome(task, result, attempt=1, max_deliveries=MAX_DELIVERIES, adapter_id="a")
    assert decision.action is Action.ACK
    assert decision.store
    assert decision.result is result


@pytest.mark.parametrize("error", [ModelServerUnavailable("down"), WorkInterrupted("stopping")])
def test_transient_errors_give_the_task_back_at_once(task: StudyTask, error: Exception) -> None:
    decision = on_outcome(task, error, attempt=1, max_deliveries=MAX_DELIVERIES, adapter_id="a")
    assert decision.action is Action.REQUEUE
    assert decision.result is None
    assert decision.delay_s == 0
    assert not decision.stop_adapter


def test_a_missing_study_is_retried_a_bounded_number_of_times(task: StudyTask) -> None:
    error = StudyNotFound("the study 'uploads/t1/chest.zip' is not in the shared storage")
    for attempt in (1, 2):
        decision = on_outcome(
            task, error, attempt=attempt, max_deliveries=MAX_DELIVERIES, adapter_id="a"
        )
        assert decision.action is Action.REQUEUE
        assert decision.delay_s == MISSING_STUDY_RETRY_DELAY_S
        assert decision.result is None
    decision = on_outcome(task, error, attempt=3, max_deliveries=MAX_DELIVERIES, adapter_id="a")
    assert decision.action is Action.DEAD_LETTER
    assert decision.store
    assert decision.result is not None
    assert decision.result.error == f"{error} (tried 3 times)"
    assert decision.reason == decision.result.error


def test_a_broken_deployment_stops_the_adapter_and_keeps_the_task(task: StudyTask) -> None:
    decision = on_outcome(
        task,
        ConfigurationError("no model repository"),
        attempt=1,
        max_deliveries=MAX_DELIVERIES,
        adapter_id="a",
    )
    assert decision.action is Action.REQUEUE
    assert decision.stop_adapter
    assert decision.result is None


def test_an_unexpected_error_is_a_stored_failure(task: StudyTask) -> None:
    decision = on_outcome(
        task, KeyError("Rows"), attempt=2, max_deliveries=MAX_DELIVERIES, adapter_id="a"
    )
    assert decision.action is Action.ACK
    assert decision.store
    assert decision.result is not None
    assert decision.result.error == "KeyError: 'Rows'"
    assert decision.result.attempt == 2
    assert decision.result.reports[0].path_to_study == "chest.zip"


def test_a_malformed_message_is_answered_and_dead_lettered() -> None:
    body = json.dumps({"task_id": "abc-123", "study_path": 5}).encode()
    decision = on_malformed(
        body,
        MessageError("invalid StudyTask"),
        correlation_id="corr-9",
        message_id=None,
        adapter_id="a",
    )
    assert decision.action is Action.DEAD_LETTER
    assert not decision.store
    assert decision.result is not None
    assert decision.result.task_id == "abc-123"
    assert decision.result.correlation_id == "corr-9"
    assert decision.result.reports[0].path_to_study == UNREADABLE_TASK_NAME
    assert decision.reason == "the task message could not be read: invalid StudyTask"


def test_failed_result_carries_the_task_and_the_reason(task: StudyTask) -> None:
    result = failed_result(task, "the study is gone", adapter_id="a-1", attempt=3)
    assert (result.task_id, result.status, result.error) == (
        task.task_id,
        TaskStatus.FAILED,
        "the study is gone",
    )
    assert result.reports[0].failure_reason == "the study is gone"


def test_acked_and_requeued_decisions_carry_no_dead_letter_reason(task: StudyTask) -> None:
    for outcome in (completed(task), ModelServerUnavailable("down"), KeyError("Rows")):
        decision = on_outcome(
            task, outcome, attempt=1, max_deliveries=MAX_DELIVERIES, adapter_id="a"
        )
        assert decision.action is not Action.DEAD_LETTER
        assert decision.reason == ""


def test_a_dead_letter_keeps_the_message_and_adds_why() -> None:
    original = pika.BasicProperties(
        content_type="application/json",
        type="StudyTask",
        correlation_id="c-1",
        reply_to="cts.replies.f",
        message_id="t-1",
        headers={"schema_version": 1, "x-delivery-count": 3},
    )
    properties = dead_letter_properties(
        original, reason="given up after 3 attempts", adapter_id="host-1", attempt=4
    )
    assert properties.headers[REASON_HEADER] == "given up after 3 attempts"
    assert properties.headers[ADAPTER_HEADER] == "host-1"
    assert properties.headers[DELIVERY_HEADER] == 4
    assert properties.headers["schema_version"] == 1  # the original headers stay
    assert (properties.type, properties.correlation_id, properties.reply_to) == (
        "StudyTask",
        "c-1",
        "cts.replies.f",
    )
    assert properties.message_id == "t-1"
    assert properties.delivery_mode == pika.DeliveryMode.Persistent.value
    assert original.headers == {"schema_version": 1, "x-delivery-count": 3}  # not changed
    long = dead_letter_properties(original, reason="x" * 5000, adapter_id="a", attempt=1)
    assert len(long.headers[REASON_HEADER]) == MAX_REASON_CHARS


def test_failure_rows_of_a_demo_deployment_say_so(task: StudyTask) -> None:
    result = failed_result(task, "the study is gone", adapter_id="a-1", attempt=3)
    assert result.reports[0].demo_weights is False
    flagged = with_demo_flag(result, True)
    assert [report.demo_weights for report in flagged.reports] == [True]
    assert result.reports[0].demo_weights is False  # a copy, the original is unchanged
    assert with_demo_flag(flagged, True) is flagged
