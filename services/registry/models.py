"""The registry's tables (SQLAlchemy 2). Only services/registry reads or writes them; the
migrations in migrations/versions/ create and change them (never ``create_all``).

``studies``: one row per study of a task (``task_id``, ``report_index``), from the moment a
door records the task (its first row) to its result (one row per study it held).
``hidden_studies``: the rows a viewer took off their own worklist.
``sr_deliveries``: each structured report's way to each destination.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Identifiers and codes: DICOM's own limits (UI 64, LO 64, PN 5x64) with room to spare.
UID_LENGTH = 64
SHORT_TEXT = 128
LONG_TEXT = 512
Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite's rowid alias must be INTEGER
# What the listing's free text searches (reads.py), indexed for it.
SEARCHED = (
    "patient_name",
    "patient_id",
    "accession_number",
    "study_description",
    "original_filename",
    "study_instance_uid",
)


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps in UTC, timezone-aware in Python whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the registry stores timezone-aware times only")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("task_id", "report_index", name="uq_studies_task_report"),
        # The listing, newest first: on SQLite with the searched columns, so a free-text
        # search tests them in the index; on PostgreSQL a trigram index serves the search
        # (migration 0002).
        Index("ix_studies_received", "received_at", "id").ddl_if(dialect="postgresql"),
        Index("ix_studies_listing", "received_at", "id", *SEARCHED).ddl_if(dialect="sqlite"),
        Index(
            "ix_studies_text",
            *SEARCHED,
            postgresql_using="gin",
            postgresql_ops=dict.fromkeys(SEARCHED, "gin_trgm_ops"),
        ).ddl_if(dialect="postgresql"),
        Index("ix_studies_state", "state", "received_at"),
        Index("ix_studies_patient", "patient_id", "issuer_of_patient_id", "study_date"),
        Index("ix_studies_accession", "accession_number"),
        Index("ix_studies_study_uid", "study_instance_uid"),
        Index("ix_studies_sender", "sender", "received_at"),
        Index("ix_studies_content", "content_sha256"),
        Index("ix_studies_outcome", "outcome", "received_at"),
        Index("ix_studies_reviewed", "reviewed_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(UID_LENGTH))
    report_index: Mapped[int] = mapped_column(Integer, default=0)
    # How it came in and from whom.
    door: Mapped[str] = mapped_column(String(16))
    sender: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    priority: Mapped[str] = mapped_column(String(16), default="routine")
    original_filename: Mapped[str] = mapped_column(String(LONG_TEXT), default="")
    study_path: Mapped[str] = mapped_column(String(LONG_TEXT), default="")
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    # Where it is.
    state: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    adapter_id: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    attempt: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    queued_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The adapter's stage times of the result (None before it, and model_seconds None when no
    # study needed the model): what the expected waits are measured from.
    prepare_seconds: Mapped[float | None] = mapped_column(Float)
    model_seconds: Mapped[float | None] = mapped_column(Float)
    check_seconds: Mapped[float | None] = mapped_column(Float)  # of prepare_seconds: a check
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # What came out (a summary: the full report stays a file).
    processing_status: Mapped[str | None] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(16))  # services/core/outcome.py
    probability_of_pathology: Mapped[float | None] = mapped_column(Float)
    pathology: Mapped[bool | None] = mapped_column(Boolean)
    most_dangerous_finding: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    findings: Mapped[list[str]] = mapped_column(JSON, default=list)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    model_version: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    demo_weights: Mapped[bool | None] = mapped_column(Boolean)
    files: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    # What it is and whose (from the DICOM headers; blanked by purge).
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    series_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    accession_number: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    study_date: Mapped[str | None] = mapped_column(String(10))
    study_time: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(LONG_TEXT))
    modality: Mapped[str | None] = mapped_column(String(16))
    patient_name: Mapped[str | None] = mapped_column(String(LONG_TEXT))
    patient_id: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    patient_birth_date: Mapped[str | None] = mapped_column(String(10))
    patient_age: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(8))
    referring_physician_name: Mapped[str | None] = mapped_column(String(LONG_TEXT))
    purged_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The data-quality flags as ",flag,flag," (a LIKE finds one on any database).
    quality_flags: Mapped[str] = mapped_column(String(SHORT_TEXT), default="")
    # The latest review (the reviews table keeps them all).
    reviewed_by: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    review_agrees: Mapped[bool | None] = mapped_column(Boolean)


class Review(Base):
    """A radiologist's reading of a study's result: agreeing with the call or correcting it,
    the findings they marked present or absent, a comment. Each review is kept; the study's
    row shows the latest."""

    __tablename__ = "reviews"
    __table_args__ = (Index("ix_reviews_study", "study_id", "reviewed_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(Id, ForeignKey("studies.id", ondelete="CASCADE"))
    reviewer: Mapped[str] = mapped_column(String(SHORT_TEXT))
    agrees: Mapped[bool] = mapped_column(Boolean)
    pathology: Mapped[bool | None] = mapped_column(Boolean)  # the call as the reader makes it
    findings: Mapped[dict[str, bool]] = mapped_column(JSON, default=dict)  # label -> present
    comment: Mapped[str] = mapped_column(Text, default="")
    reviewed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class HiddenStudy(Base):
    """A row one viewer took off their worklist ("Remove"); others still see it."""

    __tablename__ = "hidden_studies"

    study_id: Mapped[int] = mapped_column(
        Id, ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True
    )
    viewer: Mapped[str] = mapped_column(String(SHORT_TEXT), primary_key=True)
    hidden_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SrDelivery(Base):
    """A structured report on its way to one destination."""

    __tablename__ = "sr_deliveries"
    __table_args__ = (
        UniqueConstraint(
            "task_id", "report_index", "destination", name="uq_sr_deliveries_destination"
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(UID_LENGTH))
    report_index: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(LONG_TEXT))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    state: Mapped[str] = mapped_column(String(16))  # pending | sent | failed
    status: Mapped[str] = mapped_column(String(SHORT_TEXT), default="")
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class _Principal:
    """The columns of whoever may act on the registry, a person or a system: a unique name
    and a role (services/registry/accounts.py, Role)."""

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(SHORT_TEXT), unique=True)
    role: Mapped[str] = mapped_column(String(16))


class User(_Principal, Base):
    """A person who signs in: a local account (an argon2 hash) or one of an OIDC provider."""

    __tablename__ = "users"

    source: Mapped[str] = mapped_column(String(16))  # local | oidc
    password_hash: Mapped[str | None] = mapped_column(String(LONG_TEXT))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_sign_ins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_sign_in_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ApiKey(_Principal, Base):
    """A system's key (an integrator's): only its SHA-256 is kept; the key is shown once."""

    __tablename__ = "api_keys"

    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class WebSession(Base):
    """A signed-in browser: the cookie holds a random token, the table only its SHA-256."""

    __tablename__ = "web_sessions"
    __table_args__ = (Index("ix_web_sessions_user_name", "user_name"),)

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(SHORT_TEXT))
    csrf_token: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(SHORT_TEXT))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditEvent(Base):
    """Who did what to which study, from where: append-only (the database refuses to change
    or remove a row). No patient identity: the study by its task id and StudyInstanceUID."""

    __tablename__ = "audit"
    __table_args__ = (
        Index("ix_audit_at", "at"),
        Index("ix_audit_actor", "actor", "at"),
        Index("ix_audit_task", "task_id", "at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    actor: Mapped[str] = mapped_column(String(SHORT_TEXT))
    actor_kind: Mapped[str] = mapped_column(String(16))  # user | key | ae | system
    action: Mapped[str] = mapped_column(String(32))
    task_id: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    client: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    detail: Mapped[str] = mapped_column(String(LONG_TEXT), default="")


class WebhookNotification(Base):
    """A notification of a study's first result to one webhook, from the transaction that
    recorded the result until it was delivered or given up (services/registry/outbox.py).
    The body is what is sent, signed at each attempt with the webhook's current key."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (
        UniqueConstraint("task_id", "report_index", "url", name="uq_webhook_outbox_target"),
        Index("ix_webhook_outbox_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(UID_LENGTH))
    report_index: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(LONG_TEXT))
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_error: Mapped[str] = mapped_column(String(LONG_TEXT), default="")
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
