"""What the web UI does, without the UI: accept uploads, queue tasks, follow their progress,
keep every browser session's studies on disk.

Storage (next to the adapters' ``uploads/`` and ``results/``)::

    <root>/sessions/<session token>.json     the session's tasks, in submission order
    <root>/sessions/<session token>/         files made for that session (its xlsx)
    <root>/frontend/browser_state_secret     key of the browser-side session token

A browser keeps only its random session token (gr.BrowserState, localStorage); the rest is
on the server, so a page reload or a frontend restart shows the same studies, and results
that arrived while the frontend was down are read from ``results/<task_id>.json``.
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from services.broker.connection import ReplyListener, queued_task_count, submit_task
from services.broker.schemas import (
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    TaskStatus,
    utc_now,
)
from services.broker.storage import load_result, upload_dir, write_atomically
from services.core.config import Settings
from services.core.model_metadata import read_metadata
from services.core.reports import write_xlsx

SESSIONS_DIR = "sessions"
FRONTEND_DIR = "frontend"
ZIP_SUFFIX = ".zip"
_SESSION_TOKEN = re.compile(r"^[0-9a-f]{32}$")


class TaskState(str, Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class SessionTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str
    original_filename: str
    submitted_at: datetime


class SessionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[SessionTask] = Field(default_factory=list)


@dataclass(frozen=True)
class TaskView:
    """One uploaded study as the UI shows it."""

    task: SessionTask
    state: TaskState
    fraction: float  # 0..1
    message: str
    result: StudyResult | None = None


@dataclass
class SubmitOutcome:
    submitted: list[SessionTask] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # one line per refused file, with the reason

    @property
    def message(self) -> str:
        lines = []
        if self.submitted:
            names = ", ".join(task.original_filename for task in self.submitted)
            lines.append(
                f"Queued {len(self.submitted)} stud{'y' if len(self.submitted) == 1 else 'ies'}: {names}"
            )
        lines.extend(self.refused)
        return "\n\n".join(lines) or "Nothing to submit: choose .zip or .dcm files first."


def safe_file_name(name: str) -> str:
    """A file name without folders or odd characters (it becomes part of a storage path)."""
    base = Path(name.replace("\\", "/")).name
    cleaned = re.sub(r"[^\w.\-]+", "_", base).strip("._")
    return cleaned[:120] or "upload"


def frontend_instance_id(host: str, port: int) -> str:
    """Stable across restarts of the same frontend, distinct between frontends."""
    raw = f"{socket.gethostname()}-{port}"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")[:64] or f"frontend-{port}"


def human_bytes(count: int) -> str:
    if count >= 1024**3:
        return f"{count / 1024**3:.1f} GB"
    return f"{count / 1024**2:.1f} MB"


def declared_unpacked_bytes(path: Path) -> int | None:
    """The unpacked size a zip declares for its members (its central directory, read
    without unpacking); None if it is not a readable zip -- the worker then reports why."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def is_session_token(value: object) -> bool:
    return isinstance(value, str) and bool(_SESSION_TOKEN.match(value))


