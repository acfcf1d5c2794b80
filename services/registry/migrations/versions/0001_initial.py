"""The registry's first schema: studies, the rows each viewer hid, SR deliveries.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite's rowid alias must be INTEGER; elsewhere a 64-bit key.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sr_deliveries",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("report_index", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=512), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "task_id", "report_index", "destination", name="uq_sr_deliveries_destination"
        ),
    )
    op.create_table(
        "studies",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("report_index", sa.Integer(), nullable=False),
        sa.Column("door", sa.String(length=16), nullable=False),
        sa.Column("sender", sa.String(length=128), nullable=True),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("original_filename", sa.String(length=512), nullable=False),
        sa.Column("study_path", sa.String(length=512), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("adapter_id", sa.String(length=128), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processing_status", sa.String(length=16), nullable=True),
        sa.Column("probability_of_pathology", sa.Float(), nullable=True),
        sa.Column("pathology", sa.Boolean(), nullable=True),
        sa.Column("most_dangerous_finding", sa.String(length=128), nullable=True),
        sa.Column("findings", sa.JSON(), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("demo_weights", sa.Boolean(), nullable=True),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=128), nullable=True),
        sa.Column("study_date", sa.String(length=10), nullable=True),
        sa.Column("study_time", sa.String(length=8), nullable=True),
        sa.Column("study_description", sa.String(length=512), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("patient_name", sa.String(length=512), nullable=True),
        sa.Column("patient_id", sa.String(length=128), nullable=True),
        sa.Column("issuer_of_patient_id", sa.String(length=128), nullable=True),
        sa.Column("patient_birth_date", sa.String(length=10), nullable=True),
        sa.Column("patient_age", sa.String(length=8), nullable=True),
        sa.Column("patient_sex", sa.String(length=8), nullable=True),
        sa.Column("referring_physician_name", sa.String(length=512), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("task_id", "report_index", name="uq_studies_task_report"),
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index("ix_studies_accession", ["accession_number"], unique=False)
        batch_op.create_index("ix_studies_content", ["content_sha256"], unique=False)
        batch_op.create_index(
            "ix_studies_patient", ["patient_id", "issuer_of_patient_id", "study_date"], unique=False
        )
        batch_op.create_index("ix_studies_received", ["received_at", "id"], unique=False)
        batch_op.create_index("ix_studies_sender", ["sender", "received_at"], unique=False)
        batch_op.create_index("ix_studies_state", ["state", "received_at"], unique=False)
        batch_op.create_index("ix_studies_study_uid", ["study_instance_uid"], unique=False)

    op.create_table(
        "hidden_studies",
        sa.Column("study_id", ID, nullable=False),
        sa.Column("viewer", sa.String(length=128), nullable=False),
        sa.Column("hidden_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_id", "viewer"),
    )


def downgrade() -> None:
    op.drop_table("hidden_studies")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_study_uid")
        batch_op.drop_index("ix_studies_state")
        batch_op.drop_index("ix_studies_sender")
        batch_op.drop_index("ix_studies_received")
        batch_op.drop_index("ix_studies_patient")
        batch_op.drop_index("ix_studies_content")
        batch_op.drop_index("ix_studies_accession")

    op.drop_table("studies")
    op.drop_table("sr_deliveries")
