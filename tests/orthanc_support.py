"""A real Orthanc PACS for the DICOM tests (Debian package ``orthanc``), on free ports of
127.0.0.1, with its own storage folder. Not a test module.

Two shapes: a DIMSE PACS (no plugins, the listener declared as a modality) and, with
``dicomweb=True``, a DICOMweb archive (the Debian plugin ``orthanc-dicomweb`` loaded through
``Plugins``, its REST root at /dicom-web/, no DICOM port at all). ``users`` turns on HTTP
basic authentication for every request, the REST helpers' included.

Orthanc 1.10 has no bind address for its DICOM port (it listens on every interface of the
test machine for the few seconds of a test); its HTTP port accepts local clients only
(RemoteAccessAllowed false).
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
from sr_support import require_file, require_tool

from services.triton.local_server import free_local_ports

ORTHANC_AE = "ORTHANC"
LISTENER_MODALITY = "cts"
START_TIMEOUT_S = 30.0
# The Debian package's plugin folder holds one file per plugin; the DICOMweb one alone is
# loaded, so another plugin installed on the machine cannot change what the tests see.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_ROOT = "/dicom-web/"
ARCHIVE_USER = "cts"  # the one user of a DICOMweb archive (dicomweb_archive)
ARCHIVE_PASSWORD = "archive-password"


class Orthanc:
    """``start()`` / ``stop()`` (the storage and the ports survive a restart); REST helpers."""

    def __init__(
        self,
        folder: Path,
        *,
        listener_ae: str | None = None,
        listener_port: int | None = None,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        self.binary = require_tool("Orthanc", "orthanc")
        self.folder = folder
        self.http_port, self.dicom_port = free_local_ports(2)
        self.listener_port = listener_port
        self.config_path = folder / "orthanc.json"
        (folder / "db").mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "cts-test-pacs",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": users is not None,
            "RegisteredUsers": users or {},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": {},
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "SaveJobs": False,
            "StableAge": 1,
        }
        if listener_ae is not None and listener_port is not None:
            config["DicomModalities"] = {
                LISTENER_MODALITY: [listener_ae, "127.0.0.1", listener_port]
            }
        if dicomweb:
            config["Plugins"] = [str(require_file(DICOMWEB_PLUGIN, "orthanc-dicomweb"))]
            config["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT}
            config["DicomServerEnabled"] = False  # an archive reached over HTTP only
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = folder / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        auth = next(iter(users.items())) if users else None
        # A new connection per request: Orthanc closes an idle keep-alive connection after
        # about a second, and a poll sent on it just then fails (RemoteProtocolError).
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.http_port}",
            timeout=60,
            auth=auth,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base that a STOW-RS destination names."""
        return f"http://127.0.0.1:{self.http_port}{DICOMWEB_ROOT.rstrip('/')}"

    def start(self) -> Orthanc:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, str(self.config_path)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {self.log_path}")
            try:
                if self.client.get("/system").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def close(self) -> None:
        self.stop()
        self.client.close()

    def __enter__(self) -> Orthanc:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *_exception: object) -> None:
        self.close()

    # -- REST -----------------------------------------------------------------------------

    def upload_folder(self, folder: Path) -> str:
        """Every file of ``folder`` through POST /instances; the Orthanc id of their study."""
        study_ids = set()
        for path in sorted(folder.iterdir()):
            answer = self.client.post("/instances", content=path.read_bytes())
            answer.raise_for_status()
            study_ids.add(answer.json()["ParentStudy"])
        assert len(study_ids) == 1, study_ids
        return study_ids.pop()

    def send_to_listener(self, study_id: str) -> dict[str, Any]:
        answer = self.client.post(
            f"/modalities/{LISTENER_MODALITY}/store",
            json={"Resources": [study_id], "Synchronous": True},
        )
        answer.raise_for_status()
        return answer.json()

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this StudyInstanceUID, if it has it."""
        found = self.client.post(
            "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        )
        found.raise_for_status()
        ids = found.json()
        return str(ids[0]) if ids else None

    def structured_reports(self, study_uid: str) -> list[pydicom.Dataset]:
        """Every SR instance Orthanc holds for the study with this StudyInstanceUID."""
        found = self.client.post(
            "/tools/find",
            json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
        )
        found.raise_for_status()
        documents = []
        for study_id in found.json():
            for series in self.client.get(f"/studies/{study_id}/series").json():
                if series["MainDicomTags"].get("Modality") != "SR":
                    continue
                for instance_id in series["Instances"]:
                    raw = self.client.get(f"/instances/{instance_id}/file")
                    raw.raise_for_status()
                    documents.append(pydicom.dcmread(io.BytesIO(raw.content)))
        return documents

    def instance(self, sop_instance_uid: str) -> pydicom.Dataset | None:
        """The stored instance with this SOPInstanceUID, as Orthanc keeps it; None if absent."""
        found = self.client.post(
            "/tools/find",
            json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
        )
        found.raise_for_status()
        identifiers = found.json()
        if not identifiers:
            return None
        (identifier,) = identifiers
        raw = self.client.get(f"/instances/{identifier}/file")
        raw.raise_for_status()
        return pydicom.dcmread(io.BytesIO(raw.content))

    def instance_count(self) -> int:
        answer = self.client.get("/instances")
        answer.raise_for_status()
        return len(answer.json())


def dicomweb_archive(folder: Path) -> Orthanc:
    """A DICOMweb archive: an Orthanc reached over HTTP only, with its DICOMweb plugin, that
    asks for ARCHIVE_USER's basic credentials."""
    return Orthanc(folder, dicomweb=True, users={ARCHIVE_USER: ARCHIVE_PASSWORD})
