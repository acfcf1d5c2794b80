"""The adapter's two stage times of each result (preparation, model), which the expected
waits of queued studies are measured from (services/frontend/wait_estimate.py).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("prepare_seconds", sa.Float(), nullable=True))
        batch.add_column(sa.Column("model_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        for column in ("model_seconds", "prepare_seconds"):
            batch.drop_column(column)
