"""Who may come through the DICOM door (services/dicom_listener/door.py) and its audit rows
(door_audit.py): the rules as functions, the running receiver against DCMTK's storescu and
the listener's own health check, and the rows' way into the registry while the database is
locked or the listener restarts."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from alembic import command
from dicom_door_support import CHEST, door_settings, make_pki, running_door, storescu
from prometheus_client import CollectorRegistry
from registry_support import sqlite_url
from stack_support import wait_for

from services.core.config import Backoff
from services.core.errors import ConfigurationError
from services.dicom_listener import door
from services.dicom_listener.door_audit import DoorAudit, door_entry
from services.dicom_listener.healthcheck import echo
from services.dicom_listener.metrics import ListenerMetrics
from services.dicom_listener.tls import health_check_context
from services.registry import Registry
from services.registry.audit import AuditAction, AuditQuery
from services.registry.database import alembic_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PENDING = "cts_dicom_audit_pending"
LOST = "cts_dicom_audit_rows_lost_total"


# -- the rules -------------------------------------------------------------------------------


def test_which_hosts_are_this_one() -> None:
    assert door.is_loopback_host("127.0.0.1")
    assert door.is_loopback_host("127.8.9.1")
    assert door.is_loopback_host("::1")
    assert door.is_loopback_host("localhost")
    for host in ("0.0.0.0", "::", "10.0.0.7", "pacs.hospital.example"):
        assert not door.is_loopback_host(host), host
    assert door.is_this_host("127.0.0.1", "127.0.0.1")
    assert door.is_this_host("10.0.0.7", "10.0.0.7")  # from this host to its own address
    assert not door.is_this_host("10.0.0.8", "10.0.0.7")
    assert door.health_check_address("0.0.0.0") == "127.0.0.1"
    assert door.health_check_address("::") == "::1"
    assert door.health_check_address("10.0.0.7") == "10.0.0.7"


@pytest.mark.parametrize(
    ("values", "starts"),
    [
        ({}, True),  # loopback: only this host can reach it
        ({"host": "0.0.0.0"}, False),
        ({"host": "10.0.0.7"}, False),
        ({"host": "0.0.0.0", "allowed_calling_ae_titles": ["PACS"]}, True),
        ({"host": "0.0.0.0", "allow_any_calling_ae": True}, True),
    ],
)
def test_a_door_open_to_the_network_needs_an_allow_list_or_an_explicit_any(
    values: dict, starts: bool
) -> None:
    settings = door_settings(None, **values)
    if starts:
        door.check_door(settings)
    else:
        with pytest.raises(ConfigurationError, match="allow_any_calling_ae: true"):
            door.check_door(settings)


def test_a_list_and_any_at_once_is_a_contradiction() -> None:
    settings = door_settings(None, allowed_calling_ae_titles=["PACS"], allow_any_calling_ae=True)
    with pytest.raises(ConfigurationError, match="choose one"):
        door.check_door(settings)


def test_why_an_association_was_rejected() -> None:
    assert "'OTHER' is not this listener's (CTS)" in door.refusal_reason("PACS", "OTHER", "CTS", [])
    assert door.refusal_reason("X", "CTS", "CTS", ["PACS"]) == "calling AE title not allowed"
    assert door.refusal_reason("PACS", "CTS", "CTS", ["PACS"]) == "too many associations at once"
    assert door.admitted_titles([]) == []
    assert door.admitted_titles(["PACS"]) == ["PACS", door.HEALTH_CHECK_AE]
    assert door.health_check_refusal(door.HEALTH_CHECK_AE, "127.0.0.1", "127.0.0.1") is None
    assert door.health_check_refusal(door.HEALTH_CHECK_AE, "10.0.0.8", "10.0.0.7")
    assert door.health_check_refusal("PACS", "10.0.0.8", "10.0.0.7") is None


def test_the_listener_on_the_network_without_an_allow_list_exits_2_before_the_storage(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "storage"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CTS")}
    environment |= {
        "CTS__STORAGE__ROOT": str(storage),
        "CTS__METRICS__ENABLED": "false",
        "CTS__DICOM__HOST": "0.0.0.0",
    }
    completed = subprocess.run(
        [sys.executable, "-m", "services.dicom_listener"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=PROJECT_ROOT,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "dicom.allowed_calling_ae_titles" in completed.stderr
    assert not storage.exists()


# -- the running door ------------------------------------------------------------------------


def test_titles_are_checked_and_every_association_is_audited_without_patient_data(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    files = sorted((fixtures_dir / CHEST).iterdir())[:2]
    settings = door_settings(None, allowed_calling_ae_titles=["MODALITY"])
    with running_door(settings, tmp_path) as running:
        assert storescu(running.port, files).returncode == 0
        other_called = storescu(running.port, files[:1], called_ae="ELSEWHERE")
        assert "Called AE Title Not Recognized" in other_called.stdout + other_called.stderr
        intruder = storescu(running.port, files[:1], calling_ae="INTRUDER")
        assert "Calling AE Title Not Recognized" in intruder.stdout + intruder.stderr
    assert running.actions() == [
        (AuditAction.ASSOCIATION_ACCEPTED, "MODALITY", "called CTS; no TLS"),
        (
            AuditAction.ASSOCIATION_REFUSED,
            "MODALITY",
            "called AE title 'ELSEWHERE' is not this listener's (CTS)",
        ),
        (AuditAction.ASSOCIATION_REFUSED, "INTRUDER", "calling AE title not allowed"),
    ]
    assert all((row.client or "").startswith("127.0.0.1:") for row in running.rows)
    patient = pydicom.dcmread(files[0], stop_before_pixels=True)
    identity = [str(patient.PatientName), str(patient.PatientID), str(patient.StudyInstanceUID)]
    written = running.lines + [row.model_dump_json() for row in running.rows]
    assert not [value for value in identity if any(value in text for text in written)]
    assert any("INTRUDER" in line and "not allowed" in line for line in running.lines)


def test_the_health_check_gets_in_from_this_host_with_the_allow_list_and_tls(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = door_settings(pki, allowed_calling_ae_titles=["MODALITY"])
    with running_door(settings, tmp_path) as running:
        context = health_check_context(settings.tls)
        assert echo(running.port, "CTS", tls_context=context)
        assert not echo(running.port, "CTS")  # the port speaks TLS only
        assert not echo(running.port, "ELSEWHERE", tls_context=context)
    # Its own C-ECHO adds no row (it would, every few seconds); the two failures do.
    assert [row.action for row in running.rows] == [AuditAction.ASSOCIATION_REFUSED] * 2


def test_the_health_checks_title_sends_nothing_and_from_elsewhere_is_cut_off(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sorted((fixtures_dir / CHEST).iterdir())[:1]
    settings = door_settings(None, allowed_calling_ae_titles=["MODALITY"])
    with running_door(settings, tmp_path) as running:
        storescu(running.port, files, calling_ae=door.HEALTH_CHECK_AE)
        assert running.book.receiving() == 0  # C-STORE refused: Not Authorized
        # The same title from another host (which this machine plays by pretending that no
        # peer is on this host): accepted by pynetdicom's list, then aborted at once.
        monkeypatch.setattr(door, "is_this_host", lambda peer, local: False)
        assert not echo(running.port, "CTS")
    ((action, actor, detail),) = running.actions()
    assert (action, actor) == (AuditAction.ASSOCIATION_REFUSED, door.HEALTH_CHECK_AE)
    assert detail == "the health check's AE title from another host"


# -- the audit rows' way into the registry ----------------------------------------------------


def _registry(folder: Path, timeout_s: float = 0.3) -> Registry:
    url = sqlite_url(folder)
    if not Path(url.database or "").exists():
        command.upgrade(alembic_config(url), "head")
    return Registry(url, timeout_s=timeout_s)


def _rows(registry: Registry) -> list[tuple[str, str]]:
    return [
        (entry.actor, entry.detail)
        for entry in registry.audit.events(AuditQuery(actions=(AuditAction.ASSOCIATION_REFUSED,)))
    ]


def _refusal(number: int) -> object:
    return door_entry(AuditAction.ASSOCIATION_REFUSED, f"AE{number}", "10.0.0.8:4000", "test")


def test_rows_wait_on_disk_while_the_database_is_locked_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    registry = _registry(tmp_path)
    spool = tmp_path / "spool"
    counters = CollectorRegistry()
    metrics = ListenerMetrics(counters)
    backoff = Backoff(initial_s=0.2, maximum_s=0.5)
    locker = sqlite3.connect(sqlite_url(tmp_path).database or "", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the database is there, and nobody may write
    audit = DoorAudit(spool, registry, backoff, metrics)
    audit.start()
    for number in range(3):
        audit.record(_refusal(number))  # never waits for the database
    wait_for(lambda: counters.get_sample_value(PENDING) == 3, 20, "three rows pending")
    audit.stop()  # stopped while the database is still locked: the rows stay on disk
    assert len(list(spool.glob("*.json"))) == 3
    locker.execute("ROLLBACK")
    locker.close()
    again = DoorAudit(spool, registry, backoff, metrics)  # the listener's next start
    again.start()
    wait_for(lambda: len(_rows(registry)) == 3, 20, "the rows in the registry")
    again.stop()
    assert [actor for actor, _detail in _rows(registry)] == ["AE0", "AE1", "AE2"]  # in order
    assert list(spool.glob("*.json")) == []
    assert counters.get_sample_value(LOST) == 0
    registry.close()


def test_a_row_that_cannot_be_spooled_waits_in_memory_and_is_counted_if_lost(
    tmp_path: Path,
) -> None:
    registry = _registry(tmp_path)
    counters = CollectorRegistry()
    metrics = ListenerMetrics(counters)
    spool = tmp_path / "not-a-folder"
    spool.write_text("a file where the spool folder should be")
    audit = DoorAudit(spool, registry, Backoff(initial_s=0.2, maximum_s=0.5), metrics)
    audit.start()
    audit.record(_refusal(1))
    wait_for(lambda: _rows(registry) == [("AE1", "test")], 20, "the row from memory")
    locker = sqlite3.connect(sqlite_url(tmp_path).database or "", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    audit.record(_refusal(2))
    audit.stop(timeout_s=2)
    locker.execute("ROLLBACK")
    locker.close()
    assert counters.get_sample_value(LOST) == 1  # said, never silent
    registry.close()
