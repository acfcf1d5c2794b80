"""The call of a study's latest review on its row (None when the reader agreed): the worklist
says what the reader decided ("disagreed: NORMAL"), not only that they disagreed. Rows
reviewed before take it from their latest review.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("review_pathology", sa.Boolean(), nullable=True))
    op.execute(
        "UPDATE studies SET review_pathology = ("
        " SELECT reviews.pathology FROM reviews WHERE reviews.study_id = studies.id"
        " ORDER BY reviews.reviewed_at DESC, reviews.id DESC LIMIT 1)"
        " WHERE reviewed_by IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("review_pathology")
