"""``notifications``: who is told when a study's first result is recorded (a paging system,
a RIS) and how (services/registry/webhooks.py sends; the registry's outbox keeps what waits).
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator

from services.core.config.base import Backoff, OptionalPath, Section, http_url_parts


class Webhook(Section):
    """One receiver: an HTTP POST of a JSON body per study, signed with HMAC-SHA256 of the
    body under the secret (header ``X-CTS-Signature: sha256=<hex>``)."""

    url: str = Field(description="http:// or https:// URL that receives the POST")
    secret: SecretStr | None = Field(
        None, description="the HMAC key (or CTS__NOTIFICATIONS__WEBHOOKS__0__SECRET)"
    )
    secret_file: OptionalPath = Field(
        None, description="a file that holds the HMAC key, read at each send (rotation)"
    )
    timeout_s: float = Field(10.0, gt=0, description="connect and read timeout of one POST")
    include_accession_number: bool = Field(
        False,
        description="the accession number is patient identity (DESIGN 12): sent only when "
        "the site sets this for a receiver inside the hospital",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        http_url_parts(value, credentials_go="the signature authenticates")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> Webhook:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret and secret_file")
        return self

    def key(self) -> bytes:
        """The HMAC key now (a secret file is read each time: a rotated key needs no
        restart)."""
        if self.secret is not None:
            return self.secret.get_secret_value().encode("utf-8")
        assert self.secret_file is not None  # the validator asks for one of the two
        return self.secret_file.read_text(encoding="utf-8").strip().encode("utf-8")


class NotificationSettings(Section):
    webhooks: list[Webhook] = Field(
        default_factory=list,
        description="receivers told of each study's first result (task id, link, call, most "
        "dangerous finding; no patient identity); empty: none",
    )
    link_base_url: str | None = Field(
        None,
        description="the frontend's address as readers reach it, e.g. https://ct.hospital.org; "
        "the payload's link is <this>/?study=<task_id> (null: a link relative to the frontend)",
    )
    backoff: Backoff = Field(
        Backoff(initial_s=5.0, maximum_s=600.0, give_up_after_s=86400.0),
        description="the waits between attempts of one notification (kept in the registry: "
        "a restart goes on where it stopped); past give_up_after_s it is marked failed",
    )
    poll_s: float = Field(2.0, gt=0, description="how often a sender looks for due notifications")
