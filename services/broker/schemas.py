"""Messages and queue topology of the stack: the contract between frontends, adapters and
any other system that submits studies (docs/ARCHITECTURE.md).

Everything that travels through RabbitMQ is one of the pydantic models below, serialised
as JSON (``content_type=application/json``) with the model's name in the AMQP ``type``
property and ``schema_version`` in the body. Studies travel **by reference**: a task names a
file or folder relative to the shared storage root, never the bytes themselves.

Topology (``<p>`` is ``rabbitmq.queue_prefix``, ``cts`` by default)::

    publisher --(routing key "study", "study.urgent", "study.stat")--> exchange <p>.tasks
        (direct, durable) --> the task lanes <p>.tasks, <p>.tasks.urgent, <p>.tasks.stat
        (quorum, x-delivery-limit, dead-letters to <p>.dead-letter)
            --> adapters' preparation stage (basic.get, most urgent lane first)
    preparation stage, while other tasks wait (check first) --(default exchange)--> the
        preparation lanes <p>.prepare, <p>.prepare.urgent, <p>.prepare.stat (quorum, same
        arguments): a StudyTask that passed its cheap checks and waits for its full
        preparation; the stage takes each priority's task lane before its preparation lane
    preparation stage --(default exchange)--> the model lanes <p>.model, <p>.model.urgent,
        <p>.model.stat (quorum, same arguments): a ModelTask, the prepared study by reference
            --> adapters' model stage (basic.get, most urgent lane first)
    queues <p>.adapters.prepare, <p>.adapters.model: never hold a message; every adapter's
        stage consumes one, so its consumer count is the number of adapters alive per stage
    exchange <p>.dead-letter (fanout) --> queue <p>.tasks.dead-letter (classic, durable)
    adapter --(default exchange, routing key = task.reply_to)--> reply queue of the submitter
        (any durable queue the submitter declared)
    adapter --(default exchange, routing key <p>.registry)--> queue <p>.registry (quorum):
        every progress and result, recorded in the study registry (services/registry)

At least once: a result is stored once per task (the first stored wins), and every copy of
it that is sent is that stored result (byte for byte while the adapters run one version).
Once the registry's queue and the reply queue confirmed it, the adapter writes a delivered
mark (``results/<task_id>/.delivered``) and acks; a redelivered task with the mark is acked
without sending anything. Without the mark it is sent again: an adapter killed between
the confirm and the mark cannot be told from one killed just before the publish, and a
confirm lost in a broker restart or a cut link leaves no mark either. The registry keeps
one result per task id (services/registry/writes.py); any other submitter keeps the first
result of each task id and drops a copy that comes again.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.broker.errors import MessageError
from services.core.schemas import StudyReport

BROKER_SCHEMA_VERSION: Final = 1
CONTENT_TYPE = "application/json"
TASK_ROUTING_KEY = "study"  # routine; the other lanes: "study.<priority>"


def task_routing_key(priority: Priority) -> str:
    return (
        TASK_ROUTING_KEY if priority is Priority.ROUTINE else f"{TASK_ROUTING_KEY}.{priority.value}"
    )


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def new_task_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A consumer refuses a version it does not know instead of guessing what fields mean.
    schema_version: Literal[1] = BROKER_SCHEMA_VERSION


def check_safe_id(value: str) -> str:
    # Task ids become file and folder names under storage/: no separators, no dots.
    if not _SAFE_ID.match(value):
        raise ValueError("must be 1-64 characters of letters, digits, '_' or '-'")
    return value


class Priority(str, Enum):
    """How soon a study must be screened; adapters take the more urgent lanes first."""

    ROUTINE = "routine"
    URGENT = "urgent"
    STAT = "stat"


# The adapter's two stages (services/adapter/stages.py): each consumes its own lanes.
PREPARE_STAGE: Final = "prepare"
MODEL_STAGE: Final = "model"
STAGES: Final = (PREPARE_STAGE, MODEL_STAGE)

# Most urgent first: the order in which a stage looks at its lanes.
PRIORITY_ORDER: Final = (Priority.STAT, Priority.URGENT, Priority.ROUTINE)

# The progress stage of a task that passed its cheap checks and waits in a preparation lane.
WAITING_FOR_PREPARATION: Final = "waiting_for_preparation"


class StudyTask(_Message):
    """A request to screen one study (a zip, a folder of DICOM files or one DICOM file)."""

    task_id: str = Field(default_factory=new_task_id)
    # Echoed in every progress and result message; the AMQP correlation_id carries it too.
    correlation_id: str | None = None
    # POSIX path relative to the storage root, e.g. "uploads/<task_id>/study.zip".
    study_path: str
    original_filename: str
    submitted_at: datetime = Field(default_factory=utc_now)
    # Queue that receives progress and the result (default exchange); None: result only stored.
    reply_to: str | None = None
    submitted_by: str | None = None  # free text: frontend id, system name
    # Which lane the task travels in; a lane is a queue of its own (QueueTopology).
    priority: Priority = Priority.ROUTINE
    # Images of a study that arrived after its earlier part was screened (the DICOM
    # listener's part 2, 3...): the result covers them only. Optional, so a task without it
    # still reads; the schema version stays 1.
    late_instances: bool = False

    @field_validator("task_id")
    @classmethod
    def _safe_task_id(cls, value: str) -> str:
        return check_safe_id(value)

    @field_validator("study_path")
    @classmethod
    def _relative_inside_storage(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError("study_path must be a relative path inside the storage root")
        return path.as_posix()

    @property
    def reply_correlation_id(self) -> str:
        return self.correlation_id or self.task_id

    def resolve_study_path(self, storage_root: Path) -> Path:
        """The study on this machine; refuses anything that escapes the storage root."""
        root = Path(storage_root).resolve()
        resolved = (root / self.study_path).resolve()
        if not resolved.is_relative_to(root):
            raise ValueError(f"study_path {self.study_path!r} leaves the storage root")
        return resolved


class ModelTask(_Message):
    """A prepared task handed from the preparation stage to the model stage: the study's
    reports so far, its model inputs and SR evidence are files under ``prepared_path``
    (services/adapter/handoff.py), never in the message."""

    task: StudyTask
    prepared_path: str  # relative to the storage root: prepared/<task_id>
    prepared_by: str = ""  # adapter id
    prepared_at: datetime = Field(default_factory=utc_now)
    # The preparation's delivery number: a result says how often its task was handed out in
    # the stage that needed most deliveries (an adapter killed while preparing shows as 2).
    prepare_attempt: int = Field(default=1, ge=1)

    @field_validator("prepared_path")
    @classmethod
    def _relative_prepared(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError("prepared_path must be a relative path inside the storage root")
        return path.as_posix()


class StudyProgress(_Message):
    """Where an adapter is with a task; transient (not persisted), for the UI only."""

    task_id: str
    correlation_id: str | None = None
    stage: str  # "started", a pipeline stage name, "retrying"
    fraction: float = Field(ge=0.0, le=1.0)
    message: str = ""
    adapter_id: str = ""
    at: datetime = Field(default_factory=utc_now)
    # The task's lane: a task no door recorded (published by another system) is registered
    # from its first progress, with its priority. Optional: the schema version stays 1.
    priority: Priority | None = None


class TaskStatus(str, Enum):
    # The pipeline ran: reports hold one row per study found (a study may still be a Failure
    # row, e.g. "not a chest CT").
    COMPLETED = "completed"
    # The task could not be processed (unreadable task, crash, too many deliveries): reports
    # hold one Failure row with the reason, so the customer's table still gets a row.
    FAILED = "failed"


class ResultFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str  # "xlsx" | "warnings" | "json" | "preview"
    path: str  # relative to the storage root
    description: str = ""


class StudyResult(_Message):
    """The outcome of one task, sent to ``reply_to`` and stored as
    ``storage/results/<task_id>.json`` (the same document)."""

    task_id: str
    correlation_id: str | None = None
    status: TaskStatus
    reports: list[StudyReport] = Field(default_factory=list)
    files: list[ResultFile] = Field(default_factory=list)
    error: str | None = None
    original_filename: str = ""
    study_path: str = ""
    adapter_id: str = ""
    attempt: int = 1  # which delivery of the task produced this result
    started_at: datetime | None = None
    finished_at: datetime = Field(default_factory=utc_now)
    seconds: float = 0.0  # wall time of the task in the adapter
    # The two stages' own times (services/adapter/stages.py), for the wait estimates
    # (services/frontend/wait_estimate.py); model_seconds is None when no study needed the model.
    # Optional, so an older result still reads; the schema version stays 1.
    prepare_seconds: float | None = None
    model_seconds: float | None = None
    # Of prepare_seconds, the check first of a task taken while others waited (None: it was
    # prepared at once).
    check_seconds: float | None = None

    def files_of_kind(self, kind: str) -> list[ResultFile]:
        return [item for item in self.files if item.kind == kind]


MESSAGE_TYPES: dict[str, type[_Message]] = {
    "StudyTask": StudyTask,
    "ModelTask": ModelTask,
    "StudyProgress": StudyProgress,
    "StudyResult": StudyResult,
}


def encode_message(message: _Message) -> bytes:
    return message.model_dump_json().encode("utf-8")


def decode_message(
    body: bytes, expected: type[_Message] | None = None, type_name: str | None = None
) -> Any:
    """Parse a body into the model named by ``type_name`` (the AMQP type property) or ``expected``."""
    model = expected
    if type_name is not None:
        model = MESSAGE_TYPES.get(type_name)
        if model is None:
            raise MessageError(f"unknown message type {type_name!r}")
        if expected is not None and model is not expected:
            raise MessageError(f"expected a {expected.__name__}, got a {type_name}")
    if model is None:
        raise MessageError("the message type is unknown: set the AMQP 'type' property")
    try:
        return model.model_validate_json(body)
    except ValueError as error:
        raise MessageError(f"invalid {model.__name__}: {error}") from error


class QueueTopology(BaseModel):
    """Names and arguments of every exchange and queue; one prefix keeps stacks apart."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(default="cts", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # An adapter processes a task at most this many times; the next delivery is given up
    # (Failure result, dead-lettered). The broker's x-delivery-limit backs this up.
    max_deliveries: int = Field(default=3, ge=1)
    # Reply queues of frontends that never come back disappear after this idle time.
    reply_queue_expires_ms: int = 7 * 24 * 3600 * 1000

    @property
    def task_exchange(self) -> str:
        return f"{self.prefix}.tasks"

    @property
    def task_queue(self) -> str:
        """The routine preparation lane (the name every earlier publisher used)."""
        return f"{self.prefix}.tasks"

    def task_lane(self, priority: Priority) -> str:
        if priority is Priority.ROUTINE:
            return self.task_queue
        return f"{self.task_queue}.{priority.value}"

    def model_lane(self, priority: Priority) -> str:
        base = f"{self.prefix}.model"
        return base if priority is Priority.ROUTINE else f"{base}.{priority.value}"

    def preparation_lane(self, priority: Priority) -> str:
        """Where a checked task waits for its full preparation (services/adapter/stages.py)."""
        base = f"{self.prefix}.prepare"
        return base if priority is Priority.ROUTINE else f"{base}.{priority.value}"

    def task_lanes(self) -> list[str]:
        """The lanes the doors publish to, most urgent first."""
        return [self.task_lane(priority) for priority in PRIORITY_ORDER]

    def preparation_lanes(self) -> list[str]:
        """The checked tasks' lanes, most urgent first."""
        return [self.preparation_lane(priority) for priority in PRIORITY_ORDER]

    def preparation_stage_lanes(self) -> list[str]:
        """What the preparation stage takes, in order: per priority, most urgent first, the
        new tasks (their cheap checks) before the checked ones (their full preparation)."""
        return [
            lane
            for priority in PRIORITY_ORDER
            for lane in (self.task_lane(priority), self.preparation_lane(priority))
        ]

    def waiting_lanes(self) -> list[str]:
        """Every lane whose tasks are not prepared yet."""
        return [*self.task_lanes(), *self.preparation_lanes()]

    def model_lanes(self) -> list[str]:
        """The model lanes, most urgent first."""
        return [self.model_lane(priority) for priority in PRIORITY_ORDER]

    def presence_queue(self, stage: str) -> str:
        """Consumed (never filled) by each adapter running ``stage``: adapters alive."""
        return f"{self.prefix}.adapters.{check_safe_id(stage)}"

    def doorbell_queue(self, stage: str) -> str:
        """Consumed by each adapter's ``stage`` while it has room for a study; never holds a
        message (services/broker/connection.py, ring_doorbell)."""
        return f"{self.prefix}.doorbell.{check_safe_id(stage)}"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dead-letter"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.tasks.dead-letter"

    @property
    def registry_queue(self) -> str:
        """What the adapters report (progress, results) for the study registry to record."""
        return f"{self.prefix}.registry"

    def reply_queue(self, frontend_id: str) -> str:
        return f"{self.prefix}.replies.{check_safe_id(frontend_id)}"

    def task_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            # Deliveries beyond the adapter's own limit: the adapter died on every one of them.
            "x-delivery-limit": self.max_deliveries,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        }

    def registry_queue_arguments(self) -> dict[str, Any]:
        # Quorum: a result on its way to the registry survives the loss of a broker node.
        return {"x-queue-type": "quorum"}

    def reply_queue_arguments(self) -> dict[str, Any]:
        return {"x-expires": self.reply_queue_expires_ms}

    @classmethod
    def from_settings(cls, rabbitmq: Any) -> QueueTopology:
        return cls(prefix=rabbitmq.queue_prefix, max_deliveries=rabbitmq.max_deliveries)
