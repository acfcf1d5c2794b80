"""Alembic's environment: the engine from the URL services/registry/database.py passes in."""

from __future__ import annotations

from alembic import context

from services.registry.database import create_registry_engine
from services.registry.models import Base

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
        context.run_migrations()
engine.dispose()