class FrontendService:
    def __init__(self, settings: Settings, *, instance_id: str | None = None) -> None:
        self.settings = settings
        self.storage_root = settings.storage.root
        self.instance_id = instance_id or frontend_instance_id(
            settings.frontend.host, settings.frontend.port
        )
        self.topology = QueueTopology.from_settings(settings.rabbitmq)
        self.reply_queue = self.topology.reply_queue(self.instance_id)
        self._lock = threading.Lock()
        self._progress: dict[str, StudyProgress] = {}
        self._results: dict[str, StudyResult] = {}
        self._listener: ReplyListener | None = None
        (self.storage_root / SESSIONS_DIR).mkdir(parents=True, exist_ok=True)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start following this frontend's reply queue (before any task names it)."""
        self._listener = ReplyListener(
            self.settings.rabbitmq, self.instance_id, self._on_reply, name="frontend-replies"
        )
        self._listener.start()
        if not self._listener.ready.wait(30):
            logger.warning(
                "reply queue not ready yet: RabbitMQ unreachable? results come from storage"
            )

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def _on_reply(self, message: StudyResult | StudyProgress) -> None:
        with self._lock:
            if isinstance(message, StudyResult):
                self._results[message.task_id] = message
                self._progress.pop(message.task_id, None)
            elif message.task_id not in self._results:
                self._progress[message.task_id] = message

    # -- sessions --------------------------------------------------------------------------

    @staticmethod
    def new_session_token() -> str:
        return uuid.uuid4().hex

    def browser_state_secret(self) -> str:
        """The key that encrypts the session token in the browser; kept so tokens survive restarts."""
        path = self.storage_root / FRONTEND_DIR / "browser_state_secret"
        if not path.exists():
            write_atomically(path, secrets.token_urlsafe(32).encode())
            path.chmod(0o600)
        return path.read_text().strip()

    def _session_path(self, token: str) -> Path:
        if not is_session_token(token):
            raise ValueError("invalid session token")
        return self.storage_root / SESSIONS_DIR / f"{token}.json"

    def session(self, token: str) -> SessionRecord:
        try:
            return SessionRecord.model_validate_json(self._session_path(token).read_bytes())
        except (FileNotFoundError, ValueError):
            return SessionRecord()

    def _append_to_session(self, token: str, tasks: list[SessionTask]) -> None:
        with self._lock:
            record = self.session(token)
            record.tasks.extend(tasks)
            write_atomically(self._session_path(token), record.model_dump_json(indent=2).encode())

    # -- uploads ---------------------------------------------------------------------------

    def submit_uploads(self, token: str, files: list[Path]) -> SubmitOutcome:
        """Each .zip becomes one task; loose DICOM files of one upload become one task together.

        Queued files are moved (not copied) into storage: no second copy of patient data
        stays in the upload folder. Refused files stay where they are, for a retry.
        """
        outcome = SubmitOutcome()
        limit_bytes = self.settings.frontend.max_upload_mb * 1024 * 1024
        unpacked_limit = self.settings.intake.max_uncompressed_bytes
        zips: list[Path] = []
        loose: list[Path] = []
        for path in files:
            path = Path(path)
            size = path.stat().st_size if path.exists() else 0
            name = path.name
            if not path.is_file():
                outcome.refused.append(f"{name}: the upload did not arrive, please try again")
            elif size > limit_bytes:
                outcome.refused.append(
                    f"{name}: {size / 1024**2:.0f} MB is over the {self.settings.frontend.max_upload_mb} MB limit"
                )
            elif name.lower().endswith(ZIP_SUFFIX):
                unpacked = declared_unpacked_bytes(path)
                if unpacked is not None and unpacked > unpacked_limit:
                    # Refused here, not after a worker unpacked gigabytes: the adapter's
                    # intake would refuse it anyway (same setting).
                    outcome.refused.append(
                        f"{name}: {human_bytes(unpacked)} unpacked is over the "
                        f"{human_bytes(unpacked_limit)} limit per study "
                        "(intake.max_uncompressed_bytes)"
                    )
                else:
                    zips.append(path)
            else:
                loose.append(path)
        loose_bytes = sum(path.stat().st_size for path in loose)
        if loose_bytes > unpacked_limit:
            outcome.refused.append(
                f"{len(loose)} DICOM files: {human_bytes(loose_bytes)} together is over the "
                f"{human_bytes(unpacked_limit)} limit per study (intake.max_uncompressed_bytes)"
            )
            loose = []
        groups: list[list[Path]] = [[path] for path in zips] + ([loose] if loose else [])
        if not groups:
            return outcome
        try:
            waiting = queued_task_count(self.settings.rabbitmq)
        except Exception as error:  # noqa: BLE001 - an unreachable broker refuses, it does not crash
            logger.error("cannot reach RabbitMQ: {}", error)
            outcome.refused.append(
                "The processing queue is unreachable right now; please try again in a minute."
            )
            return outcome
        limit = self.settings.rabbitmq.max_queue_depth
        if waiting + len(groups) > limit:
            outcome.refused.append(
                f"The processing queue is full ({waiting} studies waiting, limit {limit}): "
                "nothing was queued, please try again later."
            )
            return outcome
        for group in groups:
            task = self._submit_group(group, outcome)
            if task is not None:
                outcome.submitted.append(task)
        if outcome.submitted:
            self._append_to_session(token, outcome.submitted)
        return outcome

    def _submit_group(self, group: list[Path], outcome: SubmitOutcome) -> SessionTask | None:
        task_id = uuid.uuid4().hex
        folder = upload_dir(self.storage_root, task_id)
        if len(group) == 1 and group[0].name.lower().endswith(ZIP_SUFFIX):
            original = group[0].name
            target = folder / safe_file_name(original)
            study_path = target
        else:
            original = (
                group[0].name if len(group) == 1 else f"{group[0].name} (+{len(group) - 1} files)"
            )
            study_path = folder / "dicom"
            target = None
        try:
            if target is not None:
                folder.mkdir(parents=True, exist_ok=True)
                shutil.move(group[0], target)
            else:
                study_path.mkdir(parents=True, exist_ok=True)
                for index, path in enumerate(group):
                    shutil.move(path, study_path / f"{index:05d}_{safe_file_name(path.name)}")
            task = StudyTask(
                task_id=task_id,
                correlation_id=task_id,
                study_path=study_path.relative_to(self.storage_root).as_posix(),
                original_filename=original,
                reply_to=self.reply_queue,
                submitted_by=self.instance_id,
            )
            submit_task(self.settings.rabbitmq, task, name=f"frontend {self.instance_id}")
        except Exception as error:  # noqa: BLE001 - one failed upload must not lose the others
            logger.error("could not queue an upload: {}", type(error).__name__)
            shutil.rmtree(folder, ignore_errors=True)
            outcome.refused.append(
                f"{original}: could not be queued ({type(error).__name__}); please try again"
            )
            return None
        logger.info("queued task {}", task_id)
        return SessionTask(
            task_id=task_id, original_filename=original, submitted_at=task.submitted_at
        )

    # -- status ----------------------------------------------------------------------------

    def result(self, task_id: str) -> StudyResult | None:
        with self._lock:
            cached = self._results.get(task_id)
        if cached is not None:
            return cached
        stored = load_result(self.storage_root, task_id)
        if stored is not None:
            with self._lock:
                self._results[task_id] = stored
        return stored

    def task_view(self, task: SessionTask) -> TaskView:
        result = self.result(task.task_id)
        if result is not None:
            failed = result.status is TaskStatus.FAILED
            return TaskView(
                task=task,
                state=TaskState.FAILED if failed else TaskState.DONE,
                fraction=1.0,
                message=result.error
                or f"{len(result.reports)} report(s) in {result.seconds:.1f} s",
                result=result,
            )
        with self._lock:
            progress = self._progress.get(task.task_id)
        if progress is not None:
            return TaskView(
                task, TaskState.PROCESSING, progress.fraction, progress.message or progress.stage
            )
        return TaskView(task, TaskState.QUEUED, 0.0, "waiting for a free worker")

    def session_views(self, token: str) -> list[TaskView]:
        if not is_session_token(token):
            return []
        return [self.task_view(task) for task in self.session(token).tasks]

    def session_xlsx(self, token: str) -> Path | None:
        """One xlsx with every finished study of the session (the customer's table)."""
        reports = [
            report
            for view in self.session_views(token)
            if view.result is not None
            for report in view.result.reports
        ]
        if not reports:
            return None
        stamp = utc_now().strftime("%Y%m%d-%H%M%S")
        path = self.storage_root / SESSIONS_DIR / token / f"screening_{stamp}.xlsx"
        return write_xlsx(reports, path)

    def demo_weights_in_use(self, views: list[TaskView] | None = None) -> bool:
        """True if the served model is the demo set, or any shown result came from it."""
        if views and any(
            report.demo_weights for view in views if view.result for report in view.result.reports
        ):
            return True
        try:
            return read_metadata(self.settings.inference.model_repository).demo
        except (OSError, ValueError):
            return False

    def file_path(self, relative: str) -> Path | None:
        """A result file on disk, refusing anything outside the storage root."""
        root = self.storage_root.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path


def session_summary(views: list[TaskView]) -> str:
    counts = {state: sum(view.state is state for view in views) for state in TaskState}
    parts = [f"{counts[state]} {state.value}" for state in TaskState if counts[state]]
    return ", ".join(parts) if parts else "no studies yet"
