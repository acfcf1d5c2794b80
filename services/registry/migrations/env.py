"""Alembic's environment: the engine from the URL services/registry/database.py passes in.

On PostgreSQL the migrations run under a transaction-scoped advisory lock: two upgrades
started at once (the init containers of two pods) run one after the other, and the second
finds nothing to do."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from services.registry.database import create_registry_engine
from services.registry.models import Base

MIGRATION_LOCK = 0x43545352  # "CTSR": one key for every upgrade of this registry
config = context.config
engine = create_registry_engine(config.attributes["url"])
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters by copying
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
engine.dispose()
