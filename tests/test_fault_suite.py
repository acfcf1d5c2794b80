"""Nothing lost, nothing duplicated: faults injected into the real local stack.

One stack for the module, started by ``./start.sh --local`` (the system RabbitMQ, Triton
from the nvidia-pytriton wheel serving the tiny demo repository, two adapters, the Gradio
frontend) and stopped by ``./stop.sh``. Each scenario sends several real studies (the chest
CT and the head CT fixtures, each under its own task id), breaks something on purpose, then
counts the final results of every task where the user sees them (the reply queue, or the
page for the frontend scenario) and in ``storage/results``: exactly one each.

To make "while a study is in progress" certain rather than a race, some scenarios freeze
Triton (SIGSTOP of its process group): the adapters then sit in the middle of a study,
inside the model request, until Triton is thawed (SIGCONT). No product code waits on
purpose; a frozen server is one more fault the stack must survive.

The table "scenario | studies sent | results | lost | duplicated" is printed at the end of
the run (terminal summary).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import openpyxl
import pytest
from fault_support import (
    LocalStack,
    Outcome,
    SentStudy,
    StackPorts,
    TaskClient,
    assert_screened,
    consumers_of,
    count_outcome,
    drain_queue,
    ensure_rabbitmq_running,
    outcome_table,
    postgres_restarted,
    prepared_or_checked,
    queue_state,
    rabbitmq_restarted,
    record_outcome,
    replies_tally,
    study_zips,
)
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright
from registry_support import postgres_database
from sqlalchemy.engine import URL
from stack_support import delete_topology, wait_for
from web_support import PASSWORD, sign_in_page
from worklist_page import (
    CHROMIUM,
    CHROMIUM_ARGS,
    download_all,
    finished_rows,
    worklist_rows,
)
from worklist_page import upload as upload_files

from services.adapter.dead_letters import REASON_HEADER
from services.adapter.handoff import kept_intake_dir
from services.broker.connection import connect
from services.broker.schemas import MODEL_STAGE, QueueTopology, TaskStatus
from services.broker.storage import load_result
from services.core.access import Role
from services.core.config import RabbitMQSettings, load_settings
from services.core.schemas import ProcessingStatus
from services.frontend.service import FrontendService
from services.registry import Door, Registry, StudyFilter, upgrade_registry
from services.triton.local_server import free_local_ports

pytestmark = [pytest.mark.rabbitmq, pytest.mark.triton, pytest.mark.slow]

TRITON_OUTAGE_S = 60.0
RESULT_TIMEOUT_S = 120.0


# -- the table ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest) -> Iterator[list[Outcome]]:
    yield from outcome_table(request, "fault suite: nothing lost, nothing duplicated")


@pytest.fixture(scope="module", autouse=True)
def broker_left_running() -> Iterator[None]:
    """Later tests and other developers share the system broker: whatever a scenario did to
    it, the module leaves it accepting clients (a teardown, not a test)."""
    yield
    settings = RabbitMQSettings()
    ensure_rabbitmq_running(settings)
    connect(settings, name="fault suite final check", give_up_after_s=10).close()


# -- the stack ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zips(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return study_zips(fixtures_dir, tmp_path_factory.mktemp("fault-zips"), ("chest", "head", "mr"))


@pytest.fixture(scope="module")
def registry_url() -> Iterator[URL]:
    """The stack's registry on the machine's PostgreSQL (a database of its own), so that a
    database restart is a fault the suite can inject."""
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def registry(stack: LocalStack, registry_url: URL) -> Iterator[Registry]:
    opened = Registry(registry_url)  # start.sh upgraded it
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def stack(
    tiny_model_repository: Path, tmp_path_factory: pytest.TempPathFactory, registry_url: URL
) -> Iterator[LocalStack]:
    frontend, http, grpc, metrics = free_local_ports(4)
    prefix = f"test-fault-{uuid.uuid4().hex[:10]}"
    local = LocalStack(
        repository=tiny_model_repository,
        storage=tmp_path_factory.mktemp("fault-stack") / "storage",
        prefix=prefix,
        ports=StackPorts(frontend, http, grpc, metrics),
        adapters=2,
    )
    local.environment["CTS__REGISTRY__URL"] = registry_url.render_as_string(hide_password=False)
    ensure_rabbitmq_running(local.broker)
    try:
        local.start()
        yield local
    finally:
        ensure_rabbitmq_running(local.broker)  # whatever a scenario did to it
        stopped = local.stop()
        delete_topology(local.broker)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert list(local.run_dir.glob("*.pid")) == []
    # Relaunched services included, nothing of this stack outlives stop.sh.
    assert local.leftover_processes() == []


@pytest.fixture
def healthy_stack(stack: LocalStack) -> LocalStack:
    """Every service up and connected before a scenario starts."""
    ensure_rabbitmq_running(stack.broker)
    stack.heal()
    topology = QueueTopology(prefix=stack.prefix)
    wait_for(
        lambda: (
            consumers_of(stack.broker, topology.presence_queue(MODEL_STAGE))
            == len(stack.adapter_names)
        ),
        120,
        "both adapters consuming",
        interval_s=0.5,
    )
    return stack


@pytest.fixture
def client(healthy_stack: LocalStack) -> Iterator[TaskClient]:
    reply_queue = f"{healthy_stack.prefix}.replies.fault-{uuid.uuid4().hex[:8]}"
    task_client = TaskClient(healthy_stack.broker, healthy_stack.storage, reply_queue)
    task_client.poll()  # declares the reply queue before any task names it
    yield task_client
    task_client.close()
    ensure_rabbitmq_running(healthy_stack.broker)
    connection = connect(healthy_stack.broker, name="fault suite cleanup", give_up_after_s=30)
    try:
        connection.channel().queue_delete(reply_queue)
    finally:
        connection.close()


@pytest.fixture
def tally(
    client: TaskClient, registry: Registry, outcomes: list[Outcome]
) -> Callable[..., Outcome]:
    return replies_tally(client, registry, outcomes)


def open_again_as_a_person_would(page: Page, url: str, attempts: int = 3) -> Page:
    """The page again once the frontend is back, in a new tab of the same browser (its session
    cookie and stored choices): the old tab may be in any state after its server died (a
    reload of it was aborted with net::ERR_ABORTED, and once found it no longer attached), so
    it is closed. A navigation that fails is tried again a second later, as a person would."""
    fresh = page.context.new_page()
    with contextlib.suppress(PlaywrightError):
        page.close()
    for attempt in range(1, attempts + 1):
        try:
            fresh.goto(url)
            break
        except PlaywrightError:
            if attempt == attempts:
                raise
            fresh.wait_for_timeout(1000)
    return fresh


# -- scenarios --------------------------------------------------------------------------------


def test_poison_tasks_are_dead_lettered_with_a_failure_result(
    healthy_stack: LocalStack,
    client: TaskClient,
    zips: dict[str, Path],
    tally: Callable[..., Outcome],
) -> None:
    stack = healthy_stack
    topology = QueueTopology(prefix=stack.prefix)
    drain_queue(stack.broker, topology.dead_letter_queue)  # only this scenario's letters
    sent = [
        client.submit(zips["chest"], "poison-chest-1.zip", "chest"),
        client.submit_unreadable(b'{"schema_version": 1, "task_id": ', "unreadable JSON"),
        client.submit(zips["head"], "poison-head-1.zip", "head"),
        client.submit(None, "poison-missing.zip", "poison"),  # valid task, no file
        client.submit(zips["chest"], "poison-chest-2.zip", "chest"),
    ]
    client.wait_for_results(sent, RESULT_TIMEOUT_S)
    client.settle()
    unreadable, missing = client.result(sent[1].task_id), client.result(sent[3].task_id)

    # Malformed: failed at once (first delivery), the submitter is told under its own id.
    assert unreadable.status is TaskStatus.FAILED
    assert "could not be read" in unreadable.error
    assert unreadable.reports[0].processing_status is ProcessingStatus.FAILURE
    assert load_result(stack.storage, sent[1].task_id) is None  # its id cannot be trusted
    # Missing study: tried max_deliveries times (bounded), then failed with the reason.
    assert missing.status is TaskStatus.FAILED
    assert "not in the shared storage" in missing.error
    assert missing.attempt == stack.broker.max_deliveries
    assert load_result(stack.storage, sent[3].task_id) == missing
    assert_screened(client, sent)
    # Both poison messages, and nothing else, wait in the dead-letter queue for a human.
    dead = drain_queue(stack.broker, topology.dead_letter_queue)
    assert len(dead) == 2
    assert dead[0][1] == b'{"schema_version": 1, "task_id": '
    assert json.loads(dead[1][1])["task_id"] == sent[3].task_id
    # Each says why it is there (the adapter's header), not just the broker's "rejected".
    reasons = [(properties.headers or {}).get(REASON_HEADER, "") for properties, _ in dead]
    assert reasons[0].startswith("the task message could not be read")
    assert reasons[1] == missing.error
    assert queue_state(topology.task_queue).ready == 0

    tally(
        "poison tasks (malformed JSON, missing study file)",
        sent,
        stored_expected=lambda study: study is not sent[1],
        note=(
            "malformed: dead-lettered on the 1st delivery; missing file: "
            f"{missing.attempt} tries, then dead-lettered; both got a Failure result"
        ),
    )


def test_adapter_killed_mid_study_is_redelivered_and_finished_by_another(
    healthy_stack: LocalStack,
    client: TaskClient,
    zips: dict[str, Path],
    tally: Callable[..., Outcome],
) -> None:
    stack = healthy_stack
    with stack.frozen("triton"):
        sent = [
            client.submit(zips["chest"], "kill-chest-1.zip", "chest"),
            client.submit(zips["chest"], "kill-chest-2.zip", "chest"),
            client.submit(zips["head"], "kill-head-1.zip", "head"),
            client.submit(zips["chest"], "kill-chest-3.zip", "chest"),
            client.submit(zips["head"], "kill-head-2.zip", "head"),
        ]
        holders = client.in_model_request(sent, 2, 60)
        victim = sorted(holders)[0]
        survivor = next(name for name in holders if name != victim)
        victim_task = holders[victim]
        victim_pid = stack.pid(victim)
        victim_temp = Path(tempfile.gettempdir()) / f"cts-adapter-{victim_pid}"
        # Its study, unpacked: in its own temporary folder, or, checked first while others
        # waited, kept in the task's prepared folder for the full preparation.
        kept = kept_intake_dir(stack.storage, victim_task) / "files"
        assert list(victim_temp.glob("cts-intake-*/files/*")) or list(kept.rglob("*"))
        stack.kill(victim)  # kill -9 while its study waits for the model
    client.wait_for_results(sent, RESULT_TIMEOUT_S)
    client.settle()

    redelivered = client.result(victim_task)
    assert redelivered.status is TaskStatus.COMPLETED
    assert redelivered.adapter_id == survivor
    assert redelivered.attempt == 2  # the broker's redelivery, not a copy
    assert_screened(client, sent)
    assert load_result(stack.storage, victim_task) == redelivered
    stack.launch(victim)  # back to two adapters
    # The killed adapter could remove neither its unpacked study (patient data in the temp
    # folder) nor the shared memory of its model request (221 MB of RAM with the full-size
    # model): the adapters sweep both.
    wait_for(
        lambda: (
            not (Path(tempfile.gettempdir()) / f"cts-adapter-{victim_pid}").exists()
            and not list(Path("/dev/shm").glob(f"cts_{victim_pid}_*"))
        ),
        90,
        "the killed adapter's leftovers swept",
    )

    tally(
        "kill -9 an adapter mid-study",
        sent,
        note=f"{victim} killed inside the model request; {survivor} finished it (attempt 2)",
    )


def test_rabbitmq_restart_with_studies_queued_and_in_flight(
    healthy_stack: LocalStack,
    client: TaskClient,
    zips: dict[str, Path],
    tally: Callable[..., Outcome],
) -> None:
    stack = healthy_stack
    topology = QueueTopology(prefix=stack.prefix)
    with stack.frozen("triton"):
        sent = [
            client.submit(zips["mr"], "mq-mr-1.zip", "mr"),
            client.submit(zips["mr"], "mq-mr-2.zip", "mr"),
            *(client.submit(zips["chest"], f"mq-chest-{n}.zip", "chest") for n in range(1, 5)),
        ]
        # The MR studies finish (no model needed) and their results wait, unread, in the
        # reply queue; both adapters then hold a chest (in flight) and two chests are queued.
        wait_for(
            lambda: all(load_result(stack.storage, s.task_id) for s in sent[:2]),
            60,
            "both MR results stored",
        )
        wait_for(
            lambda: (
                (state := queue_state(topology.task_queue)) is not None
                and (state.ready, state.unacknowledged) == (2, 2)
            ),
            60,
            "two chests in flight and two queued",
            interval_s=1.0,
        )
        with rabbitmq_restarted(stack.broker) as start_rabbitmq:
            stack.thaw("triton")
            # The studies in flight (in the preparation stage, inside the chest check's model
            # request) finish their stage while the broker is down: their hand-offs to the
            # model stage, or (checked first while others waited) their passed checks, are
            # recorded in storage, not yet sent.
            wait_for(
                lambda: sum(prepared_or_checked(stack.storage, s.task_id) for s in sent[2:]) == 2,
                60,
                "the two chests in flight prepared or checked, and recorded",
            )
            start_rabbitmq()
    # Everyone reconnects: both adapters and the frontend's recorder.
    wait_for(
        lambda: consumers_of(stack.broker, topology.presence_queue(MODEL_STAGE)) == 2,
        120,
        "adapters back",
    )
    wait_for(
        lambda: consumers_of(stack.broker, topology.registry_queue) == 1,
        120,
        "the frontend's registry recorder back",
    )
    client.wait_for_results(sent, RESULT_TIMEOUT_S)
    client.settle()

    assert_screened(client, sent)
    tally(
        "restart RabbitMQ (2 in flight, 2 queued)",
        sent,
        note=(
            "2 results waited in the durable reply queue over the restart; the 2 studies in "
            "flight were checked while it was down and handed on from storage"
        ),
    )


def test_triton_down_for_a_minute_mid_run_fails_no_study(
    healthy_stack: LocalStack,
    client: TaskClient,
    zips: dict[str, Path],
    tally: Callable[..., Outcome],
) -> None:
    stack = healthy_stack
    with stack.frozen("triton"):
        sent = [
            *(client.submit(zips["chest"], f"triton-chest-{n}.zip", "chest") for n in range(1, 5)),
            client.submit(zips["head"], "triton-head-1.zip", "head"),
        ]
        client.in_model_request(sent, 2, 60)
        stack.crash_triton()  # kill -9 while both adapters wait for it
    outage_started = time.monotonic()
    while time.monotonic() - outage_started < TRITON_OUTAGE_S:
        client.poll()
        time.sleep(1.0)
    retrying = {m.task_id for m in client.progress if m.stage == "retrying"}
    stack.launch("triton")  # the same command, the same ports
    client.wait_for_results(sent, RESULT_TIMEOUT_S + 60)
    client.settle()

    assert len(retrying) >= 2  # both studies in flight waited for the server
    assert_screened(client, sent)  # no Failure row because of the outage
    assert all(client.result(s.task_id).attempt == 1 for s in sent)  # held, not redelivered
    tally(
        f"Triton down {TRITON_OUTAGE_S:.0f} s mid-run",
        sent,
        note=f"Triton killed (-9) with 2 studies in flight; {len(retrying)} studies retried",
    )


def test_database_restart_loses_no_registry_row(
    healthy_stack: LocalStack,
    client: TaskClient,
    zips: dict[str, Path],
    registry: Registry,
    tally: Callable[..., Outcome],
) -> None:
    """The registry's PostgreSQL goes away while studies finish: their results wait in the
    registry queue (the recorder gives them back and pauses) and are recorded once it is
    back; the adapters never needed it."""
    stack = healthy_stack
    with stack.frozen("triton"):
        sent = [
            client.submit(zips["mr"], "db-mr-1.zip", "mr"),
            *(client.submit(zips["chest"], f"db-chest-{n}.zip", "chest") for n in range(1, 4)),
        ]
        first = sent[0].task_id
        wait_for(
            lambda: (row := registry.study(first)) is not None and row.state.final,
            60,
            "the MR recorded before the database goes",
        )
        with postgres_restarted() as start_postgres:
            stack.thaw("triton")
            wait_for(
                lambda: all(load_result(stack.storage, study.task_id) for study in sent),
                RESULT_TIMEOUT_S,
                "every result stored while the database is down",
            )
            client.poll()
            time.sleep(5)  # the recorder meets the outage, gives the results back, pauses
            start_postgres()
    client.wait_for_results(sent, RESULT_TIMEOUT_S)
    client.settle()

    assert_screened(client, sent)
    tally(
        "restart PostgreSQL (the registry) mid-run",
        sent,
        note="3 results stored while the database was down, recorded after it came back",
    )


def test_frontend_restart_keeps_every_result_on_the_page(
    healthy_stack: LocalStack,
    zips: dict[str, Path],
    tmp_path: Path,
    outcomes: list[Outcome],
    registry: Registry,
) -> None:
    stack = healthy_stack
    names = ["fe-head-1.zip", "fe-head-2.zip", "fe-chest-1.zip", "fe-chest-2.zip", "fe-chest-3.zip"]
    uploads = []
    for name in names:
        upload = tmp_path / "browser" / name
        upload.parent.mkdir(parents=True, exist_ok=True)
        upload.write_bytes(zips["head" if "head" in name else "chest"].read_bytes())
        # Five distinct uploads: the same bytes twice would be one study and its duplicate.
        with zipfile.ZipFile(upload, "a") as archive:
            archive.comment = name.encode()
        uploads.append(upload)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            if registry.accounts.user("shift-reader") is None:
                registry.accounts.add_user("shift-reader", Role.RADIOLOGIST, password=PASSWORD)
            sign_in_page(page, stack.frontend_url.rstrip("/"), "shift-reader")
            # The heads are done and shown first; then, with Triton frozen, the chests wait
            # inside the stack (the chest check and the model both ask Triton) while the
            # frontend goes down.
            upload_files(page, uploads[:2], "Queued 2 studies")
            wait_for(
                lambda: finished_rows(page, set(names)) == 2,
                60,
                "the two heads done on the page",
                interval_s=0.5,
            )
            with stack.frozen("triton"):
                upload_files(page, uploads[2:], "Queued 3 studies")
                wait_for(
                    lambda: len(worklist_rows(page, set(names))) == 5,
                    30,
                    "the chests listed on the page",
                    interval_s=0.5,
                )
                stack.terminate("frontend")
            uploaded = registry.list_studies(StudyFilter(doors=[Door.UPLOAD])).items
            task_ids = [row.task_id for row in uploaded if row.original_filename in names]
            assert len(task_ids) == 5
            # Triton is back; the chests finish while the frontend is down.
            wait_for(
                lambda: all(load_result(stack.storage, task_id) for task_id in task_ids),
                RESULT_TIMEOUT_S,
                "every result stored while the frontend is down",
            )
            stack.launch("frontend")
            page = open_again_as_a_person_would(page, stack.frontend_url)
            wait_for(
                lambda: finished_rows(page, set(names)) == 5,
                60,
                "all five done on the page opened again",
                interval_s=0.5,
            )
            shown = [str(row["file"]) for row in worklist_rows(page, set(names))]
            xlsx = download_all(page, tmp_path / "session.xlsx")
        finally:
            browser.close()

    # What the user sees: each study once on the page and once in the downloaded report.
    on_page = Counter(name for file in shown for name in names if file == name)
    sheet = openpyxl.load_workbook(xlsx).active
    in_report = Counter(row[0] for row in sheet.iter_rows(min_row=2, values_only=True) if row[0])
    # The worklist is department-wide: the earlier scenarios' studies are listed too.
    assert set(names) <= set(in_report), sorted(set(names) - set(in_report))
    seen = Counter({task_id: 0 for task_id in task_ids})
    by_name = {
        load_result(stack.storage, task_id).original_filename: task_id for task_id in task_ids
    }
    for name, task_id in by_name.items():
        seen[task_id] = max(on_page[name], in_report[name])
    sent = [
        SentStudy(task_id, name, "head" if "head" in name else "chest")
        for name, task_id in by_name.items()
    ]
    outcome = count_outcome(
        "restart the frontend mid-run (browser)",
        sent,
        seen,
        stack.storage,
        note="2 results shown before the restart, 3 arrived while it was down; page opened again",
        registry=registry,
    )
    record_outcome(outcome, outcomes)
    assert all(on_page[name] == 1 for name in names), on_page
    assert all(in_report[name] == 1 for name in names), in_report


# -- the pieces behind it (pure logic) ------------------------------------------------------------


def test_a_study_too_big_to_unpack_is_refused_at_upload(tmp_path: Path) -> None:
    """The upload is refused from the zip's own directory, before any worker unpacks it."""
    settings = load_settings(environ={})
    settings.storage.root = tmp_path / "storage"
    settings.rabbitmq.queue_prefix = f"test-fault-limits-{uuid.uuid4().hex[:8]}"
    settings.frontend.max_upload_mb = 1
    settings.intake.max_uncompressed_bytes = 2 * 1024 * 1024
    bomb = tmp_path / "in" / "bomb.zip"  # 3 MB of zeros deflate to a few KB
    small = tmp_path / "in" / "small.zip"
    bomb.parent.mkdir()
    for path, size in ((bomb, 3 * 1024 * 1024), (small, 1000)):
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("study/slice.dcm", b"\0" * size)
    assert bomb.stat().st_size < 1024 * 1024  # under the upload limit: only unpacking is big
    upgrade_registry(settings)
    service = FrontendService(settings, instance_id="fault-limits")
    try:
        outcome = service.submit_uploads("browser:fault", None, [bomb, small])
        listed = [record.original_filename for record in service.worklist_records("any")]
    finally:
        service.stop()
        delete_topology(settings.rabbitmq)
    assert [record.original_filename for record in outcome.submitted] == ["small.zip"]
    assert (
        "bomb.zip: 3.0 MB unpacked is over the 2.0 MB limit per study "
        "(intake.max_uncompressed_bytes)" in outcome.message
    )
    assert bomb.exists()
    assert not small.exists()
    assert listed == ["small.zip"]  # the refused one was never recorded
