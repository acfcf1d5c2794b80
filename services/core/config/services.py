"""Settings of the edges: storage, RabbitMQ, the frontend, the DICOM listener, logs, metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator

from services.core.access import Role
from services.core.config.base import (
    AE_TITLE_PATTERN,
    Backoff,
    OptionalPath,
    Section,
    resolve_path,
)
from services.core.config.destinations import ReportDestination
from services.core.config.dicom_tls import DicomTlsSettings


class StorageSettings(Section):
    root: Path = Field(
        Path("storage"), validate_default=True, description="shared by frontends and adapters"
    )

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, value: Path) -> Path:
        return resolve_path(value)


class RabbitMQSettings(Section):
    host: str = "127.0.0.1"
    queue_prefix: str = Field(
        "cts",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="exchanges and queues are <prefix>.tasks, ... (tests use their own)",
    )
    port: int = 5672
    username: str = Field("guest", description="set CTS__RABBITMQ__USERNAME in deployment")
    password: str = Field("guest", description="set CTS__RABBITMQ__PASSWORD in deployment")
    password_file: OptionalPath = Field(
        None,
        description="a file holding the password (a mounted secret; start.sh writes one), "
        "read at every connection; set, it replaces password",
    )
    virtual_host: str = "/"
    prefetch_count: int = Field(1, description="studies an adapter holds at once")
    heartbeat_s: int = 60
    max_deliveries: int = Field(3, description="then a Failure result and the dead letters")
    poll_interval_s: float = Field(
        0.25,
        gt=0,
        le=5,
        description="an idle adapter stage asks its lanes (most urgent first) this often",
    )
    max_queue_depth: int = Field(200, description="uploads are refused above this")
    reconnect_backoff: Backoff = Field(
        Backoff(initial_s=0.5, maximum_s=30.0),
        description="waits between attempts to reach the broker (connect, publish)",
    )

    def current_password(self) -> str:
        """The password to connect with: the file's (read now, so a rotated secret needs no
        restart; surrounding whitespace dropped), else ``password``."""
        if self.password_file is None:
            return self.password
        return self.password_file.read_text().strip()


class OidcSettings(Section):
    """Single sign-on with an OpenID Connect provider (the hospital's Keycloak, Entra ID...):
    the frontend is a confidential client with the authorization-code flow."""

    issuer: str = Field(description="the provider's issuer URL (its discovery document is read)")
    client_id: str
    client_secret: SecretStr = Field(description="CTS__FRONTEND__OIDC__CLIENT_SECRET")
    scope: str = "openid profile email"
    username_claim: str = Field("preferred_username", description="the user's name here")
    roles_claim: str = Field("roles", description="a claim holding a string or a list of them")
    role_map: dict[str, Role] = Field(
        default_factory=dict,
        description="claim value -> radiologist | technologist | admin; the first match of "
        "the order admin, radiologist, technologist wins; no match: refused",
    )
    button_label: str = "Sign in with the hospital account"


class FrontendSettings(Section):
    host: str = Field("127.0.0.1", description="0.0.0.0 serves the whole network")
    port: int = 7860
    max_upload_mb: int = Field(2048, description="the page and the REST API share this limit")
    upload_stall_timeout_s: float = Field(
        60.0, gt=0, description="an upload whose body stops arriving this long is dropped"
    )
    sign_in: bool = Field(
        True, description="false: anyone who reaches the port sees everything (said in red)"
    )
    session_idle_minutes: float = Field(30.0, gt=0, description="a session unused this long ends")
    lockout_after_failures: int = Field(5, ge=1, description="failed sign-ins in a row")
    lockout_minutes: float = Field(15.0, gt=0)
    failed_sign_in_delay_s: float = Field(
        0.5, ge=0, description="the answer to a failed sign-in waits this, doubling per failure"
    )
    time_zone: str = Field(
        "UTC", description="the page shows times in this IANA time zone, e.g. Europe/Berlin"
    )
    tls_certificate: Path | None = Field(None, description="PEM; with tls_key: HTTPS only")
    tls_key: Path | None = None
    oidc: OidcSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, values: object) -> object:
        # Said plainly: an old config's shared password must not silently stop working.
        if isinstance(values, dict) and {"auth", "api_token"} & set(values):
            raise ValueError(
                "frontend.auth and frontend.api_token are gone: people sign in with their own "
                "accounts and systems use API keys (python -m services.registry users|keys; "
                "README, Security)"
            )
        return values

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name such as Europe/Berlin)"
            ) from None
        return value

    @field_validator("tls_certificate", "tls_key")
    @classmethod
    def _resolve(cls, value: Path | None) -> Path | None:
        return None if value is None else resolve_path(value)

    @model_validator(mode="after")
    def _tls_pair(self) -> FrontendSettings:
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError("frontend.tls_certificate and frontend.tls_key go together")
        return self


PriorityName = Literal["routine", "urgent", "stat"]
StageName = Literal["prepare", "model"]
STAGE_NAMES: tuple[StageName, ...] = ("prepare", "model")


class AdapterSettings(Section):
    """The adapter's stages: preparation (intake up to the model input; refusals answered
    there) and model. Both by default; a site may run them as separate deployments."""

    stages: list[StageName] = Field(
        default_factory=lambda: list(STAGE_NAMES),
        min_length=1,
        description="the stages this adapter runs (prepare, model)",
    )

    check_first: bool = Field(
        True,
        description="while other tasks wait, the preparation stage checks each new task "
        "only as far as is cheap and puts one that passes in a preparation lane, so that "
        "every waiting refusal is answered before the next full preparation",
    )
    check_first_max_voxels: int = Field(
        50_000_000,
        ge=0,
        description="checking first, a CT series up to this many voxels (about 190 slices "
        "of 512x512) also gets its volume and chest check; a larger one only its headers",
    )
    check_first_max_waiting: int = Field(
        8,
        ge=1,
        description="once this many checked tasks of a priority wait for their preparation, "
        "the stage prepares one of them before it checks the next new one, so that results "
        "keep coming while studies arrive faster than they are checked",
    )

    held_inputs: int = Field(
        2,
        ge=0,
        description="while this adapter's model stage is the only one alive, up to this many "
        "model inputs (221 MB each) stay in its memory for it instead of being written to "
        "the storage (0.2-0.6 s each on a VM); 0: always written",
    )

    @field_validator("stages")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a stage is named twice")
        return value


class DicomSettings(Section):
    """Hospital integration over DICOM: the listener (python -m services.dicom_listener)
    receives studies by C-STORE and sends each study's structured report back."""

    host: str = Field("127.0.0.1", description="the listener binds here; 0.0.0.0 for a network")
    port: int = Field(11112, ge=1, le=65535, description="the listener's DICOM port")
    ae_title: str = Field("CTS", pattern=AE_TITLE_PATTERN, description="the listener's AE title")
    study_quiet_seconds: float = Field(
        10.0, gt=0, description="a study is complete after this long without a new instance"
    )
    allowed_calling_ae_titles: list[str] = Field(
        default_factory=list,
        description="the calling AE titles that may associate; empty: any, which a host "
        "beyond loopback allows only with allow_any_calling_ae",
    )
    allow_any_calling_ae: bool = Field(
        False,
        description="true: any calling AE title on a host beyond loopback (else the listener "
        "refuses to start there without allowed_calling_ae_titles)",
    )
    tls: DicomTlsSettings = Field(
        default_factory=DicomTlsSettings, description="DICOM over TLS (README, Security)"
    )
    max_study_mb: int = Field(
        4096, gt=0, description="a larger study is refused (C-STORE Out of Resources)"
    )
    destinations: list[ReportDestination] = Field(
        default_factory=list,
        description="where every received study's SR goes, e.g. "
        "[{kind: dimse, ae_title: PACS, host: 10.0.0.5, port: 104}, "
        "{kind: stow-rs, url: 'https://vna.example/dicom-web'}] (README, Connect a PACS)",
    )
    export_backoff: Backoff = Field(
        Backoff(initial_s=2.0, maximum_s=60.0),
        description="waits between sends of an SR to a destination that is down",
    )
    network_timeout_s: float = Field(30.0, gt=0, description="DIMSE and network timeouts")
    calling_ae_priorities: dict[str, PriorityName] = Field(
        default_factory=dict,
        description="priority of the studies each calling AE title sends, e.g. {ER_CT: stat}; "
        "the study's RequestedProcedurePriority (STAT, HIGH) raises it, never lowers it",
    )
    send_uploads_to_pacs: bool = Field(
        False,
        description="also send the SRs of web and REST uploads to the destinations "
        "(the listener finds them in the registry)",
    )

    @field_validator("destinations", mode="before")
    @classmethod
    def _dimse_when_no_kind(cls, value: object) -> object:
        """Configuration files from before STOW-RS list destinations without a kind: DIMSE."""
        if not isinstance(value, list):
            return value
        return [
            {**item, "kind": "dimse"} if isinstance(item, dict) and "kind" not in item else item
            for item in value
        ]


