"""Alembic's environment: the engine from the URL services/registry/database.py passes in.

On PostgreSQL the migrations run under a transaction-scoped advisory lock: two upgrades
started at once (the init containers of two pods) run one after the other, and the second
finds nothing to do.

On SQLite a migration that alters a table copies it, drops the old one and renames the copy:
with foreign keys enforced (as the registry's connections have them), dropping `studies`
would delete every review and hidden row through ON DELETE CASCADE. So the migrations run
with foreign keys off, as SQLite's documentation prescribes for such changes, and the keys are
checked once they are done."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from services.registry.database import create_registry_engine
from services.registry.models import Base

MIGRATION_LOCK = 0x43545352  # "CTSR": one key for every upgrade of this registry


def sqlite_foreign_keys(connection: Connection, *, enforced: bool) -> None:
    """On the DB-API connection, outside any transaction: SQLite ignores the pragma inside
    one."""
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys={'ON' if enforced else 'OFF'}")


def check_sqlite_foreign_keys(connection: Connection) -> None:
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"the migration left {len(broken)} row(s) whose foreign key is broken")


config = context.config
engine = create_registry_engine(config.attributes["url"])
with engine.connect() as connection:
    is_sqlite = connection.dialect.name == "sqlite"
    if is_sqlite:
        sqlite_foreign_keys(connection, enforced=False)
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=is_sqlite,  # SQLite alters by copying
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
        if is_sqlite:
            check_sqlite_foreign_keys(connection)
engine.dispose()
