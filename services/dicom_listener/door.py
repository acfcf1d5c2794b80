"""Who may come through the DICOM door: the rules, as pure functions.

* The called AE title must be the listener's own (``dicom.ae_title``): an association to any
  other title is rejected ("called AE title not recognised").
* The calling AE title must be in ``dicom.allowed_calling_ae_titles`` (empty: any). On a
  host beyond loopback the listener does not start with an empty list unless
  ``dicom.allow_any_calling_ae`` is true (DESIGN 13: a door opened to the network has its
  protection configured, or the service says why it will not start).
* The health check (``python -m services.dicom_listener.healthcheck``: start.sh, the compose
  and Kubernetes probes) calls as ``HEALTH_CHECK_AE``. That title is let in only from this
  host (a loopback peer, or a peer whose address is the one it connected to), and may only
  C-ECHO: its C-STOREs are refused. So the check works with any allow-list, and the title
  opens nothing to the network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from services.core.config import DicomSettings
from services.core.errors import ConfigurationError

HEALTH_CHECK_AE = "CTS-HEALTHCHECK"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def is_this_host(peer_ip: str, local_ip: str) -> bool:
    """A connection from this machine: a loopback peer, or one whose source address is the
    address it reached (a TCP peer cannot fake that and still complete its handshake)."""
    return is_loopback_host(peer_ip) or peer_ip == local_ip


def health_check_address(host: str) -> str:
    """Where the health check on this host reaches a listener bound to ``host``."""
    if host in WILDCARD_HOSTS:
        return "::1" if host == "::" else "127.0.0.1"
    return host


def check_door(settings: DicomSettings) -> None:
    """ConfigurationError when the door's settings leave it open to the network."""
    allowed = settings.allowed_calling_ae_titles
    if settings.allow_any_calling_ae and allowed:
        raise ConfigurationError(
            "dicom.allow_any_calling_ae is true and dicom.allowed_calling_ae_titles is not "
            "empty: choose one"
        )
    if is_loopback_host(settings.host) or allowed or settings.allow_any_calling_ae:
        return
    raise ConfigurationError(
        f"dicom.host {settings.host} takes associations from the network, and any calling AE "
        "title could send studies: list the PACS and modalities in "
        "dicom.allowed_calling_ae_titles (CTS__DICOM__ALLOWED_CALLING_AE_TITLES='[PACS, CT1]'),"
        " or set dicom.allow_any_calling_ae: true"
    )


def admitted_titles(allowed: Sequence[str]) -> list[str]:
    """pynetdicom's calling AE list: the allowed titles and the health check's (its origin is
    checked once the association is accepted); empty: any title."""
    return [*allowed, HEALTH_CHECK_AE] if allowed else []


def refusal_reason(calling: str, called: str, own_ae: str, allowed: Sequence[str]) -> str:
    """Why pynetdicom rejected an association (its rules, in its order of precedence)."""
    if called != own_ae:
        return f"called AE title {called!r} is not this listener's ({own_ae})"
    if allowed and calling not in admitted_titles(allowed):
        return "calling AE title not allowed"
    return "too many associations at once"


def health_check_refusal(calling: str, peer_ip: str, local_ip: str) -> str | None:
    """Why an accepted association must be ended at once, or None."""
    if calling == HEALTH_CHECK_AE and not is_this_host(peer_ip, local_ip):
        return "the health check's AE title from another host"
    return None
