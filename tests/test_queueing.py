"""Triage-grade queueing against the real broker and Triton: a study that will be refused is
answered by the preparation stage whatever waits for the model, a STAT study goes before
the routine ones still waiting, in both stages' lanes, and an adapter killed inside the model
stage leaves exactly one result.

Ordering is made certain rather than raced: an adapter that runs only the preparation stage
leaves every prepared study waiting in the model lanes (no model stage exists yet), and an
adapter that runs only the model stage is started once the lanes are filled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
import test_adapter
from prometheus_client import CollectorRegistry
from stack_support import start_service, wait_for, zip_directory
from test_adapter import Client, upload

from services.adapter.consumer import Adapter
from services.adapter.handoff import kept_intake_dir, prepared_dir, read_handoff
from services.adapter.held_inputs import Handover
from services.adapter.metrics import AdapterMetrics
from services.adapter.stage_loop import PRESENCE_COUNT_INTERVAL_S
from services.broker.connection import declare_topology, publish_task
from services.broker.schemas import (
    PREPARE_STAGE,
    STAGES,
    WAITING_FOR_PREPARATION,
    Priority,
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    TaskStatus,
)
from services.broker.storage import load_result
from services.core.config import AdapterSettings, Settings
from services.core.schemas import ProcessingStatus
from services.triton.local_server import LocalTritonServer

pytestmark = [pytest.mark.rabbitmq, pytest.mark.triton, pytest.mark.slow]

# test_adapter's module fixtures: the tiny repository on a Triton of this module's own.
tiny_repository = test_adapter.tiny_repository
triton = test_adapter.triton
studies = test_adapter.studies
settings = test_adapter.settings


@contextmanager
def adapter_running(
    settings: Settings,
    adapter_id: str,
    stages: list[str],
    metrics: AdapterMetrics | None = None,
) -> Iterator[Adapter]:
    stage_settings = AdapterSettings.model_validate({"stages": stages})
    staged = settings.model_copy(update={"adapter": stage_settings})
    adapter = Adapter(staged, adapter_id=adapter_id, drain_timeout_s=10, metrics=metrics)
    thread = threading.Thread(target=adapter.run, daemon=True)
    thread.start()
    try:
        yield adapter
    finally:
        adapter.request_stop()
        thread.join(30)
        assert not thread.is_alive(), f"{adapter_id} did not stop"


def submit(
    client: Client,
    settings: Settings,
    study: Path,
    name: str,
    priority: Priority = Priority.ROUTINE,
) -> str:
    task_id, relative = upload(settings, study)
    task = StudyTask(
        task_id=task_id,
        study_path=relative,
        original_filename=name,
        reply_to=client.reply_queue,
        priority=priority,
    )
    publish_task(client.channel, QueueTopology.from_settings(settings.rabbitmq), task)
    return task_id


def waiting_in(client: Client, queues: list[str]) -> int:
    return sum(
        client.channel.queue_declare(queue, passive=True).method.message_count for queue in queues
    )


def results_in_order(client: Client) -> list[str]:
    client.poll()
    return [message.task_id for message in client.messages if isinstance(message, StudyResult)]


def started_order(client: Client) -> list[str]:
    client.poll()
    return [
        message.task_id
        for message in client.messages
        if isinstance(message, StudyProgress) and message.stage == "started"
    ]


def adapter_process(
    settings: Settings, adapter_id: str, log: IO[bytes], environment: dict[str, str]
) -> subprocess.Popen:
    """``python -m services.adapter`` on this test's queues, storage and Triton."""
    return start_service(
        "services.adapter",
        {
            **os.environ,
            "CTS__STORAGE__ROOT": str(settings.storage.root),
            "CTS__RABBITMQ__QUEUE_PREFIX": settings.rabbitmq.queue_prefix,
            # The queues' arguments must match the ones this test declared.
            "CTS__RABBITMQ__MAX_DELIVERIES": str(settings.rabbitmq.max_deliveries),
            "CTS__INFERENCE__MODEL_REPOSITORY": str(settings.inference.model_repository),
            "CTS__INFERENCE__TRITON_URL": settings.inference.triton_url,
            **environment,
        },
        "--adapter-id",
        adapter_id,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def chest_in_model_request(
    client: Client, settings: Settings, studies: dict[str, Path], adapter_id: str
) -> str:
    """A chest CT submitted; its task id once ``adapter_id`` sent its model request."""
    task_id = submit(client, settings, studies["chest"], "chest.zip")

    def in_model_request() -> bool:
        client.poll()
        return any(
            isinstance(message, StudyProgress)
            and message.task_id == task_id
            and message.adapter_id == adapter_id
            and message.stage == "inference"
            for message in client.messages
        )

    wait_for(in_model_request, 120, f"{adapter_id} inside the model request")
    return task_id


def assert_finished_once_after_the_kill(
    client: Client, settings: Settings, result: StudyResult, survivor: str
) -> None:
    assert result.status is TaskStatus.COMPLETED
    assert result.reports[0].processing_status is ProcessingStatus.SUCCESS
    assert result.adapter_id == survivor
    assert result.attempt == 2  # the broker's redelivery of the ModelTask, not a copy
    assert results_in_order(client) == [result.task_id]  # exactly one result
    assert load_result(settings.storage.root, result.task_id) == result
    assert not prepared_dir(settings.storage.root, result.task_id).exists()


@pytest.fixture
def topology(settings: Settings) -> QueueTopology:
    return QueueTopology.from_settings(settings.rabbitmq)


@pytest.fixture
def client(settings: Settings, topology: QueueTopology) -> Iterator[Client]:
    client = Client(settings)
    declare_topology(client.channel, topology)
    yield client
    client.close()


def test_a_refusal_overtakes_studies_waiting_for_the_model(
    settings: Settings, studies: dict[str, Path], client: Client, topology: QueueTopology
) -> None:
    chests = [submit(client, settings, studies["chest"], f"chest-{n}.zip") for n in range(3)]
    head = submit(client, settings, studies["head"], "head.zip")
    with adapter_running(settings, "prepare-only", ["prepare"]):
        refused = client.result(head)
        # Every chest CT is prepared and waits for the model; none has a result yet.
        wait_for(
            lambda: waiting_in(client, topology.model_lanes()) == len(chests),
            90,
            "the chest CTs waiting in the model lane",
        )
        assert results_in_order(client) == [head]
    assert refused.status is TaskStatus.COMPLETED
    assert refused.reports[0].processing_status is ProcessingStatus.FAILURE
    assert "chest" in (refused.reports[0].failure_reason or "").lower()
    assert refused.adapter_id == "prepare-only"
    assert not prepared_dir(settings.storage.root, head).exists()  # nothing left for the model
    assert all((prepared_dir(settings.storage.root, c) / "handoff.json").is_file() for c in chests)

    with adapter_running(settings, "model-only", ["model"]):
        finished = [client.result(task_id) for task_id in chests]
    assert [result.status for result in finished] == [TaskStatus.COMPLETED] * len(chests)
    assert all(r.reports[0].processing_status is ProcessingStatus.SUCCESS for r in finished)
    assert all(r.reports[0].probability_of_pathology is not None for r in finished)
    assert {r.adapter_id for r in finished} == {"model-only"}
    # The model stage leaves no prepared input behind (221 MB each at full size).
    assert not any(prepared_dir(settings.storage.root, c).exists() for c in chests)
    assert sorted(results_in_order(client)) == sorted([head, *chests])  # one result each


def test_refusals_behind_chest_cts_are_answered_before_any_full_preparation(
    settings: Settings,
    studies: dict[str, Path],
    client: Client,
    topology: QueueTopology,
    fixtures_dir: Path,
    tmp_path: Path,
) -> None:
    """Three chest CTs queued, then a head CT (refused by its images), an MR (not CT) and a
    broken archive: the preparation stage checks each chest only as far as is cheap while
    the others wait, so the three refusals come before the first chest's full preparation;
    the chests are then prepared first in, first out, each once."""
    chests = [submit(client, settings, studies["chest"], f"chest-{n}.zip") for n in range(3)]
    mr = zip_directory(fixtures_dir / "mr_brain_t1", tmp_path / "mr.zip")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(studies["chest"].read_bytes()[:5000])  # cut off: not a readable zip
    refusals = [
        submit(client, settings, studies["head"], "head.zip"),
        submit(client, settings, mr, "mr.zip"),
        submit(client, settings, broken, "broken.zip"),
    ]
    with adapter_running(settings, "prepare-only", ["prepare"]):
        wait_for(
            lambda: waiting_in(client, topology.model_lanes()) == len(chests),
            120,
            "the chest CTs prepared",
        )
    client.poll()
    events = [
        (message.task_id, message.stage if isinstance(message, StudyProgress) else "result")
        for message in client.messages
    ]
    for chest in chests:
        # Taken, checked, put in the preparation lane; taken again and prepared once.
        turns = [
            stage
            for task_id, stage in events
            if task_id == chest and stage in ("started", WAITING_FOR_PREPARATION)
        ]
        assert turns == ["started", WAITING_FOR_PREPARATION, "started"]
    full_preparations = [
        [index for index, event in enumerate(events) if event == (chest, "started")][1]
        for chest in chests
    ]
    results = {task_id: index for index, (task_id, stage) in enumerate(events) if stage == "result"}
    assert sorted(results) == sorted(refusals)  # the chests wait for the model
    assert max(results.values()) < min(full_preparations)
    assert full_preparations == sorted(full_preparations)  # first in, first out
    for task_id in refusals:
        report = client.result(task_id).reports[0]
        assert report.processing_status is ProcessingStatus.FAILURE
        assert report.failure_reason
    assert waiting_in(client, topology.preparation_lanes()) == 0
    storage = settings.storage.root
    # What the checks unpacked stays until the results are stored; refusals keep nothing.
    assert all((kept_intake_dir(storage, chest) / "intake.json").is_file() for chest in chests)
    assert all((prepared_dir(storage, chest) / "handoff.json").is_file() for chest in chests)
    assert not any(prepared_dir(storage, task_id).exists() for task_id in refusals)


def test_a_stat_study_behind_ten_routine_ones_is_served_first(
    settings: Settings, studies: dict[str, Path], client: Client, topology: QueueTopology
) -> None:
    routine = [submit(client, settings, studies["chest"], f"routine-{n}.zip") for n in range(10)]
    stat = submit(client, settings, studies["chest"], "stat.zip", Priority.STAT)
    assert waiting_in(client, [topology.task_lane(Priority.STAT)]) == 1

    with adapter_running(settings, "prepare-only", ["prepare"]) as preparer:
        wait_for(
            lambda: waiting_in(client, topology.model_lanes()) == 11,
            240,
            "every study prepared",
        )
        assert preparer.processed == 0  # hand-offs are not results
    # The preparation stage took the STAT task first (its lane is asked first).
    assert started_order(client)[0] == stat
    assert waiting_in(client, [topology.model_lane(Priority.STAT)]) == 1
    with adapter_running(settings, "model-only", ["model"]):
        first = wait_for(lambda: results_in_order(client) or None, 90, "the first result")
        assert first[0] == stat
        # The routine ones follow, each once.
        wait_for(lambda: len(results_in_order(client)) == 11, 240, "every result")
    assert sorted(results_in_order(client)) == sorted([stat, *routine])


def test_an_adapter_killed_inside_the_model_stage_leaves_exactly_one_result(
    settings: Settings,
    studies: dict[str, Path],
    client: Client,
    topology: QueueTopology,
    triton: LocalTritonServer,
    tmp_path: Path,
) -> None:
    """kill -9 of an adapter process while its model stage holds the prepared study (its
    model request hangs on a frozen Triton): the broker gives the ModelTask to another
    adapter, which finishes it once; the prepared folder is still there for it."""
    log = (tmp_path / "victim.log").open("wb")  # read when the victim does not come up
    victim = adapter_process(settings, "model-victim", log, {"CTS__ADAPTER__STAGES": '["model"]'})
    # The preparation asks Triton nothing (no body-part regression), so it works while
    # Triton is frozen; the model stage's request cannot.
    preparing = settings.model_copy(deep=True)
    preparing.chest_check.body_part_regression = False
    assert triton.pid is not None
    try:
        test_adapter.wait_until_consuming(settings)  # the victim's model stage is up
        with adapter_running(preparing, "prepare-only", ["prepare"]):
            presence = topology.presence_queue(PREPARE_STAGE)
            wait_for(
                lambda: client.channel.queue_declare(presence, passive=True).method.consumer_count,
                60,
                "the preparation stage up (its backend checked while Triton answers)",
            )
            os.kill(triton.pid, signal.SIGSTOP)
            try:
                task_id = chest_in_model_request(client, settings, studies, "model-victim")
                victim.kill()  # kill -9
                victim.wait(30)
            finally:
                os.kill(triton.pid, signal.SIGCONT)
        assert (prepared_dir(settings.storage.root, task_id) / "handoff.json").is_file()
        assert waiting_in(client, topology.task_lanes()) == 0  # not prepared again
        with adapter_running(settings, "model-survivor", ["model"]):
            result = client.result(task_id, timeout_s=120)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(30)
        log.close()
    assert_finished_once_after_the_kill(client, settings, result, "model-survivor")


def handovers(registry: CollectorRegistry) -> dict[str, float | None]:
    """How the model stage got its inputs (``cts_adapter_model_inputs_total``)."""
    return {
        handover.value: registry.get_sample_value(
            "cts_adapter_model_inputs_total", {"handover": handover.value}
        )
        for handover in Handover
    }


def test_the_model_input_stays_in_memory_only_while_one_model_stage_is_alive(
    settings: Settings, studies: dict[str, Path], client: Client
) -> None:
    """One adapter: its preparation keeps the input for its own model stage (nothing is
    written). Two: either model stage may take the task, so the input is written."""
    alone_metrics, second_metrics = CollectorRegistry(), CollectorRegistry()
    with adapter_running(settings, "alone", list(STAGES), AdapterMetrics(alone_metrics)) as alone:
        wait_for(alone.model_stage_alone, 60, "the adapter's model stage counted alone")
        held = client.result(submit(client, settings, studies["chest"], "held.zip"), 120)
        assert handovers(alone_metrics) == {"memory": 1.0, "file": 0.0, "prepared_again": 0.0}
        with adapter_running(
            settings, "second", list(STAGES), AdapterMetrics(second_metrics)
        ) as second:
            wait_for(
                lambda: not alone.model_stage_alone() and not second.model_stage_alone(),
                60,
                "both adapters counting two model stages",
            )
            written = client.result(submit(client, settings, studies["chest"], "written.zip"), 120)
    after = {key: value or 0.0 for key, value in handovers(alone_metrics).items()}
    for key, value in handovers(second_metrics).items():
        after[key] += value or 0.0
    assert after == {"memory": 1.0, "file": 1.0, "prepared_again": 0.0}
    for result in (held, written):
        assert result.status is TaskStatus.COMPLETED
        assert result.reports[0].processing_status is ProcessingStatus.SUCCESS
    assert written.reports[0].probability_of_pathology == pytest.approx(
        held.reports[0].probability_of_pathology, abs=1e-6
    )


def test_an_adapter_killed_while_holding_the_model_input_in_memory_leaves_exactly_one_result(
    settings: Settings,
    studies: dict[str, Path],
    client: Client,
    triton: LocalTritonServer,
    tmp_path: Path,
) -> None:
    """kill -9 of an adapter running both stages, inside the model request of a study whose
    input only its memory held: the ModelTask goes to the next adapter, whose model stage
    finds the input nowhere and sends the task back to its preparation lane; it is prepared
    again and finished once, its deliveries counted on."""
    log = (tmp_path / "victim.log").open("wb")
    # Its preparation asks Triton nothing (no body-part regression): it works while Triton
    # is frozen, and the model request cannot.
    environment = {"CTS__CHEST_CHECK__BODY_PART_REGRESSION": "false"}
    victim = adapter_process(settings, "both-victim", log, environment)
    survivor_metrics = CollectorRegistry()
    assert triton.pid is not None
    try:
        test_adapter.wait_until_consuming(settings)  # the victim's model stage is up
        time.sleep(2 * PRESENCE_COUNT_INTERVAL_S)  # and has counted itself alone
        os.kill(triton.pid, signal.SIGSTOP)
        try:
            task_id = chest_in_model_request(client, settings, studies, "both-victim")
            record = read_handoff(settings.storage.root, task_id)
            assert record is not None
            assert [entry.input_in_memory for entry in record.entries] == [True]
            assert not list(prepared_dir(settings.storage.root, task_id).glob("*.npy"))
            victim.kill()  # kill -9: the input is gone with it
            victim.wait(30)
        finally:
            os.kill(triton.pid, signal.SIGCONT)
        with adapter_running(settings, "survivor", list(STAGES), AdapterMetrics(survivor_metrics)):
            result = client.result(task_id, timeout_s=120)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(30)
        log.close()
    assert_finished_once_after_the_kill(client, settings, result, "survivor")
    # Sent back from its model stage, prepared again and taken from memory (or from the
    # storage, had the survivor still counted the victim's model stage).
    taken = handovers(survivor_metrics)
    assert taken["prepared_again"] == 1.0
    assert (taken["memory"] or 0.0) + (taken["file"] or 0.0) == 1.0


def test_an_adapter_that_stops_writes_the_inputs_it_holds_for_the_next_one(
    settings: Settings, studies: dict[str, Path], client: Client, triton: LocalTritonServer
) -> None:
    """A graceful stop (SIGTERM) with two inputs held, one in a model request hanging on a
    frozen Triton and one waiting in the model lane: both are written to the storage, and
    the next adapter takes the waiting one from there without preparing it again."""
    # The preparation asks Triton nothing (no body-part regression): it works while Triton
    # is frozen.
    preparing = settings.model_copy(deep=True)
    preparing.chest_check.body_part_regression = False
    assert triton.pid is not None
    frozen = False
    try:
        with adapter_running(preparing, "stopping", list(STAGES)) as stopping:
            wait_for(stopping.model_stage_alone, 60, "the adapter's model stage counted alone")
            os.kill(triton.pid, signal.SIGSTOP)
            frozen = True
            in_request = chest_in_model_request(client, settings, studies, "stopping")
            waiting = submit(client, settings, studies["chest"], "waiting.zip")
            wait_for(lambda: len(stopping.held_inputs) == 2, 60, "the second input held")
        # Leaving the block stopped it: both tasks given back, what it held written.
        for task_id in (in_request, waiting):
            folder = prepared_dir(settings.storage.root, task_id)
            assert [path.name for path in folder.glob("*.npy")] == ["study1.npy"]
    finally:
        if frozen:
            os.kill(triton.pid, signal.SIGCONT)
    with adapter_running(settings, "next", list(STAGES)):
        result = client.result(waiting, timeout_s=120)
        client.result(in_request, timeout_s=120)  # its model request may still finish it
    assert result.status is TaskStatus.COMPLETED
    assert result.adapter_id == "next"
    assert sorted(results_in_order(client)) == sorted([in_request, waiting])  # one each
    sent_back = [
        message
        for message in client.messages
        if isinstance(message, StudyProgress)
        and message.task_id == waiting
        and message.stage == WAITING_FOR_PREPARATION
    ]
    assert sent_back == []  # its input came from the storage: not prepared again
