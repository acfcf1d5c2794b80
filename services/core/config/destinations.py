"""Where the structured reports go: a DICOM node by DIMSE C-STORE or a DICOMweb server by
STOW-RS, chosen per destination by ``kind`` (services/dicom_listener/report_sink.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from services.core.config.base import AE_TITLE_PATTERN, OptionalPath, Section, http_url_parts


class DimseDestination(Section):
    """A DICOM node that receives the structured reports by DIMSE C-STORE (a PACS).

    ``kind`` may be left out: destinations written before STOW-RS existed are DIMSE ones.
    """

    kind: Literal["dimse"] = "dimse"
    ae_title: str = Field(pattern=AE_TITLE_PATTERN, description="the PACS's called AE title")
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = Field(
        False, description="DICOM over TLS (the PACS's TLS port); shows dicom.tls.certificate"
    )
    tls_verify: bool = Field(
        True, description="check the PACS's certificate: signed by a trusted CA, naming host"
    )
    tls_ca_bundle: OptionalPath = Field(
        None, description="PEM of the CAs to trust; null: dicom.tls.ca_bundle, else system CAs"
    )

    @model_validator(mode="after")
    def _tls_options_with_tls(self) -> DimseDestination:
        if self.tls_ca_bundle is not None and not (self.tls and self.tls_verify):
            raise ValueError("tls_ca_bundle is set but tls or tls_verify is false")
        return self


class HttpCredentials(Section):
    """How the listener authenticates to a DICOMweb server. The secret itself never appears
    in the configuration: it is read from an environment variable or a file (a mounted
    secret) each time a report is sent, so a rotated token needs no restart."""

    scheme: Literal["bearer", "basic"] = Field(
        description="bearer: Authorization: Bearer <secret>; basic: username + password"
    )
    username: str | None = Field(None, description="basic only")
    secret_env: str | None = Field(
        None, description="name of the environment variable that holds the token or password"
    )
    secret_file: OptionalPath = Field(
        None, description="a file that holds the token or password (surrounding spaces dropped)"
    )

    @model_validator(mode="after")
    def _one_secret_and_a_user_for_basic(self) -> HttpCredentials:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret_env and secret_file")
        if (self.scheme == "basic") != (self.username is not None):
            raise ValueError("a username goes with the basic scheme, and only with it")
        return self


class StowRsDestination(Section):
    """A DICOMweb server that receives the structured reports by STOW-RS (HTTP POST of
    ``<url>/studies``), e.g. a PACS or a vendor-neutral archive."""

    kind: Literal["stow-rs"]
    url: str = Field(description="the DICOMweb base, e.g. http://pacs:8042/dicom-web")
    credentials: HttpCredentials | None = Field(None, description="null: no authentication")
    tls_verify: bool = Field(True, description="check the server's certificate (https)")
    tls_ca_bundle: OptionalPath = Field(
        None, description="PEM file of the CA that signed it (a hospital CA); null: system CAs"
    )
    timeout_s: float = Field(30.0, gt=0, description="connect and read timeout of one request")

    @field_validator("url")
    @classmethod
    def _plain_http_base(cls, value: str) -> str:
        parts = http_url_parts(value, credentials_go="use credentials (secret_env or secret_file)")
        if parts.query or parts.fragment:
            raise ValueError("the DICOMweb base URL takes no query or fragment")
        if parts.port == 0:  # reading .port also refuses a port that is not a number
            raise ValueError("port 0")
        return value.rstrip("/")  # the client appends /studies

    @model_validator(mode="after")
    def _bundle_only_when_verifying(self) -> StowRsDestination:
        if self.tls_ca_bundle is not None and not self.tls_verify:
            raise ValueError("tls_ca_bundle is set but tls_verify is false")
        return self


# Chosen by ``kind``; a destination without one is DIMSE (DicomSettings fills it in).
ReportDestination = Annotated[DimseDestination | StowRsDestination, Field(discriminator="kind")]
