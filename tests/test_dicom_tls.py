"""DICOM over TLS (README, Security): the listener's port against DCMTK's storescu with a
certificate authority the test makes, and the SR sender against DCMTK's storescp over TLS.
DCMTK here is built with OpenSSL (storescu --version lists it), so the peers are the real
tools a modality or a PACS would be."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_door_support import (
    CHEST,
    Pki,
    dcmtk_tls,
    door_settings,
    make_pki,
    running_door,
    storescu,
)
from sr_support import require_tool
from stack_support import wait_for

from services.core.config import DicomSettings
from services.core.errors import ConfigurationError
from services.dicom_listener.export import create_sink
from services.dicom_listener.report_sink import DestinationUnavailable
from services.dicom_listener.tls import listener_context
from services.registry.audit import AuditAction
from services.triton.local_server import free_local_ports


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def chest(fixtures_dir: Path) -> list[Path]:
    return sorted((fixtures_dir / CHEST).iterdir())[:3]


def test_dcmtk_here_speaks_tls() -> None:
    version = subprocess.run(
        [require_tool("storescu", "dcmtk"), "--version"], capture_output=True, text=True, timeout=30
    )
    assert "OpenSSL" in version.stdout, version.stdout


def test_a_modality_with_a_certificate_of_the_hospital_ca_sends_over_tls(
    pki: Pki, chest: list[Path], tmp_path: Path
) -> None:
    settings = door_settings(pki, allowed_calling_ae_titles=["MODALITY"])
    with running_door(settings, tmp_path) as door:
        sent = storescu(door.port, chest, tls=dcmtk_tls(pki.modality, pki.ca.bundle))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert door.book.receiving() == 1
    ((action, actor, detail),) = door.actions()
    assert (action, actor) == (AuditAction.ASSOCIATION_ACCEPTED, "MODALITY")
    assert "TLSv1." in detail
    assert "CN=modality-1" in detail  # who it was, by its certificate


def test_a_plain_association_to_the_tls_port_fails_cleanly(
    pki: Pki, chest: list[Path], tmp_path: Path
) -> None:
    with running_door(door_settings(pki), tmp_path) as door:
        plain = storescu(door.port, chest[:1])
        assert plain.returncode != 0
        assert "Association Request Failed" in plain.stdout + plain.stderr
        # The door is as open as before to those who speak TLS.
        sent = storescu(door.port, chest[:1], tls=dcmtk_tls(pki.modality, pki.ca.bundle))
        assert sent.returncode == 0, sent.stdout + sent.stderr
    refused, accepted = door.rows
    assert refused.action is AuditAction.ASSOCIATION_REFUSED
    assert refused.detail.startswith("TLS handshake failed")
    assert (refused.client or "").startswith("127.0.0.1:")
    assert accepted.action is AuditAction.ASSOCIATION_ACCEPTED
    assert door.book.receiving() == 1  # only the TLS study got in


@pytest.mark.parametrize(
    ("who", "complaint"),
    [("stranger", "CERTIFICATE_VERIFY_FAILED"), ("nobody", "PEER_DID_NOT_RETURN_A_CERTIFICATE")],
)
def test_peers_without_a_certificate_of_the_ca_are_refused(
    who: str, complaint: str, pki: Pki, chest: list[Path], tmp_path: Path
) -> None:
    identity = pki.stranger if who == "stranger" else None
    with running_door(door_settings(pki), tmp_path) as door:
        refused = storescu(door.port, chest[:1], tls=dcmtk_tls(identity, pki.ca.bundle))
        assert refused.returncode != 0
    ((action, actor, detail),) = door.actions()
    assert action is AuditAction.ASSOCIATION_REFUSED
    assert actor == "(no association)"
    assert complaint in detail
    assert door.book.receiving() == 0


def test_without_require_peer_certificate_any_tls_peer_may_connect(
    pki: Pki, chest: list[Path], tmp_path: Path
) -> None:
    settings = door_settings(pki, tls={"require_peer_certificate": False, "ca_bundle": None})
    with running_door(settings, tmp_path) as door:
        sent = storescu(door.port, chest[:1], tls=dcmtk_tls(None, pki.ca.bundle))
        assert sent.returncode == 0, sent.stdout + sent.stderr
    ((action, _actor, detail),) = door.actions()
    assert action is AuditAction.ASSOCIATION_ACCEPTED
    assert "CN=" not in detail  # no certificate was shown


def test_a_peer_that_connects_and_says_nothing_holds_no_one_up(
    pki: Pki, chest: list[Path], tmp_path: Path
) -> None:
    """The TLS handshake happens in the connection's own thread, bounded: pynetdicom's own
    server would do it in its accept loop, where this silent peer would stop every other."""
    settings = door_settings(pki, tls={"handshake_timeout_s": 2.0})
    with running_door(settings, tmp_path) as door:
        silent = socket.create_connection(("127.0.0.1", door.port))
        try:
            started = time.monotonic()
            sent = storescu(door.port, chest[:1], tls=dcmtk_tls(pki.modality, pki.ca.bundle))
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert time.monotonic() - started < 2.0
            silent.settimeout(10)
            assert silent.recv(1) == b""  # closed by the listener after the timeout
        finally:
            silent.close()
    refusal = [row for row in door.rows if row.action is AuditAction.ASSOCIATION_REFUSED]
    assert [row.detail for row in refusal] == ["TLS handshake not finished in time"]


def test_a_probe_that_hangs_up_at_once_is_not_an_association(pki: Pki, tmp_path: Path) -> None:
    """A TCP probe (the Kubernetes liveness probe, a load balancer) connects and closes: no
    audit row, no warning every few seconds."""
    with running_door(door_settings(pki), tmp_path) as door:
        socket.create_connection(("127.0.0.1", door.port)).close()
        wait_for(lambda: any("closed the connection" in line for line in door.lines), 10, "debug")
    assert door.rows == []


def test_a_certificate_that_does_not_load_stops_the_listener(pki: Pki, tmp_path: Path) -> None:
    wrong_key = door_settings(pki, tls={"private_key": pki.modality.private_key})
    with pytest.raises(ConfigurationError, match="dicom TLS"):
        listener_context(wrong_key.tls)
    missing = door_settings(pki, tls={"ca_bundle": tmp_path / "no-such.pem"})
    with pytest.raises(ConfigurationError, match=r"no-such\.pem"):
        listener_context(missing.tls)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"tls": {"enabled": True}}, "enabled needs certificate and private_key"),
        ({"tls": {"certificate": "a.pem"}}, "certificate and private_key go together"),
        (
            {"tls": {"enabled": True, "certificate": "a.pem", "private_key": "a.key"}},
            "require_peer_certificate needs ca_bundle",
        ),
        (
            {"destinations": [{"ae_title": "P", "host": "h", "port": 1, "tls_ca_bundle": "c"}]},
            "tls_ca_bundle is set but tls or tls_verify is false",
        ),
    ],
)
def test_incomplete_tls_settings_are_refused(values: dict, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        DicomSettings.model_validate(values)


# -- the SR sender against a PACS that speaks TLS (DCMTK's storescp) --------------------------


@pytest.fixture
def pacs(pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """storescp over TLS, asking for the sender's certificate: (port, received folder)."""
    port = free_local_ports(1)[0]
    received = tmp_path / "received"
    received.mkdir()
    tls = dcmtk_tls(pki.pacs, pki.ca.bundle)
    process = subprocess.Popen(
        [require_tool("storescp", "dcmtk"), *tls, "-aet", "PACS", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), 30, "storescp")
        yield port, received
    finally:
        process.terminate()
        process.wait(timeout=30)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _send(tls: dict, destination: dict, document: pydicom.Dataset) -> str:
    settings = DicomSettings.model_validate({"tls": tls, "destinations": [destination]})
    return create_sink(settings.destinations[0], settings).send(document)


