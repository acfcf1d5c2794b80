"""The local stack as start.sh starts it, seen as an attacker and an auditor would: the DICOM
listener on every address with an allow-list (its health check still answers, strangers are
refused and audited), the services on a RabbitMQ account of their own, a first admin user,
logs appended and rotated, and nothing in the storage another user could read
(README, Security)."""

from __future__ import annotations

import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_door_support import CHEST, storescu
from fault_support import LocalStack, StackPorts, ensure_rabbitmq_running, rabbitmqctl
from stack_support import delete_topology, wait_for

from services.core.config import Settings, load_settings
from services.dicom_listener.door import HEALTH_CHECK_AE
from services.registry import Registry, StudyFilter, StudyState
from services.registry.accounts import SignInPolicy, SignInVerdict
from services.registry.audit import AuditAction, AuditQuery
from services.triton.local_server import free_local_ports

pytestmark = [pytest.mark.rabbitmq, pytest.mark.triton, pytest.mark.slow]
ROTATION_MB = 0.001  # about 1 KiB: the services' logs are set aside again and again
EARLIER_LINE = "a line of the run before this start"


@pytest.fixture(scope="module")
def stack(
    tiny_model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, str]]:
    frontend, http, grpc, metrics, frontend_metrics, dicom_metrics, adapter_metrics = (
        free_local_ports(7)
    )
    prefix = f"test-security-{uuid.uuid4().hex[:10]}"
    storage = tmp_path_factory.mktemp("security-stack") / "storage"
    # The storage of a stack that ran before, made as any folder is (0755): its logs stay.
    logs = storage / "logs"
    logs.mkdir(parents=True)
    storage.chmod(0o755)
    (logs / "dicom-listener.log").write_text(f"{EARLIER_LINE}\n")
    (logs / "dicom-listener.out").write_text("earlier output\n" + "x" * 4096)
    local = LocalStack(
        repository=tiny_model_repository,
        storage=storage,
        prefix=prefix,
        ports=StackPorts(frontend, http, grpc, metrics),
        adapters=1,
        extra_arguments=(
            *("--frontend-metrics-port", str(frontend_metrics)),
            *("--dicom-metrics-port", str(dicom_metrics)),
            *("--adapter-metrics-port", str(adapter_metrics)),
        ),
    )
    local.environment |= {
        "CTS__DICOM__HOST": "0.0.0.0",  # the network: only with an allow-list
        "CTS__DICOM__ALLOWED_CALLING_AE_TITLES": "[MODALITY]",
        "CTS__DICOM__STUDY_QUIET_SECONDS": "2",
        "CTS__LOGGING__ROTATION_MB": str(ROTATION_MB),
        "CTS__LOGGING__KEEP_FILES": "5",
    }
    ensure_rabbitmq_running(local.broker)
    try:
        output = local.start()
        yield local, output
    finally:
        stopped = local.stop()
        delete_topology(local.broker)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    # The services' account goes with them.
    assert prefix not in rabbitmqctl("-q", "list_users")


def settings_of(local: LocalStack) -> Settings:
    """The stack's settings, as its services read them."""
    return load_settings(environ=local.services["frontend"].environment)


def test_a_new_storage_gets_an_admin_whose_password_is_shown_once(
    stack: tuple[LocalStack, str],
) -> None:
    local, output = stack
    (shown,) = re.findall(r"web sign-in: user admin, password (\S+)", output)
    kept = local.run_dir / "secrets" / "admin-password"
    assert kept.read_text().strip() == shown
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    registry = Registry.open(settings_of(local))
    try:
        signed_in = registry.accounts.verify_password("admin", shown, SignInPolicy())
    finally:
        registry.close()
    assert signed_in.verdict is SignInVerdict.OK
    assert signed_in.account is not None
    assert signed_in.account.role.value == "admin"


def test_the_services_use_their_own_broker_account(stack: tuple[LocalStack, str]) -> None:
    local, _output = stack
    secret = local.run_dir / "secrets" / "rabbitmq-password"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    for name, service in local.services.items():
        if name == "triton":
            continue
        assert service.environment["CTS__RABBITMQ__USERNAME"] == local.prefix, name
        assert service.environment["CTS__RABBITMQ__PASSWORD_FILE"] == str(secret), name
        assert "CTS__RABBITMQ__PASSWORD" not in service.environment, name  # not in /proc
    users = [line.split()[0] for line in rabbitmqctl("-q", "list_connections", "user").splitlines()]
    assert users.count(local.prefix) >= 2  # the adapter's and the frontend's at least
    permissions = rabbitmqctl("-q", "list_user_permissions", local.prefix)
    assert re.escape(local.prefix) in permissions  # only its own queues and exchanges


def test_the_listener_on_the_network_lets_in_only_whom_it_lists(
    stack: tuple[LocalStack, str], fixtures_dir: Path
) -> None:
    local, _output = stack
    listener = local.services["dicom-listener"].environment
    assert listener["CTS__DICOM__HOST"] == "0.0.0.0"
    port = int(listener["CTS__DICOM__PORT"])
    files = sorted((fixtures_dir / CHEST).iterdir())
    refused = storescu(port, files[:1], calling_ae="INTRUDER")
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    sent = storescu(port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    registry = Registry.open(settings_of(local))
    try:
        wait_for(
            lambda: (
                [row.state for row in registry.list_studies(StudyFilter()).items]
                == [StudyState.DONE]
            ),
            300,
            "the study screened",
        )
        rows = registry.audit.events(
            AuditQuery(actions=(AuditAction.ASSOCIATION_ACCEPTED, AuditAction.ASSOCIATION_REFUSED))
        )
    finally:
        registry.close()
    # start.sh polled the health check until it answered: none of those is a row.
    assert [(row.action, row.actor) for row in rows] == [
        (AuditAction.ASSOCIATION_REFUSED, "INTRUDER"),
        (AuditAction.ASSOCIATION_ACCEPTED, "MODALITY"),
    ]
    assert HEALTH_CHECK_AE not in (local.log_dir / "dicom-listener.out").read_text()


def test_logs_are_appended_and_rotated_and_the_storage_is_private(
    stack: tuple[LocalStack, str], fixtures_dir: Path
) -> None:
    local, _output = stack
    logs = local.log_dir
    listener_logs = sorted(logs.glob("dicom-listener*.log"))
    assert any(EARLIER_LINE in path.read_text() for path in listener_logs)  # never truncated
    # The raw output over the size was set aside when the listener started.
    assert (logs / "dicom-listener.out.1").read_text().startswith("earlier output")
    assert not (logs / "dicom-listener.out").read_text().startswith("earlier output")
    # The adapter's own log went past the size: set aside under dated names, five at most.
    adapter_logs = sorted(logs.glob("adapter-1*.log"))
    assert 2 <= len(adapter_logs) <= 6, adapter_logs
    for path in adapter_logs:
        assert path.stat().st_size <= ROTATION_MB * 1024 * 1024 + 1000  # a line past it at most
    exposed = []
    for path in [local.storage, *local.storage.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode != (0o700 if path.is_dir() else 0o600):
            exposed.append(f"{path.relative_to(local.storage)} {mode:o}")
    assert exposed == []
    assert list((local.storage / "results").rglob("*.json"))  # the study's files are there
