"""The DICOM door alone, for the TLS and door tests: the listener's receiver (pynetdicom) on a
free port, its study book on a temporary folder, its audit rows and log lines kept; DCMTK's
storescu as the sending modality. Not a test module."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from prometheus_client import CollectorRegistry
from sr_support import require_tool
from tls_support import CertificateAuthority, Identity

from services.core.config import DicomSettings
from services.dicom_listener.metrics import ListenerMetrics
from services.dicom_listener.receiver import StoreReceiver
from services.dicom_listener.studies import StudyBook
from services.dicom_listener.tls import listener_context
from services.registry.audit import AuditAction, AuditEntry
from services.triton.local_server import free_local_ports

CHEST = "chest_ct_lung_dx_a0002"


@dataclass(frozen=True)
class Pki:
    """The hospital's CA and what it signed, and a CA nobody here trusts."""

    ca: CertificateAuthority
    other_ca: CertificateAuthority
    listener: Identity
    modality: Identity
    pacs: Identity
    stranger: Identity  # signed by other_ca


def make_pki(folder: Path) -> Pki:
    ca = CertificateAuthority(folder / "hospital")
    other = CertificateAuthority(folder / "elsewhere", "Other CA")
    return Pki(
        ca=ca,
        other_ca=other,
        listener=ca.issue("cts-listener"),
        modality=ca.issue("modality-1"),
        pacs=ca.issue("pacs"),
        stranger=other.issue("stranger"),
    )


def door_settings(pki: Pki | None, **values: object) -> DicomSettings:
    """The listener's settings on a free port; TLS with the hospital's PKI when ``pki``."""
    tls: dict[str, object] = {}
    if pki is not None:
        tls = {
            "enabled": True,
            "certificate": pki.listener.certificate,
            "private_key": pki.listener.private_key,
            "ca_bundle": pki.ca.bundle,
        }
    tls.update(values.pop("tls", {}))
    return DicomSettings.model_validate({"port": free_local_ports(1)[0], "tls": tls, **values})


@dataclass
class RunningDoor:
    receiver: StoreReceiver
    book: StudyBook
    rows: list[AuditEntry] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.receiver.port

    def actions(self) -> list[tuple[AuditAction, str, str]]:
        return [(row.action, row.actor, row.detail) for row in self.rows]


@contextmanager
def running_door(settings: DicomSettings, folder: Path) -> Iterator[RunningDoor]:
    book = StudyBook(folder / "storage", quiet_s=600, max_bytes=10**10)
    rows: list[AuditEntry] = []
    context = listener_context(settings.tls) if settings.tls.enabled else None
    metrics = ListenerMetrics(CollectorRegistry())
    receiver = StoreReceiver(settings, book, metrics, rows.append, context)
    door = RunningDoor(receiver, book, rows)
    sink = logger.add(door.lines.append, level="DEBUG")
    receiver.start()
    try:
        yield door
    finally:
        receiver.stop()
        logger.remove(sink)


def storescu(
    port: int,
    files: list[Path],
    *,
    calling_ae: str = "MODALITY",
    called_ae: str = "CTS",
    tls: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu to 127.0.0.1:port; ``tls``: its TLS options (+tls key cert, +cf ca)."""
    tool = require_tool("storescu", "dcmtk")
    return subprocess.run(
        [tool, *(tls or []), "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)]
        + [str(path) for path in files],
        capture_output=True,
        text=True,
        timeout=120,
    )


def dcmtk_tls(identity: Identity | None, trusted: Path) -> list[str]:
    """storescu's options: show ``identity`` (None: no certificate), trust ``trusted``."""
    shown = (
        ["+tla"]
        if identity is None
        else ["+tls", str(identity.private_key), str(identity.certificate)]
    )
    return [*shown, "+cf", str(trusted)]
