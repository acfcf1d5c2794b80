"""The time of a result's check first (the adapter's preparation stage checks a new task
first while others wait, services/adapter/stages.py): the expected waits count a check for
every task still to be checked (services/frontend/wait_estimate.py).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("check_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("check_seconds")
