"""The services' own RabbitMQ account (services/broker/stack_user.py, made by start.sh): a
random password kept 0600, an account that may touch only its stack's queues and exchanges,
made through the management API or, where that refuses, rabbitmqctl, and removed again; the
services read the password from its file (rabbitmq.password_file)."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
from fault_support import rabbitmqctl
from stack_support import delete_topology

from services.broker.connection import connect, declare_topology, submit_task
from services.broker.schemas import QueueTopology, StudyTask
from services.broker.stack_user import password_from, stack_permissions
from services.core.config import RabbitMQSettings
from services.triton.local_server import free_local_ports

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_the_permissions_name_only_the_stacks_own_resources() -> None:
    permissions = stack_permissions("cts.site-1")
    for name in ("cts.site-1.tasks", "cts.site-1.replies.host-7860", "cts.site-1.dead-letter"):
        assert re.search(permissions.configure, name)
        assert re.search(permissions.read, name)
        assert re.search(permissions.write, name)
    for name in ("cts.site-10.tasks", "ctsXsite-1.tasks", "other.tasks", "amq.gen-abc"):
        assert not re.search(permissions.configure, name), name
        assert not re.search(permissions.write, name), name
    assert re.search(permissions.write, "amq.default")  # replies go by queue name
    assert not re.search(permissions.read, "amq.default")


def test_the_password_is_made_once_and_kept_private(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "rabbitmq-password"
    first = password_from(path)
    assert len(first) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert password_from(path) == first
    settings = RabbitMQSettings(password="not-this", password_file=path)
    assert settings.current_password() == first


@pytest.fixture
def account(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    name = f"test-account-{uuid.uuid4().hex[:10]}"
    yield name, tmp_path / "rabbitmq-password"
    stack_user("--user", name, "--remove")  # whatever the test left


def stack_user(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.broker.stack_user", *arguments],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_account(name: str, password_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return stack_user(
        "--user", name, "--prefix", name, "--password-file", str(password_file), *extra
    )


@pytest.mark.rabbitmq
@pytest.mark.parametrize("way", ["management API", "rabbitmqctl"])
def test_an_account_that_may_use_only_its_own_stack(way: str, account: tuple[str, Path]) -> None:
    name, password_file = account
    extra: tuple[str, ...] = ()
    if way == "rabbitmqctl":  # the management API unreachable: the other way
        extra = ("--management-url", f"http://127.0.0.1:{free_local_ports(1)[0]}/api")
    made = make_account(name, password_file, *extra)
    assert made.returncode == 0, made.stderr
    assert name in rabbitmqctl("-q", "list_users")
    settings = RabbitMQSettings(queue_prefix=name, username=name, password_file=password_file)
    try:
        connection = connect(settings, name="account test", give_up_after_s=10)
        try:
            declare_topology(connection.channel(), QueueTopology.from_settings(settings))
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                connection.channel().queue_declare("someone-else.tasks")
            assert refused.value.reply_code == 403  # ACCESS_REFUSED
        finally:
            connection.close()
        task = StudyTask(
            task_id="account-test", study_path="uploads/a/b.zip", original_filename="b.zip"
        )
        submit_task(settings, task, name="account test")  # publishing works
    finally:
        delete_topology(RabbitMQSettings(queue_prefix=name))
    # Made again (a restart of the stack): the same password, still valid.
    assert make_account(name, password_file, *extra).returncode == 0
    connect(settings, name="account test", give_up_after_s=10).close()
    removed = stack_user("--user", name, "--remove")
    assert removed.returncode == 0, removed.stderr
    assert name not in rabbitmqctl("-q", "list_users")
