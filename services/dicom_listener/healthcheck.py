"""``python -m services.dicom_listener.healthcheck [PORT]``: exit 0 when the listener answers a
C-ECHO on 127.0.0.1 (the container health check), 1 otherwise."""

from __future__ import annotations

import sys

from pynetdicom import AE

from services.core.config import load_settings
from services.dicom_listener.contexts import VERIFICATION

ECHO_TIMEOUT_S = 5.0
CALLING_AE = "CTS-HEALTHCHECK"


def echo(port: int, called_ae: str, timeout_s: float = ECHO_TIMEOUT_S) -> bool:
    entity = AE(ae_title=CALLING_AE)
    entity.add_requested_context(VERIFICATION)
    entity.acse_timeout = entity.dimse_timeout = entity.network_timeout = timeout_s
    entity.connection_timeout = timeout_s
    association = entity.associate("127.0.0.1", port, ae_title=called_ae)
    if not association.is_established:
        return False
    try:
        status = association.send_c_echo()
    finally:
        association.release()
    return "Status" in status and int(status.Status) == 0


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    settings = load_settings()
    port = int(arguments[0]) if arguments else settings.dicom.port
    return 0 if echo(port, settings.dicom.ae_title) else 1


if __name__ == "__main__":
    sys.exit(main())
