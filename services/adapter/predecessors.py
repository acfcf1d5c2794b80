"""The earlier SRs of a study, from the study registry: what a new SR of the same study
supersedes (services/sr/document.py names them in its Predecessor Documents Sequence).

Best effort: an adapter screens studies whether or not the registry can be reached, so a
registry that cannot be opened or asked leaves the SR without predecessors (said in the log).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from services.core.config import Settings
from services.core.errors import ConfigurationError
from services.registry import Registry


class EarlierReports:
    """Callable: StudyInstanceUID -> [(task id, report index)] of its earlier SRs."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._registry: Registry | None = None
        self._lock = threading.Lock()

    def _open(self) -> Registry:
        with self._lock:
            if self._registry is None:
                self._registry = Registry.open(self._settings)
            return self._registry

    def __call__(self, study_instance_uid: str) -> Sequence[tuple[str, int]]:
        try:
            return self._open().earlier_reports_with_sr(study_instance_uid)
        except (SQLAlchemyError, ConfigurationError) as error:
            logger.warning("earlier SRs of a study not looked up: {}", type(error).__name__)
            return []

    def close(self) -> None:
        with self._lock:
            if self._registry is not None:
                self._registry.close()
                self._registry = None
