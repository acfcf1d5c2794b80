"""The study registry: one record of every study task, whatever door it came through, in
SQLite under the storage root or in PostgreSQL. The only code that talks to the database.

The rooms: ``records.py`` (what it holds and answers, as pydantic values), ``models.py``
(the tables), ``migrations/`` (how the schema changes: Alembic), ``database.py`` (where it
is, the schema check), ``writes.py`` and ``reads.py`` (every change and every question),
``registry.py`` (the object the services hold), ``recorder.py`` (what the adapters report,
from RabbitMQ), ``__main__.py`` (python -m services.registry).
"""

from services.core.config import Settings
from services.registry.database import RegistrySchemaError, database_url
from services.registry.database import upgrade as _upgrade
from services.registry.records import (
    Door,
    Priority,
    Review,
    ReviewSummary,
    StudyFilter,
    StudyPage,
    StudyRecord,
    StudyState,
    Submission,
)
from services.registry.registry import Registry


def upgrade_registry(settings: Settings) -> None:
    """The configured registry at this code's newest schema (what `python -m services.registry
    upgrade` does; tests and the batch call it directly)."""
    _upgrade(database_url(settings))


__all__ = [
    "Door",
    "Priority",
    "Registry",
    "RegistrySchemaError",
    "Review",
    "ReviewSummary",
    "StudyFilter",
    "StudyPage",
    "StudyRecord",
    "StudyState",
    "Submission",
    "upgrade_registry",
]
