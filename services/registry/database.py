"""The database behind the registry: where it is, how to connect, and whether its schema is
the one this code was written for.

SQLite (the default, nothing to install) lives at ``<storage.root>/registry/registry.sqlite3``
in WAL mode, so readers never wait for the one writer; PostgreSQL (``registry.url``) serves
several hosts. The schema comes from the migrations (``python -m services.registry upgrade``,
which every deployment runs before the services start); a service meets a database whose
schema is older or newer than its code with RegistrySchemaError and refuses to start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from services.core.config import Settings
from services.core.errors import ConfigurationError

REGISTRY_DIR = "registry"
SQLITE_FILE = "registry.sqlite3"
MIGRATIONS = Path(__file__).parent / "migrations"


class RegistrySchemaError(ConfigurationError):
    """The database's schema is not the one this code expects (the message says which way)."""


def registry_address(text: str) -> URL:
    """A registry URL as written by a person. A plain ``postgresql://`` URL (what PostgreSQL
    operators write into their secrets) is read with psycopg 3, the driver the images carry,
    whatever SQLAlchemy's default for it (psycopg2 before SQLAlchemy 2.1; not installed)."""
    url = make_url(text)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


def database_url(settings: Settings) -> URL:
    """``registry.url`` (see ``registry_address``), or the SQLite file under the storage
    root."""
    if settings.registry.url:
        return registry_address(settings.registry.url)
    folder = settings.storage.root / REGISTRY_DIR
    return URL.create("sqlite", database=str(folder / SQLITE_FILE))


def describe(url: URL) -> str:
    """The URL without its password, for logs and messages."""
    return url.render_as_string(hide_password=True)


def create_registry_engine(url: URL, *, timeout_s: float = 10.0) -> Engine:
    """An engine for ``url``: SQLite in WAL mode with a busy timeout (the file and its folder
    private to this user), PostgreSQL with a connect timeout and pre-ping (a restarted server
    costs one failed checkout, not an error)."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, timeout_s)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = max(1, round(timeout_s))
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _sqlite_engine(url: URL, timeout_s: float) -> Engine:
    if url.database and url.database != ":memory:":
        path = Path(url.database)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            path.touch(mode=0o600)  # patient data: this user only
        os.chmod(path.parent, 0o700)
    # One connection per checkout: SQLite connections are cheap and a file lock is per
    # connection, so nothing is held open between requests.
    engine = create_engine(
        url, poolclass=NullPool, connect_args={"timeout": timeout_s, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at each checkpoint, fast
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={round(timeout_s * 1000)}")
        cursor.close()

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: URL) -> Config:
    """Alembic's configuration without an alembic.ini: the migrations folder and the URL."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config(URL.create("sqlite"))).get_current_head()
    assert head is not None, "the registry has no migrations"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_schema(engine: Engine) -> None:
    """RegistrySchemaError unless the database is at this code's newest migration."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    known = {
        script.revision
        for script in ScriptDirectory.from_config(alembic_config(engine.url)).walk_revisions()
    }
    where = describe(engine.url)
    if current is None:
        raise RegistrySchemaError(
            f"the registry database {where} has no schema yet: run `python -m services.registry "
            "upgrade` before the services start"
        )
    if current not in known:
        raise RegistrySchemaError(
            f"the registry database {where} has schema {current}, newer than this code "
            f"(which knows up to {head}): run the newer version of the code, or restore the "
            "database from before its upgrade"
        )
    raise RegistrySchemaError(
        f"the registry database {where} has schema {current}, older than this code's {head}: "
        "run `python -m services.registry upgrade`"
    )


def upgrade(url: URL) -> None:
    """Apply every migration this code has (idempotent): the database at the newest schema."""
    from alembic import command

    if url.get_backend_name() == "sqlite" and url.database:
        create_registry_engine(url).dispose()  # the file and its private folder first
    command.upgrade(alembic_config(url), "head")