class LoggingSettings(Section):
    """Where a service's log goes: standard error, or a file appended to and rotated by size
    (start.sh gives each service <storage>/logs/<service>.log; containers log to stderr)."""

    level: str = "INFO"
    file: OptionalPath = Field(
        None, description="null: standard error; else appended to this file, never truncated"
    )
    rotation_mb: float = Field(
        50.0, gt=0, description="the file is set aside (its name dated) at this size"
    )
    keep_files: int = Field(10, ge=1, description="set-aside files kept; older ones are removed")


class MetricsSettings(Section):
    """Prometheus ``/metrics`` of each service (services/monitoring/)."""

    enabled: bool = Field(True, description="serve /metrics in the adapter, frontend, listener")
    host: str = Field("127.0.0.1", description="0.0.0.0 lets a Prometheus on another host scrape")
    frontend_port: int = Field(9400, description="0: any free port (logged)")
    dicom_listener_port: int = Field(9401, description="0: any free port (logged)")
    # One port per process: start.sh gives its adapter N the port adapter_port + N - 1; in
    # containers and pods every adapter has its own address and keeps this one.
    adapter_port: int = Field(9410, description="0: any free port (logged)")


class RegistrySettings(Section):
    """The study registry (services/registry): one record of every study task, whatever door
    it came through, in SQLite under the storage root or in PostgreSQL beyond one host."""

    url: str | None = Field(
        None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://cts@db/cts (the password from "
        "CTS__REGISTRY__URL); null: SQLite at <storage.root>/registry/registry.sqlite3",
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        description="null: keep every study; else purge removes a study's images and identity "
        "this many days after it was received (python -m services.registry purge)",
    )
    record_results: bool = Field(
        True,
        description="the frontend records what the adapters report (the registry queue); "
        "false where `python -m services.registry record` runs instead",
    )
    timeout_s: float = Field(10.0, gt=0, description="connect and lock timeout of the database")
    unavailable_backoff: Backoff = Field(
        Backoff(initial_s=1.0, maximum_s=30.0),
        description="the recorder's pauses while the database cannot be written",
    )
