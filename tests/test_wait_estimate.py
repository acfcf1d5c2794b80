"""The expected waits of unfinished studies (services/frontend/wait_estimate.py,
queue_status.queue_places): pure logic over the registry's measured stage times."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from services.broker.schemas import WAITING_FOR_PREPARATION
from services.frontend.queue_status import QueueStatus, pending_tasks, queue_places
from services.frontend.wait_estimate import (
    CHECK_SHARE_OF_PREPARATION,
    Pending,
    Where,
    Workers,
    estimate_waits,
)
from services.registry.records import PipelineTask, Priority, StageTimes, StudyState

TIMES = StageTimes(prepare_s=10.0, model_s=40.0, model_share=1.0, samples=20)
ROUTINE, STAT = Priority.ROUTINE, Priority.STAT


def queued(task_id: str, priority: Priority = ROUTINE) -> Pending:
    return Pending(task_id, priority, Where.QUEUED)


def test_one_adapter_prepares_while_the_model_runs() -> None:
    waits = estimate_waits([queued(f"q{i}") for i in range(3)], Workers(1, 1), TIMES)
    # Prepared at 10, 20, 30; the model (the bottleneck) ends them at 50, 90, 130: the
    # preparation of the next study overlaps the model run of the one before.
    assert waits == {"q0": 50.0, "q1": 90.0, "q2": 130.0}


def test_a_stat_study_queued_last_is_next_and_its_wait_counts_only_what_is_ahead() -> None:
    tasks = [queued("r0"), queued("r1"), queued("r2"), queued("s", STAT)]
    places = queue_places(tasks, QueueStatus(waiting=4, workers=1, preparers=1), TIMES)
    assert [places[task].ahead for task in ("s", "r0", "r1", "r2")] == [0, 1, 2, 3]
    assert places["s"].expected_wait_s == 50.0
    assert places["r2"].expected_wait_s == 170.0


def test_prepared_studies_and_the_one_in_the_model_are_ahead_of_the_queue() -> None:
    tasks = [
        Pending("m", ROUTINE, Where.IN_MODEL),
        Pending("p", ROUTINE, Where.PREPARED),
        Pending("busy", ROUTINE, Where.PREPARING, elapsed_s=4.0),
        queued("q"),
    ]
    waits = estimate_waits(tasks, Workers(1, 1), TIMES)
    # The model run in progress is half done (20 s left); then the prepared one (to 60),
    # the one being prepared (ready at 6, run 60-100), the queued one (ready at 16, 100-140).
    assert waits == {"m": 20.0, "p": 60.0, "busy": 100.0, "q": 140.0}
    # A STAT study prepared after routine ones still takes the model first.
    stat = estimate_waits([*tasks[:2], Pending("s", STAT, Where.PREPARED)], Workers(1, 1), TIMES)
    assert stat["s"] == 60.0
    assert stat["p"] == 100.0


def test_studies_that_will_likely_be_refused_shorten_the_wait_of_those_behind() -> None:
    tasks = [queued(f"q{i}") for i in range(5)]
    all_chest = estimate_waits(tasks, Workers(1, 1), TIMES)
    half_refused = estimate_waits(
        tasks, Workers(1, 1), TIMES.model_copy(update={"model_share": 0.5})
    )
    assert half_refused["q0"] == all_chest["q0"]  # its own model run is a whole one
    assert half_refused["q4"] < all_chest["q4"]


def test_more_adapters_shorten_the_wait_and_the_estimate_follows_the_queue() -> None:
    tasks = [queued(f"q{i}") for i in range(4)]
    one = estimate_waits(tasks, Workers(1, 1), TIMES)
    two = estimate_waits(tasks, Workers(2, 2), TIMES)
    assert two["q3"] < one["q3"]
    # q0 and q1 are done: q3's wait is recomputed from the queue as it is now.
    moved = estimate_waits(tasks[2:], Workers(1, 1), TIMES)
    assert moved["q3"] == one["q1"]


def test_no_estimate_without_measurements_or_adapters() -> None:
    tasks = [queued("q")]
    assert estimate_waits(tasks, Workers(1, 1), StageTimes()) == {}
    assert estimate_waits(tasks, Workers(1, 0), TIMES) == {}
    assert estimate_waits(tasks, Workers(0, 1), TIMES) == {}  # nobody prepares it
    places = queue_places(tasks, QueueStatus(waiting=1, workers=0, preparers=0), TIMES)
    assert places["q"].expected_wait_s is None
    assert places["q"].workers == 0
    assert queue_places(tasks, None, TIMES) == {}  # broker down: no guess


CHECKED_TIMES = TIMES.model_copy(update={"check_s": 4.0})


def test_checking_first_a_burst_is_checked_before_it_is_prepared() -> None:
    tasks = [queued(f"q{i}") for i in range(3)]
    waits = estimate_waits(tasks, Workers(1, 1), CHECKED_TIMES, check_first=True)
    # Checked at 4, 8, 12 (each while others wait), then prepared for the rest of their
    # 10 s (ready at 18, 24, 30); the model ends them at 58, 98, 138.
    assert waits == {"q0": 58.0, "q1": 98.0, "q2": 138.0}
    assert estimate_waits(tasks, Workers(1, 1), CHECKED_TIMES) == {
        "q0": 50.0,
        "q1": 90.0,
        "q2": 130.0,
    }


def test_a_new_study_is_checked_before_the_checked_ones_are_prepared() -> None:
    tasks = [Pending("c", ROUTINE, Where.CHECKED), queued("n"), queued("s", STAT)]
    waits = estimate_waits(tasks, Workers(1, 1), CHECKED_TIMES, check_first=True)
    # The STAT study waits for nothing of its priority: prepared at once (0-10, model
    # 10-50). Then n is checked (10-14) since c waits, c is prepared (14-20, model 50-90),
    # n after it (20-26, model 90-130).
    assert waits == {"s": 50.0, "c": 90.0, "n": 130.0}


def test_without_a_timed_refusal_a_check_is_a_share_of_a_preparation() -> None:
    tasks = [queued("q0"), queued("q1")]
    waits = estimate_waits(tasks, Workers(1, 1), TIMES, check_first=True)
    check = TIMES.prepare_s * CHECK_SHARE_OF_PREPARATION
    assert check == 4.0
    # q0 checked (0-4) while q1 waits; q1 checked (4-8) while q0 waits checked (first in,
    # first out); q0 prepared (8-14, model 14-54), q1 (14-20, model 54-94).
    assert waits == {"q0": 54.0, "q1": 94.0}


def test_a_checked_study_is_placed_in_the_line(tmp_path: Path) -> None:
    rows = [
        PipelineTask(
            task_id="c",
            priority=ROUTINE,
            state=StudyState.PROCESSING,
            stage=WAITING_FOR_PREPARATION,
        ),
        PipelineTask(task_id="q", priority=ROUTINE, state=StudyState.QUEUED),
    ]
    tasks = pending_tasks(rows, tmp_path, datetime.now(UTC))
    assert [task.where for task in tasks] == [Where.CHECKED, Where.QUEUED]
    places = queue_places(
        tasks, QueueStatus(waiting=2, workers=1, preparers=1), CHECKED_TIMES, check_first=True
    )
    assert [places[task].ahead for task in ("c", "q")] == [0, 1]
    # q is checked (0-4) while c waits; c is prepared (4-10, model 10-50), then q.
    assert places["c"].expected_wait_s == 50.0
    assert places["q"].expected_wait_s == 90.0


def test_a_check_still_running_is_not_yet_in_its_lane() -> None:
    """Three adapters, two new studies: the first is checked (0-4) while the second waits;
    the second finds nothing else waiting (the first is still being checked) and is prepared
    at once (0-10); the first is prepared after its check (4-10)."""
    waits = estimate_waits(
        [queued("a"), queued("b")], Workers(3, 3), CHECKED_TIMES, check_first=True
    )
    assert waits == {"a": 50.0, "b": 50.0}


def test_under_a_flood_checked_studies_are_prepared_between_the_checks() -> None:
    """Once ``max_checked_waiting`` checked studies wait, one of them is prepared before the
    next new one is checked: the first result does not wait for every check of the flood."""
    tasks = [queued(f"q{i}") for i in range(5)]

    def waits(limit: int) -> dict[str, float]:
        return estimate_waits(
            tasks, Workers(1, 1), CHECKED_TIMES, check_first=True, max_checked_waiting=limit
        )

    # Limit 2: q0, q1 checked (0-8), q0 prepared (8-14, model 14-54), q2 checked, q1
    # prepared (18-24), ...
    assert waits(2)["q0"] == 54.0
    # Limit 8: all five checked first (0-20), q0 prepared (20-26, model 26-66).
    assert waits(8)["q0"] == 66.0
    assert waits(2)["q4"] <= waits(8)["q4"]
