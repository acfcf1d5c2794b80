"""What the registry holds and answers, as plain typed values: the doors, the states, a
study's row as the worklist and the REST API read it, the filters of a listing and a page.
The database tables (models.py) stay inside the registry; everything else sees these."""

from __future__ import annotations

from datetime import date, datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from services.core.outcome import Outcome
from services.core.quality import QualityFlag
from services.core.schemas import PatientIdentity


class Door(str, Enum):
    """How a study task came in."""

    UPLOAD = "upload"  # the web page
    REST = "rest"  # POST /api/v1/studies
    DICOM = "dicom"  # the DICOM listener (a PACS or a modality sent it)
    AMQP = "amqp"  # a StudyTask published to RabbitMQ by another system
    BATCH = "batch"  # python -m services.batch --registry
    IMPORT = "import"  # python -m services.registry import-storage (results from before)


class StudyState(str, Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"  # the pipeline ran: a Success or a Failure row of its own
    FAILED = "failed"  # the task could not be processed (crash, given up, unreadable)

    @property
    def final(self) -> bool:
        return self in (StudyState.DONE, StudyState.FAILED)


class Priority(str, Enum):
    ROUTINE = "routine"
    URGENT = "urgent"
    STAT = "stat"


class Submission(BaseModel):
    """A study task as a door records it, before any result."""

    model_config = ConfigDict(extra="forbid")

    task_id: str
    door: Door
    sender: str | None = None  # the user, API key or calling AE title
    original_filename: str = ""
    study_path: str = ""  # relative to the storage root
    content_sha256: str | None = None
    priority: Priority = Priority.ROUTINE
    received_at: datetime
    queued_at: datetime | None = None


class ResultFileLink(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    path: str  # relative to the storage root
    description: str = ""


class ReviewSummary(BaseModel):
    """The latest review of a study, as its row shows it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reviewer: str
    reviewed_at: datetime
    agrees: bool
    pathology: bool | None = None  # the call the reader made when they disagreed


class Review(BaseModel):
    """A radiologist's reading of one study's result. ``agrees``: the call stands; else
    ``pathology`` is the call as the reader makes it. ``findings``: the labels the reader
    marked present (True) or absent (False); a label not in it was not marked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str
    report_index: int = 0
    reviewer: str
    agrees: bool
    pathology: bool | None = None
    findings: dict[str, bool] = Field(default_factory=dict)
    comment: str = Field("", max_length=4000)
    reviewed_at: datetime | None = None  # set by the registry


class StudyRecord(BaseModel):
    """One row of the registry: one study of a task (a task that holds several studies has
    one row each; a task without a result yet has its first row)."""

    model_config = ConfigDict(extra="forbid")

    id: int
    task_id: str
    report_index: int
    door: Door
    sender: str | None
    priority: Priority
    original_filename: str
    study_path: str
    state: StudyState
    stage: str | None
    progress: float
    adapter_id: str | None
    received_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    processing_status: str | None  # Success | Failure
    outcome: Outcome | None  # None until the result
    probability_of_pathology: float | None
    pathology: bool | None
    most_dangerous_finding: str | None
    findings: list[str] = Field(default_factory=list)  # above their thresholds
    failure_reason: str | None
    warnings: list[str] = Field(default_factory=list)
    model_version: str | None
    demo_weights: bool | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    accession_number: str | None
    study_date: str | None  # YYYY-MM-DD
    study_description: str | None
    identity: PatientIdentity | None
    files: list[ResultFileLink] = Field(default_factory=list)
    content_sha256: str | None
    purged_at: datetime | None
    quality_flags: list[QualityFlag] = Field(default_factory=list)
    review: ReviewSummary | None = None  # the latest

    @property
    def key(self) -> str:
        """What the page and the REST API name a row by."""
        return f"{self.task_id}:{self.report_index}"


class StudyFilter(BaseModel):
    """What a listing may be narrowed to; None means any."""

    model_config = ConfigDict(extra="forbid")

    states: list[StudyState] | None = None
    outcomes: list[Outcome] | None = None
    doors: list[Door] | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    received_from: date | None = None  # inclusive
    received_to: date | None = None  # inclusive
    text: str | None = Field(None, max_length=200)  # in names, ids, descriptions, file names
    sender: str | None = None  # a technologist sees the studies they sent
    hidden_for: str | None = None  # leave out what this viewer hid
    task_id: str | None = None
    quality_flags: list[QualityFlag] | None = None  # any of these
    reviewed: bool | None = None  # True: reviewed ones only; False: not reviewed yet


class StudyPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[StudyRecord]
    next: str | None  # the cursor of the next page, None on the last


class Delivery(BaseModel):
    """Where a study's structured report went (the DICOM listener's outbox)."""

    model_config = ConfigDict(extra="forbid")

    task_id: str
    report_index: int
    destination: str
    sop_instance_uid: str | None = None
    state: str  # pending | sent | failed
    status: str = ""
    updated_at: datetime


class PipelineTask(BaseModel):
    """A task not finished yet (queued or processing), as the wait estimates read it."""

    model_config = ConfigDict(extra="forbid")

    task_id: str
    priority: Priority
    state: StudyState  # QUEUED or PROCESSING
    stage: str | None = None  # the adapter's last progress stage
    started_at: datetime | None = None  # its first progress


class StageTimes(BaseModel):
    """The two stages' times of recent results (medians); None where no result measured it."""

    model_config = ConfigDict(extra="forbid")

    prepare_s: float | None = None  # tasks that went on to the model
    model_s: float | None = None
    # A check first (services/adapter/stages.py): measured, else a refusal's preparation.
    check_s: float | None = None
    model_share: float = 1.0  # of recent tasks, those that needed the model
    samples: int = 0
