"""One configuration for every service, validated by pydantic; the defaults live here only.

``configs/config.yaml`` is generated from these models (``python -m services.core.config
--write``; a test checks it is current), so a deployment copies it and edits what it needs.
Environment variables override any leaf: ``CTS__<SECTION>__<KEY>=value`` (double
underscores between levels, case-insensitive), e.g. ``CTS__RABBITMQ__HOST=broker``. Values
are parsed as YAML scalars, so ``CTS__INTAKE__MAX_FILES=5000`` is an int and
``CTS__FRONTEND__AUTH=null`` is None. Relative paths are relative to the project root.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "config.yaml"
ENV_PREFIX = "CTS__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _resolve(path: Path) -> Path:
    """Relative paths in the config are relative to the project root, not the working directory."""
    return path if path.is_absolute() else PROJECT_ROOT / path


class IntakeSettings(_Section):
    """Limits that protect a worker from hostile or broken archives."""

    max_uncompressed_bytes: int = Field(8 * 1024**3, description="unpacked bytes per input")
    max_files: int = Field(20_000, description="files per input, archives included")
    max_compression_ratio: float = Field(200.0, description="zip-bomb guard, per archive member")
    max_nesting_depth: int = Field(3, description="archives inside archives")
    # 450 M is about 1700 slices of 512x512, within a 3 GB worker budget (about 1.6 bytes
    # of memory per byte of the float32 volume).
    max_series_voxels: int = Field(
        450_000_000,
        description="rows x columns x slices of one series, checked before pixels are read",
    )
    ct_rate_metadata: Path | None = Field(
        None,
        description="CT-RATE metadata CSV: NIfTI files named in it are read as CT-CLIP reads them",
    )


class SeriesSelectionSettings(_Section):
    min_slices: int = Field(20, description="fewer images: not a usable volume")
    min_slice_thickness_mm: float = Field(0.5, description="preferred range of slice thickness")
    max_slice_thickness_mm: float = 5.0
    min_axial_cosine: float = Field(0.9, description="|slice normal . z| of an axial series")


class QualitySettings(_Section):
    """Thresholds above which a data-quality finding becomes a warning or a failure."""

    spacing_tolerance_fraction: float = Field(
        0.1, description="a gap off the nominal spacing by more than this is uneven"
    )
    max_missing_slices_percent: float = Field(20.0, description="more missing: Failure")
    # Kept below acos(min_axial_cosine) = 25.8 degrees so that a steeper tilt is refused by
    # one rule (not axial), not by two that disagree.
    max_gantry_tilt_degrees: float = Field(25.0, description="more tilt: Failure")


class ChestCheckSettings(_Section):
    min_coverage_mm: float = Field(80.0, description="a chest needs this much along the body")
    detector: str = Field("lung_air", description="image detector (services/core/body_part)")
    lung_min_extent_fraction: float = Field(0.3, description="slices that must show lungs")
    lung_min_area_fraction: float = Field(0.02, description="lung area / body area on a slice")
    body_part_regression: bool = Field(
        True, description="also ask the repository's body-part regression model, if it has one"
    )
    # The network costs ~10 GFLOP per slice: a few slices (the ends included) find the landmarks.
    bpr_slice_spacing_mm: float = Field(
        80.0, gt=0, description="body-part regression scores slices at most this far apart"
    )
    bpr_max_slices: int = Field(4, ge=2, description="...and at most this many per series")


class InferenceSettings(_Section):
    backend: Literal["onnxruntime", "triton"] = Field(
        "onnxruntime", description="onnxruntime (embedded) | triton (stack)"
    )
    model_repository: Path = Field(Path("model_repository_running"), validate_default=True)
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "chest_screening"
    triton_timeout_s: float = Field(120.0, description="one request; a timeout is retried...")
    # Below RabbitMQ's consumer_timeout (30 min), after which the broker takes the task back.
    model_server_wait_limit_s: float = Field(
        1200.0, description="...until the study has waited this long: Failure row"
    )
    triton_transport: Literal["grpc", "shared_memory", "auto"] = Field(
        "auto", description="auto: shared memory when Triton is on this host"
    )
    onnx_intra_op_threads: int = Field(
        0, description="0: onnxruntime uses every core (start.sh sets cores / adapters)"
    )
    onnx_thread_spinning: bool = Field(
        False, description="idle onnxruntime threads spin (a dedicated host) or sleep"
    )
    onnx_graph_cache: bool = Field(
        True, description="save the optimised graph beside the model; later starts load it"
    )
    pathology_threshold: float | None = Field(None, description="null: the repository's default")
    finding_thresholds: dict[str, float] = Field(
        default_factory=dict, description='e.g. {"Lung nodule": 0.4}'
    )

    @field_validator("model_repository")
    @classmethod
    def _absolute_repository(cls, value: Path) -> Path:
        return _resolve(value)


class StorageSettings(_Section):
    root: Path = Field(
        Path("storage"), validate_default=True, description="shared by frontends and adapters"
    )

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, value: Path) -> Path:
        return _resolve(value)


class RabbitMQSettings(_Section):
    host: str = "127.0.0.1"
    queue_prefix: str = Field(
        "cts",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="exchanges and queues are <prefix>.tasks, ... (tests use their own)",
    )
    port: int = 5672
    username: str = Field("guest", description="set CTS__RABBITMQ__USERNAME in deployment")
    password: str = Field("guest", description="set CTS__RABBITMQ__PASSWORD in deployment")
    virtual_host: str = "/"
    prefetch_count: int = Field(1, description="studies an adapter holds at once")
    heartbeat_s: int = 60
    max_deliveries: int = Field(3, description="then a Failure result and the dead letters")
    max_queue_depth: int = Field(200, description="uploads are refused above this")


class FrontendSettings(_Section):
    host: str = Field("127.0.0.1", description="0.0.0.0 serves the whole network")
    port: int = 7860
    max_upload_mb: int = 2048
    auth: str | None = Field(None, description='"user:password" turns on authentication')
    api_token: str | None = Field(
        None, description="bearer token the REST API (/api/v1) requires; null: open"
    )


# DICOM Application Entity titles: 1-16 characters, no backslash or control characters.
AE_TITLE_PATTERN = r"^[^\\\x00-\x1f]{1,16}$"


class DimseDestination(_Section):
    """A DICOM node that receives the structured reports by DIMSE C-STORE (a PACS).

    ``kind`` may be left out: destinations written before STOW-RS existed are DIMSE ones.
    """

    kind: Literal["dimse"] = "dimse"
    ae_title: str = Field(pattern=AE_TITLE_PATTERN, description="the PACS's called AE title")
    host: str
    port: int = Field(ge=1, le=65535)


class HttpCredentials(_Section):
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
    secret_file: Path | None = Field(
        None, description="a file that holds the token or password (surrounding spaces dropped)"
    )

    @field_validator("secret_file")
    @classmethod
    def _absolute_secret_file(cls, value: Path | None) -> Path | None:
        return None if value is None else _resolve(value)

    @model_validator(mode="after")
    def _one_secret_and_a_user_for_basic(self) -> HttpCredentials:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret_env and secret_file")
        if (self.scheme == "basic") != (self.username is not None):
            raise ValueError("a username goes with the basic scheme, and only with it")
        return self


class StowRsDestination(_Section):
    """A DICOMweb server that receives the structured reports by STOW-RS (HTTP POST of
    ``<url>/studies``), e.g. a PACS or a vendor-neutral archive."""

    kind: Literal["stow-rs"]
    url: str = Field(description="the DICOMweb base, e.g. http://pacs:8042/dicom-web")
    credentials: HttpCredentials | None = Field(None, description="null: no authentication")
    tls_verify: bool = Field(True, description="check the server's certificate (https)")
    tls_ca_bundle: Path | None = Field(
        None, description="PEM file of the CA that signed it (a hospital CA); null: system CAs"
    )
    timeout_s: float = Field(30.0, gt=0, description="connect and read timeout of one request")

    @field_validator("url")
    @classmethod
    def _plain_http_base(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "no credentials in the URL: use credentials (secret_env or secret_file)"
            )
        if parts.query or parts.fragment:
            raise ValueError("the DICOMweb base URL takes no query or fragment")
        if parts.port == 0:  # reading .port also refuses a port that is not a number
            raise ValueError("port 0")
        return value.rstrip("/")  # the client appends /studies

    @field_validator("tls_ca_bundle")
    @classmethod
    def _absolute_ca_bundle(cls, value: Path | None) -> Path | None:
        return None if value is None else _resolve(value)

    @model_validator(mode="after")
    def _bundle_only_when_verifying(self) -> StowRsDestination:
        if self.tls_ca_bundle is not None and not self.tls_verify:
            raise ValueError("tls_ca_bundle is set but tls_verify is false")
        return self


# Chosen by ``kind``; a destination without one is DIMSE (DicomSettings fills it in).
ReportDestination = Annotated[DimseDestination | StowRsDestination, Field(discriminator="kind")]


class DicomSettings(_Section):
    """Hospital integration over DICOM: the listener (python -m services.dicom_listener)
    receives studies by C-STORE and sends each study's structured report back."""

    host: str = Field("127.0.0.1", description="the listener binds here; 0.0.0.0 for a network")
    port: int = Field(11112, ge=1, le=65535, description="the listener's DICOM port")
    ae_title: str = Field("CTS", pattern=AE_TITLE_PATTERN, description="the listener's AE title")
    study_quiet_seconds: float = Field(
        10.0, gt=0, description="a study is complete after this long without a new instance"
    )
    allowed_calling_ae_titles: list[str] = Field(
        default_factory=list, description="empty: any calling AE title may send studies"
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
    export_retry_initial_s: float = Field(2.0, gt=0, description="first wait after a failed send")
    export_retry_max_s: float = Field(60.0, gt=0, description="longest wait between sends")
    network_timeout_s: float = Field(30.0, gt=0, description="DIMSE and network timeouts")

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


class LoggingSettings(_Section):
    level: str = "INFO"


class MetricsSettings(_Section):
    """Prometheus ``/metrics`` of each service (services/monitoring/)."""

    enabled: bool = Field(True, description="serve /metrics in the adapter, frontend, listener")
    host: str = Field("127.0.0.1", description="0.0.0.0 lets a Prometheus on another host scrape")
    frontend_port: int = Field(9400, description="0: any free port (logged)")
    dicom_listener_port: int = Field(9401, description="0: any free port (logged)")
    # One port per process: start.sh gives its adapter N the port adapter_port + N - 1; in
    # containers and pods every adapter has its own address and keeps this one.
    adapter_port: int = Field(9410, description="0: any free port (logged)")


class MemorySettings(_Section):
    """How the batch and adapter processes treat memory they free (glibc only)."""

    # Every study allocates the same few hundred MB again, and on virtual machines the first
    # touch of fresh pages costs about a second per GB (see benchmarks/README.md).
    keep_freed_memory: bool = Field(
        True, description="reuse freed memory for the next study (resident size stays at peak)"
    )


class Settings(_Section):
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    series_selection: SeriesSelectionSettings = Field(default_factory=SeriesSelectionSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    chest_check: ChestCheckSettings = Field(default_factory=ChestCheckSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    rabbitmq: RabbitMQSettings = Field(default_factory=RabbitMQSettings)
    frontend: FrontendSettings = Field(default_factory=FrontendSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)


def _apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_settings(
    path: Path | str | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Read the YAML file (if present), apply ``CTS__`` overrides, validate."""
    config_path = Path(path or os.environ.get("CTS_CONFIG") or DEFAULT_CONFIG_PATH)
    data: dict[str, Any] = {}
    if config_path.exists():
        data = yaml.safe_load(config_path.read_text()) or {}
    data = _apply_env_overrides(data, dict(os.environ if environ is None else environ))
    return Settings.model_validate(data)


# -- the generated configs/config.yaml ----------------------------------------------------

YAML_HEADER = """\
# One configuration for every service, generated from services/core/config.py (the one
# place the defaults live): `python -m services.core.config --write`. Copy it and edit what
# your deployment needs. Any leaf can be overridden from the environment:
# CTS__<SECTION>__<KEY>=value (e.g. CTS__RABBITMQ__HOST=broker).
# Relative paths are relative to the project root.
"""
COMMENT_COLUMN = 40


def _yaml_scalar(value: object) -> str:
    if isinstance(value, Path):
        value = value.as_posix()
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1000)
        .strip()
        .removesuffix("...")
        .strip()
    )


def default_config_yaml() -> str:
    """configs/config.yaml: every setting with its default and its description."""
    lines = [YAML_HEADER.rstrip()]
    for section_name, section_field in Settings.model_fields.items():
        section_type = section_field.annotation
        assert isinstance(section_type, type) and issubclass(section_type, BaseModel)
        lines.append("")
        lines.append(f"{section_name}:")
        for name, field in section_type.model_fields.items():
            default = field.get_default(call_default_factory=True)
            entry = f"  {name}: {_yaml_scalar(default)}"
            if field.description:
                entry = f"{entry.ljust(COMMENT_COLUMN - 1)} # {field.description}"
            lines.append(entry)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.core.config", description=__doc__)
    parser.add_argument(
        "--write", action="store_true", help=f"write {DEFAULT_CONFIG_PATH} (default: print it)"
    )
    arguments = parser.parse_args(argv)
    text = default_config_yaml()
    if arguments.write:
        DEFAULT_CONFIG_PATH.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
