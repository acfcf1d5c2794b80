"""Registries for the tests: a fresh SQLite file, or a fresh database on the PostgreSQL that
runs on these machines (127.0.0.1:5432, trust authentication; scripts/ensure_services.sh
starts it). Not a test module."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from alembic import command
from preconditions import missing_precondition
from sqlalchemy.engine import URL

from services.registry import Door, Registry, Submission
from services.registry.database import alembic_config

POSTGRES_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
BACKENDS = ("sqlite", "postgresql")


def sqlite_url(folder: Path) -> URL:
    return URL.create("sqlite", database=str(folder / "registry.sqlite3"))


@contextmanager
def postgres_database() -> Iterator[URL]:
    """A new, empty database, dropped afterwards."""
    name = f"cts_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True)
    except psycopg.OperationalError as error:
        missing_precondition(f"PostgreSQL at 127.0.0.1:5432 cannot be reached: {error}")
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    try:
        yield URL.create(
            "postgresql+psycopg", username="postgres", host="127.0.0.1", port=5432, database=name
        )
    finally:
        # A new connection: the server may have restarted meanwhile (the fault suite does).
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as dropper:
            dropper.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def registry_url(backend: str, folder: Path, *, upgraded: bool = True) -> Iterator[URL]:
    """A URL of an empty registry of that backend, migrated to the newest schema."""
    if backend == "sqlite":
        url = sqlite_url(folder)
        if upgraded:
            command.upgrade(alembic_config(url), "head")
        yield url
        return
    with postgres_database() as url:
        if upgraded:
            command.upgrade(alembic_config(url), "head")
        yield url


# Each backend as a pytest parameter; PostgreSQL's carries the postgres mark (the fast loop
# leaves those out).
BACKEND_PARAMETERS = [
    pytest.param(backend, marks=[pytest.mark.postgres] if backend == "postgresql" else [])
    for backend in BACKENDS
]


@contextmanager
def open_registry(backend: str, folder: Path) -> Iterator[Registry]:
    """A Registry on an empty, migrated database of that backend, closed afterwards."""
    with registry_url(backend, folder) as url:
        opened = Registry(url)
        try:
            yield opened
        finally:
            opened.close()


def task_submission(task_id: str, *, at: datetime, door: Door, **fields: object) -> Submission:
    """A task of ``door`` as its door records it (an upload's file names), received and
    queued at ``at``."""
    return Submission.model_validate(
        {
            "task_id": task_id,
            "door": door,
            "original_filename": f"{task_id}.zip",
            "study_path": f"uploads/{task_id}/{task_id}.zip",
            "received_at": at,
            "queued_at": at,
            **fields,
        }
    )
