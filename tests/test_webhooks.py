"""Webhooks against real local HTTP receivers that check the HMAC signature: a study's first
result told once to each receiver, without patient identity; a receiver that fails twice
gets it on the third attempt; a receiver that is down when the sender stops gets it from a
new sender on the same registry (a restart); one that never answers is given up."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from registry_support import open_registry
from test_registry import report, result, submission
from web_support import free_port
from webhook_support import Receiver, serving

from services.core.config import Backoff, NotificationSettings, Settings, Webhook
from services.registry import Registry
from services.registry.outbox import NotificationState
from services.registry.recorder import RegistryRecorder
from services.registry.webhooks import WebhookSender, notifications_of

SECRET = "a shared webhook secret"
FILE_SECRET = "another secret, from a file"
FAST = Backoff(initial_s=0.2, maximum_s=0.4, give_up_after_s=60.0)


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def notification_settings(*webhooks: Webhook, backoff: Backoff = FAST) -> NotificationSettings:
    return NotificationSettings(
        webhooks=list(webhooks),
        link_base_url="https://ct.hospital.example/",
        backoff=backoff,
        poll_s=0.1,
    )


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with open_registry("sqlite", tmp_path) as opened:
        yield opened


def test_the_first_result_is_told_once_signed_and_without_identity(
    registry: Registry, tmp_path: Path
) -> None:
    steady, flaky = Receiver(SECRET), Receiver(FILE_SECRET, failures=2)
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(FILE_SECRET + "\n")
    with serving(steady, free_port()) as steady_url, serving(flaky, free_port()) as flaky_url:
        settings = Settings()
        settings.notifications = notification_settings(
            Webhook(url=steady_url, secret=SECRET),  # type: ignore[arg-type]
            Webhook(url=flaky_url, secret_file=secret_file, include_accession_number=True),
        )
        # The recorder's own path (what it does with each message of the registry queue).
        recorder = RegistryRecorder(settings, registry)
        registry.record_submission(submission("t1"))
        first = result("t1", report(pathology=1, name="Doe^Jane", patient_id="P-77"))
        recorder.record(first)
        recorder.record(first)  # redelivered: recorded once, told once
        assert recorder.webhooks is not None
        recorder.webhooks.start()
        try:
            wait_for(lambda: len(steady.accepted) == 1 and len(flaky.accepted) == 1)
        finally:
            recorder.webhooks.stop()
    assert flaky.requests == 3  # two 503s, then accepted
    assert steady.bad_signatures == flaky.bad_signatures == 0
    assert flaky.deliveries == [flaky.deliveries[0]]
    told = steady.accepted[0]
    assert told == {
        "event": "study.result",
        "task_id": "t1",
        "report_index": 0,
        "link": "https://ct.hospital.example/?study=t1",
        "call": "PATHOLOGY",
        "pathology": True,
        "probability_of_pathology": 0.81,
        "most_dangerous_finding": "Lung nodule",
        "demo_weights": True,
        "finished_at": told["finished_at"],
        "accession_number": None,  # identity: only where the site turns it on
    }
    assert flaky.accepted[0]["accession_number"] == "ACC-9"
    for body in (json.dumps(steady.accepted), json.dumps(flaky.accepted)):
        assert "Doe" not in body
        assert "P-77" not in body
    states = {(n.url, n.state, n.attempts) for n in registry.outbox.of_task("t1")}
    assert states == {
        (steady_url, NotificationState.SENT, 1),
        (flaky_url, NotificationState.SENT, 3),
    }


def test_a_restart_sends_what_waited_and_a_dead_receiver_is_given_up(registry: Registry) -> None:
    port = free_port()
    receiver = Receiver(SECRET)
    url = f"http://127.0.0.1:{port}/hooks/ct?token=x"
    settings = notification_settings(Webhook(url=url, secret=SECRET))  # type: ignore[arg-type]
    registry.record_submission(submission("t2"))
    registry.record_result(result("t2"), partial(notifications_of, settings))
    before = WebhookSender(settings, registry)
    before.start()  # nothing listens on the port yet: it fails and waits
    wait_for(lambda: registry.outbox.of_task("t2")[0].attempts >= 1)
    before.stop()
    (waiting,) = registry.outbox.of_task("t2")
    assert waiting.state is NotificationState.PENDING
    assert waiting.last_error
    with serving(receiver, port):
        after = WebhookSender(settings, registry)  # the restarted service's sender
        after.start()
        try:
            wait_for(lambda: len(receiver.accepted) == 1)
        finally:
            after.stop()
    assert receiver.accepted[0]["task_id"] == "t2"
    assert registry.outbox.of_task("t2")[0].state is NotificationState.SENT

    brief = Backoff(initial_s=0.2, maximum_s=0.2, give_up_after_s=0.5)
    dead = notification_settings(Webhook(url=url, secret=SECRET), backoff=brief)  # type: ignore[arg-type]
    registry.record_submission(submission("t3"))
    registry.record_result(result("t3"), partial(notifications_of, dead))
    sender = WebhookSender(dead, registry)
    sender.start()
    try:
        wait_for(lambda: registry.outbox.of_task("t3")[0].state is NotificationState.FAILED)
    finally:
        sender.stop()
    assert registry.outbox.of_task("t3")[0].attempts >= 2
