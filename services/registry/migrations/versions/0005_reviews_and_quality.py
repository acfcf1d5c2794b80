"""Reviews (a radiologist agreeing with a study's call or correcting it; the latest one on the
study's row, for sorting and filtering the worklist) and the data-quality flags of a study.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        # Rows from before have no flags: the empty list, written once, then no default.
        batch.add_column(
            sa.Column("quality_flags", sa.String(length=128), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("reviewed_by", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("reviewed_at", WHEN, nullable=True))
        batch.add_column(sa.Column("review_agrees", sa.Boolean(), nullable=True))
        batch.create_index("ix_studies_reviewed", ["reviewed_at"])
    with op.batch_alter_table("studies") as batch:
        batch.alter_column("quality_flags", server_default=None)
    op.create_table(
        "reviews",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("study_id", ID, nullable=False),
        sa.Column("reviewer", sa.String(length=128), nullable=False),
        sa.Column("agrees", sa.Boolean(), nullable=False),
        sa.Column("pathology", sa.Boolean(), nullable=True),
        sa.Column("findings", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("reviewed_at", WHEN, nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_reviews_study", "reviews", ["study_id", "reviewed_at"])


def downgrade() -> None:
    op.drop_index("ix_reviews_study", table_name="reviews")
    op.drop_table("reviews")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_reviewed")
        for column in ("review_agrees", "reviewed_at", "reviewed_by", "quality_flags"):
            batch.drop_column(column)
