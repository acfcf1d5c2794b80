"""The expected waits of unfinished studies (services/frontend/wait_estimate.py,
queue_status.queue_places): pure logic over the registry's measured stage times."""

from __future__ import annotations

from services.frontend.queue_status import QueueStatus, queue_places
from services.frontend.wait_estimate import Pending, Where, Workers, estimate_waits
from services.registry.records import Priority, StageTimes

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
