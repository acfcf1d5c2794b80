"""The whole configuration and how it is read: the YAML file, then ``CTS__`` environment
variables over it (pydantic-settings' sources), then validation.

Environment variables override any leaf: ``CTS__<SECTION>__<KEY>=value`` (double underscores
between levels, case-insensitive), e.g. ``CTS__RABBITMQ__HOST=broker``. A value that is a
list or a mapping is written in YAML flow style (a superset of JSON), e.g.
``CTS__DICOM__ALLOWED_CALLING_AE_TITLES='[ORTHANC, CT1]'``; ``null`` is None.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from services.core.config.base import PROJECT_ROOT
from services.core.config.notifications import NotificationSettings
from services.core.config.pipeline import (
    ChestCheckSettings,
    InferenceSettings,
    IntakeSettings,
    MemorySettings,
    QualitySettings,
    SeriesSelectionSettings,
)
from services.core.config.services import (
    AdapterSettings,
    DicomSettings,
    FrontendSettings,
    LoggingSettings,
    MetricsSettings,
    RabbitMQSettings,
    RegistrySettings,
    StorageSettings,
)

DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "config.yaml"
ENV_PREFIX = "CTS__"
CONFIG_PATH_VARIABLE = "CTS_CONFIG"  # another config file than the default


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        env_parse_none_str="null",
    )

    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    series_selection: SeriesSelectionSettings = Field(default_factory=SeriesSelectionSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    chest_check: ChestCheckSettings = Field(default_factory=ChestCheckSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    rabbitmq: RabbitMQSettings = Field(default_factory=RabbitMQSettings)
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    frontend: FrontendSettings = Field(default_factory=FrontendSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # ``Settings()`` is the defaults alone: the file and the environment are read by
        # load_settings, which names them (tests pass their own environment).
        return (init_settings,)


class _YamlValuedEnvironment(EnvSettingsSource):
    """``CTS__`` variables of a given environment; lists and mappings written as YAML."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        return yaml.safe_load(value) if isinstance(value, str) else value


def load_settings(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the YAML file (if present), apply ``CTS__`` overrides, validate."""
    environment = os.environ if environ is None else environ
    config_path = Path(path or environment.get(CONFIG_PATH_VARIABLE) or DEFAULT_CONFIG_PATH)
    from_file: dict[str, Any] = {}
    if config_path.exists():
        from_file = YamlConfigSettingsSource(Settings, yaml_file=config_path)()
    _refuse_unknown_sections(environment)
    from_environment = _YamlValuedEnvironment(environment)()
    return Settings.model_validate(merged(from_file, from_environment))


def _refuse_unknown_sections(environment: Mapping[str, str]) -> None:
    """A ``CTS__`` variable naming no section is a typo: an error, as an unknown key is."""
    unknown = sorted(
        name
        for name in environment
        if name.upper().startswith(ENV_PREFIX)
        and name[len(ENV_PREFIX) :].split("__")[0].lower() not in Settings.model_fields
    )
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: no such section of the settings")


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it, mapping by mapping (leaves replace)."""
    result = dict(base)
    for key, value in override.items():
        below = result.get(key)
        if isinstance(below, Mapping) and isinstance(value, Mapping):
            result[key] = merged(below, value)
        else:
            result[key] = value
    return result
