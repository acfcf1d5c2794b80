"""``python -m services.dicom_listener.healthcheck [PORT]``: exit 0 when the listener answers a
C-ECHO from this host (start.sh, the container and pod probes), 1 otherwise.

It calls as ``door.HEALTH_CHECK_AE``, which the listener lets in from this host only and
whatever its allow-list (services/dicom_listener/door.py), at the listener's own address
(127.0.0.1 when it listens on every address), over TLS when the listener's port speaks it,
showing the listener's own certificate.
"""

from __future__ import annotations

import ssl
import sys

from pynetdicom import AE

from services.core.config import load_settings
from services.dicom_listener.contexts import VERIFICATION
from services.dicom_listener.door import HEALTH_CHECK_AE, health_check_address
from services.dicom_listener.tls import health_check_context

ECHO_TIMEOUT_S = 5.0


def echo(
    port: int,
    called_ae: str,
    timeout_s: float = ECHO_TIMEOUT_S,
    *,
    host: str = "127.0.0.1",
    tls_context: ssl.SSLContext | None = None,
) -> bool:
    entity = AE(ae_title=HEALTH_CHECK_AE)
    entity.add_requested_context(VERIFICATION)
    entity.acse_timeout = entity.dimse_timeout = entity.network_timeout = timeout_s
    entity.connection_timeout = timeout_s
    tls_args = None if tls_context is None else (tls_context, host)
    association = entity.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not association.is_established:
        return False
    try:
        status = association.send_c_echo()
    finally:
        association.release()
    return "Status" in status and int(status.Status) == 0


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    dicom = load_settings().dicom
    port = int(arguments[0]) if arguments else dicom.port
    context = health_check_context(dicom.tls) if dicom.tls.enabled else None
    host = health_check_address(dicom.host)
    return 0 if echo(port, dicom.ae_title, host=host, tls_context=context) else 1


if __name__ == "__main__":
    sys.exit(main())