def test_reports_go_to_a_pacs_over_tls_and_a_bad_certificate_says_why(
    pki: Pki, pacs: tuple[int, Path], chest: list[Path]
) -> None:
    port, received = pacs
    document = pydicom.dcmread(chest[0])
    destination = {"ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": True}
    ours = {"certificate": pki.listener.certificate, "private_key": pki.listener.private_key}
    assert _send({**ours, "ca_bundle": pki.ca.bundle}, destination, document) == "0x0000"
    assert [path.name.startswith("CT.") for path in received.iterdir()] == [True]
    # The PACS's certificate is not one the sender trusts.
    with pytest.raises(DestinationUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        _send(ours, {**destination, "tls_ca_bundle": pki.other_ca.bundle}, document)
    # The sender shows a certificate the PACS does not trust, or none.
    stranger = {"certificate": pki.stranger.certificate, "private_key": pki.stranger.private_key}
    with pytest.raises(DestinationUnavailable, match="TLSV1_ALERT_UNKNOWN_CA"):
        _send({**stranger, "ca_bundle": pki.ca.bundle}, destination, document)
    with pytest.raises(DestinationUnavailable, match="CERTIFICATE_REQUIRED"):
        _send({"ca_bundle": pki.ca.bundle}, destination, document)
    # The PACS's certificate must name the host the sender was told to reach.
    with pytest.raises(DestinationUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        _send({**ours, "ca_bundle": pki.ca.bundle}, {**destination, "host": "127.0.0.2"}, document)
    assert len(list(received.iterdir())) == 1
