"""A study's outcome in the reader's four words (services/core/outcome.py), for sorting and
filtering the worklist by it; rows recorded before it are given theirs from what they hold.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("outcome", sa.String(length=16), nullable=True))
        batch.create_index("ix_studies_outcome", ["outcome", "received_at"])
    # Rows from before: a Success is its call; a Failure is "failed" (the kind was not kept).
    op.execute(
        "UPDATE studies SET outcome = CASE WHEN pathology THEN 'pathology' ELSE 'normal' END "
        "WHERE processing_status = 'Success'"
    )
    op.execute("UPDATE studies SET outcome = 'failed' WHERE processing_status = 'Failure'")


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_outcome")
        batch.drop_column("outcome")
