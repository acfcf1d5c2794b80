"""DICOM over TLS: the ``ssl.SSLContext`` of each side of the DICOM door, and the listener's
association server, which does each TLS handshake in the connection's own thread.

* The listener (``listener_context``): TLS 1.2 or newer (BCP 195), its certificate, and, with
  ``require_peer_certificate``, only peers whose certificate a CA of ``ca_bundle`` signed.
  Its own certificate is trusted too, so that the health check on its host, which shows it,
  is let in (services/dicom_listener/door.py).
* A destination with ``tls: true`` (``destination_context``): its certificate checked
  against ``tls_ca_bundle``, else ``dicom.tls.ca_bundle``, else the system's CAs, and its name
  against ``host``; the listener's certificate shown when the PACS asks for one.
* pynetdicom's own server does the server-side handshake in its accept loop, where one peer
  that connects and sends nothing would stop every other association; ``TlsAssociationServer``
  moves it into the connection's thread and bounds it by ``handshake_timeout_s``.

A file that cannot be read, or a key that does not fit its certificate, is a
ConfigurationError at the listener's start (exit 2 with the reason). A renewed certificate
takes effect at the next start.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from services.core.config import DicomSettings, DimseDestination
from services.core.config.dicom_tls import DicomTlsSettings
from services.core.errors import ConfigurationError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2  # BCP 195; PS3.15 B.9
PEER_VERDICT_S = 2.0  # how long a failed send's diagnosis waits for the peer's TLS alert
PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
# (peer "ip:port", why) of a connection whose handshake failed: no association, no AE title.
HandshakeFailure = Callable[[str, str], None]
# A peer that hangs up without a word: a TCP probe (a load balancer, the Kubernetes liveness
# probe) or a port scan, not an attempt to associate; logged at debug level only.
HUNG_UP: tuple[type[BaseException], ...] = (
    ssl.SSLZeroReturnError,
    ssl.SSLEOFError,
    ConnectionResetError,
    BrokenPipeError,
)


def _loaded(action: Callable[[], None], what: str) -> None:
    try:
        action()
    except (OSError, ssl.SSLError, ValueError) as error:
        raise ConfigurationError(f"dicom TLS: {what}: {error}") from error


def _own_identity(context: ssl.SSLContext, tls: DicomTlsSettings) -> None:
    certificate, key = tls.certificate, tls.private_key
    assert certificate is not None
    assert key is not None
    _loaded(
        lambda: context.load_cert_chain(certificate, key), f"certificate {certificate}, key {key}"
    )


def leaf_certificate(path: Path) -> str:
    """The first certificate of a PEM file (the listener's own, before its chain)."""
    try:
        match = PEM_CERTIFICATE.search(path.read_text())
    except OSError as error:
        raise ConfigurationError(f"dicom TLS: certificate {path}: {error}") from error
    if match is None:
        raise ConfigurationError(f"dicom TLS: certificate {path} holds no PEM certificate")
    return match.group(0)


def listener_context(tls: DicomTlsSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _own_identity(context, tls)
    if not tls.require_peer_certificate:
        return context
    ca_bundle = tls.ca_bundle
    assert ca_bundle is not None  # the settings require it
    context.verify_mode = ssl.CERT_REQUIRED
    _loaded(lambda: context.load_verify_locations(cafile=ca_bundle), f"ca_bundle {ca_bundle}")
    # Only the leaf of our own file, never its intermediates: those may sign far more than
    # the peers this door is meant for. PARTIAL_CHAIN lets a trusted certificate that is not
    # self-signed (this leaf, an intermediate of ca_bundle) end a chain.
    assert tls.certificate is not None
    own = leaf_certificate(tls.certificate)
    _loaded(lambda: context.load_verify_locations(cadata=own), f"certificate {tls.certificate}")
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def destination_context(destination: DimseDestination, tls: DicomTlsSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name
    context.minimum_version = MINIMUM_VERSION
    if destination.tls_verify:
        ca_bundle = destination.tls_ca_bundle or tls.ca_bundle
        if ca_bundle is None:
            context.load_default_certs()
        else:
            _loaded(
                lambda: context.load_verify_locations(cafile=ca_bundle), f"CA bundle {ca_bundle}"
            )
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.certificate is not None:
        _own_identity(context, tls)
    return context


def health_check_context(tls: DicomTlsSettings) -> ssl.SSLContext:
    """The C-ECHO of this host to its own listener: shows the listener's certificate (let in
    by listener_context) and does not check the server's, which is itself."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_VERSION
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _own_identity(context, tls)
    return context


def handshake_failure_reason(error: BaseException) -> str:
    """What went wrong, in OpenSSL's words where it has some (no data of the peer's)."""
    if isinstance(error, ssl.SSLError) and error.reason:
        return f"TLS handshake failed: {error.reason}"
    if isinstance(error, TimeoutError):
        return "TLS handshake not finished in time"
    return f"TLS handshake failed: {type(error).__name__}"


def handshake_problem(context: ssl.SSLContext, host: str, port: int, timeout_s: float) -> str:
    """Why a TLS association to ``host:port`` did not come about, found by trying the
    handshake alone (pynetdicom only says that it failed): for the log of a failed send."""
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as connection,
            context.wrap_socket(connection, server_hostname=host) as secured,
        ):
            # In TLS 1.3 the server judges our certificate after the client finished: its
            # verdict (an alert) is the first thing to read.
            secured.settimeout(min(timeout_s, PEER_VERDICT_S))
            secured.recv(1)
    except TimeoutError:
        pass  # nothing to read: the peer took the handshake
    except (OSError, ValueError) as error:
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"{handshake_failure_reason(error)} ({error.verify_message})"
        if isinstance(error, ssl.SSLError):
            return handshake_failure_reason(error)
        return f"no connection ({type(error).__name__})"
    return "the TLS handshake works: no association"


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, the TLS handshake done in each connection's thread."""

    handshake_timeout_s: float = 10.0
    on_handshake_failure: HandshakeFailure | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is None:
            return client, address
        client.settimeout(self.handshake_timeout_s)
        wrapped = self.ssl_context.wrap_socket(
            client, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ValueError) as error:  # SSLError, TimeoutError, a reset
                peer = f"{client_address[0]}:{client_address[1]}"
                if isinstance(error, HUNG_UP):
                    logger.debug("{} closed the connection before its TLS handshake", peer)
                elif self.on_handshake_failure is not None:
                    self.on_handshake_failure(peer, handshake_failure_reason(error))
                self.shutdown_request(request)
                return
            request.settimeout(None)  # then as pynetdicom has its sockets: blocking
        super().process_request_thread(request, client_address)


def start_server(
    entity: AE,
    settings: DicomSettings,
    context: ssl.SSLContext | None,
    handlers: list[Any],
    on_handshake_failure: HandshakeFailure,
) -> TlsAssociationServer:
    """The listener's server on ``settings.host:port``, serving in a thread of its own (as
    ``AE.start_server`` with ``block=False``); TLS with ``context``, plain without."""
    server = entity.make_server(
        (settings.host, settings.port),
        ssl_context=context,
        evt_handlers=handlers,
        server_class=TlsAssociationServer,
    )
    assert isinstance(server, TlsAssociationServer)
    server.handshake_timeout_s = settings.tls.handshake_timeout_s
    server.on_handshake_failure = on_handshake_failure
    # AE.shutdown() and the server's own shutdown() expect it in the AE's list, as
    # start_server leaves it.
    entity._servers.append(server)
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    return server
