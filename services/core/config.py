"""One configuration for every service: `configs/config.yaml`, validated by pydantic.

Environment variables override any leaf: ``CTS__<SECTION>__<KEY>=value`` (double
underscores between levels, case-insensitive), e.g. ``CTS__RABBITMQ__HOST=broker``
or ``CTS__INFERENCE__BACKEND=triton``. Values are parsed as YAML scalars, so
``CTS__INTAKE__MAX_FILES=5000`` is an int and ``CTS__FRONTEND__AUTH=null`` is None.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "config.yaml"
ENV_PREFIX = "CTS__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntakeSettings(_Section):
    """Limits that protect a worker from hostile or broken archives."""

    max_uncompressed_bytes: int = 8 * 1024**3
    max_files: int = 20_000
    max_compression_ratio: float = 200.0
    max_nesting_depth: int = 3
    # Voxels of one series' volume (rows x columns x slices), checked from the headers before
    # any pixel is read: 450 M is about 1700 slices of 512x512, within a 3 GB worker budget
    # (about 1.6 bytes of memory per byte of the float32 volume).
    max_series_voxels: int = 450_000_000


class SeriesSelectionSettings(_Section):
    min_slices: int = 20
    min_slice_thickness_mm: float = 0.5
    max_slice_thickness_mm: float = 5.0
    min_axial_cosine: float = 0.9


class QualitySettings(_Section):
    """Thresholds above which a data-quality finding becomes a warning."""

    spacing_tolerance_fraction: float = 0.1
    max_missing_slices_percent: float = 20.0  # above this the study fails
    # above this the study fails; kept below acos(min_axial_cosine) = 25.8 deg so that a
    # steeper tilt is refused by one rule (not axial), not by two that disagree
    max_gantry_tilt_degrees: float = 25.0


class ChestCheckSettings(_Section):
    min_coverage_mm: float = 80.0
    detector: str = "lung_air"  # a name registered in services.core.body_part
    lung_min_extent_fraction: float = 0.3
    lung_min_area_fraction: float = 0.02


def _resolve(path: Path) -> Path:
    """Relative paths in the config are relative to the project root, not the working directory."""
    return path if path.is_absolute() else PROJECT_ROOT / path


class InferenceSettings(_Section):
    backend: Literal["onnxruntime", "triton"] = "onnxruntime"
    model_repository: Path = PROJECT_ROOT / "model_repository_running"
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "chest_screening"
    triton_timeout_s: float = 120.0  # one request to Triton; a timeout is retried
    # How long one study may wait for an unavailable (or always timing out) model server
    # before it becomes a Failure row; below RabbitMQ's consumer_timeout (30 min).
    model_server_wait_limit_s: float = 1200.0
    triton_transport: Literal["grpc", "shared_memory", "auto"] = "auto"
    onnx_intra_op_threads: int = 0  # 0: onnxruntime picks (all cores)
    pathology_threshold: float | None = None  # None: the repository's default
    finding_thresholds: dict[str, float] = Field(default_factory=dict)

    @field_validator("model_repository")
    @classmethod
    def _absolute_repository(cls, value: Path) -> Path:
        return _resolve(value)


class StorageSettings(_Section):
    root: Path = PROJECT_ROOT / "storage"

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, value: Path) -> Path:
        return _resolve(value)


class RabbitMQSettings(_Section):
    host: str = "127.0.0.1"
    # Every exchange and queue name starts with this (tests and parallel stacks use their own).
    queue_prefix: str = Field(default="cts", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    port: int = 5672
    username: str = "guest"
    password: str = "guest"
    virtual_host: str = "/"
    prefetch_count: int = 1
    heartbeat_s: int = 60
    max_deliveries: int = 3
    max_queue_depth: int = 200


class FrontendSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: int = 2048
    auth: str | None = None  # "user:password" turns on Gradio authentication


class LoggingSettings(_Section):
    level: str = "INFO"


class MemorySettings(_Section):
    """How the batch and adapter processes treat memory they free (glibc only)."""

    # Keep freed memory in the process for the next study instead of returning it to the
    # kernel: every study allocates the same few hundred MB again, and on virtual machines
    # the first touch of fresh pages costs about a second per GB. The resident size then
    # stays at the largest study's peak (see benchmarks/README.md).
    keep_freed_memory: bool = True


class Settings(_Section):
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    series_selection: SeriesSelectionSettings = Field(default_factory=SeriesSelectionSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    chest_check: ChestCheckSettings = Field(default_factory=ChestCheckSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    rabbitmq: RabbitMQSettings = Field(default_factory=RabbitMQSettings)
    frontend: FrontendSettings = Field(default_factory=FrontendSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
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
    config_path = Path(path or os.environ.get("CTS_CONFIG", DEFAULT_CONFIG_PATH))
    data: dict[str, Any] = {}
    if config_path.exists():
        data = yaml.safe_load(config_path.read_text()) or {}
    data = _apply_env_overrides(data, dict(os.environ if environ is None else environ))
    return Settings.model_validate(data)
