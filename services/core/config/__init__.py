"""One configuration for every service, validated by pydantic; the defaults live here only.

``configs/config.yaml`` is generated from these models (``python -m services.core.config
--write``; a test checks it is current), so a deployment copies it and edits what it needs.
Environment variables override any leaf (``CTS__<SECTION>__<KEY>=value``, see loading.py).
Relative paths are relative to the project root.

The rooms: ``base.py`` (strict sections, paths, the Backoff of every retry), ``pipeline.py``
(the screening), ``services.py`` (the edges), ``destinations.py`` (where SRs go), ``notifications.py`` (webhooks), ``loading.py`` (file + environment),
``document.py`` (the generated YAML).
"""

from services.core.config.base import AE_TITLE_PATTERN, PROJECT_ROOT, Backoff
from services.core.config.destinations import (
    DimseDestination,
    HttpCredentials,
    ReportDestination,
    StowRsDestination,
)
from services.core.config.loading import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    Settings,
    load_settings,
)
from services.core.config.notifications import NotificationSettings, Webhook
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

__all__ = [
    "AE_TITLE_PATTERN",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "PROJECT_ROOT",
    "AdapterSettings",
    "Backoff",
    "ChestCheckSettings",
    "DicomSettings",
    "DimseDestination",
    "FrontendSettings",
    "HttpCredentials",
    "InferenceSettings",
    "IntakeSettings",
    "LoggingSettings",
    "MemorySettings",
    "MetricsSettings",
    "NotificationSettings",
    "QualitySettings",
    "RabbitMQSettings",
    "RegistrySettings",
    "ReportDestination",
    "SeriesSelectionSettings",
    "Settings",
    "StorageSettings",
    "StowRsDestination",
    "Webhook",
    "load_settings",
]
