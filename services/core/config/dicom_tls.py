"""DICOM over TLS (PS3.15 Annex B, the BCP 195 profiles): the listener's certificate, the CAs
it trusts, and whether a peer must show a certificate (services/dicom_listener/tls.py builds
the ``ssl.SSLContext`` objects from these)."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.core.config.base import OptionalPath, Section


class DicomTlsSettings(Section):
    """One identity for the DICOM door: the listener shows ``certificate`` to whoever connects
    to it, and the SR sender shows the same one to a destination with ``tls: true``."""

    enabled: bool = Field(
        False, description="the listener's port speaks TLS only (a plain association fails)"
    )
    certificate: OptionalPath = Field(
        None, description="PEM: the listener's certificate, then any intermediate CAs"
    )
    private_key: OptionalPath = Field(
        None, description="PEM: its private key, unencrypted (keep the file 0600)"
    )
    ca_bundle: OptionalPath = Field(
        None, description="PEM: the CAs that sign the certificates of the peers (modalities, PACS)"
    )
    require_peer_certificate: bool = Field(
        True,
        description="a peer must show a certificate that ca_bundle signed; false: any peer "
        "may connect (the AE title rules still apply)",
    )
    handshake_timeout_s: float = Field(
        10.0, gt=0, description="a connection still without its TLS handshake then is closed"
    )

    @model_validator(mode="after")
    def _complete(self) -> DicomTlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.enabled and self.certificate is None:
            raise ValueError("enabled needs certificate and private_key")
        if self.enabled and self.require_peer_certificate and self.ca_bundle is None:
            raise ValueError(
                "require_peer_certificate needs ca_bundle (the CAs that sign the peers' "
                "certificates), or set it to false"
            )
        return self
