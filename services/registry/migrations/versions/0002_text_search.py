"""Indexes for the listing's free-text search (``q``: names, ids, descriptions, file names).

Without them a search that matches few studies reads every row: at 100k studies 270 ms on
SQLite and 225 ms on PostgreSQL (benchmarks/registry.py, benchmarks/README.md).

PostgreSQL: a trigram index (pg_trgm, GIN) over the searched columns, which ILIKE '%text%'
uses for text of three characters or more; the planner still walks the newest rows first
when the text is common. ``CREATE EXTENSION pg_trgm`` needs a role that may create it: a
superuser, or (pg_trgm is a trusted extension since PostgreSQL 13) the database's owner.
SQLite: the listing's index (received, id) carries the searched columns too, so the search
tests each row in the index and reads from the table only the rows it returns.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The columns reads.py searches, in its order.
SEARCHED = (
    "patient_name",
    "patient_id",
    "accession_number",
    "study_description",
    "original_filename",
    "study_instance_uid",
)


def _dialect() -> str:
    return op.get_bind().dialect.name


def upgrade() -> None:
    if _dialect() == "postgresql":
        op.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
        op.create_index(
            "ix_studies_text",
            "studies",
            list(SEARCHED),
            postgresql_using="gin",
            postgresql_ops=dict.fromkeys(SEARCHED, "gin_trgm_ops"),
        )
    elif _dialect() == "sqlite":
        op.create_index("ix_studies_listing", "studies", ["received_at", "id", *SEARCHED])
        op.drop_index("ix_studies_received", "studies")  # the new one leads with its columns


def downgrade() -> None:
    if _dialect() == "postgresql":
        op.drop_index("ix_studies_text", "studies")  # pg_trgm stays: others may use it
    elif _dialect() == "sqlite":
        op.create_index("ix_studies_received", "studies", ["received_at", "id"])
        op.drop_index("ix_studies_listing", "studies")
