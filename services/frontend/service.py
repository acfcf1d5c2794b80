"""What the web UI does, without the UI: queue uploads, follow their progress and results,
list every browser session's studies.

Uploads are checked by uploads.py and recorded per browser session by sessions.py;
results that arrived while the frontend was down are read from ``results/<task_id>.json``.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from loguru import logger

from services.broker.connection import ReplyListener, queued_task_count, submit_task
from services.broker.schemas import (
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    TaskStatus,
    utc_now,
)
from services.broker.storage import load_result, upload_dir
from services.core.config import Settings
from services.core.model_metadata import read_metadata
from services.core.reports import write_xlsx
from services.frontend.sessions import (
    SessionRecord,
    SessionStore,
    SessionTask,
    is_session_token,
    new_session_token,
)
from services.frontend.uploads import is_zip_group, plan_uploads, safe_file_name

__all__ = [
    "FrontendService",
    "SessionRecord",
    "SessionTask",
    "SubmitOutcome",
    "TaskState",
    "TaskView",
    "frontend_instance_id",
    "is_session_token",
    "safe_file_name",
    "session_summary",
]


class TaskState(str, Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


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


def frontend_instance_id(host: str, port: int) -> str:
    """Stable across restarts of the same frontend, distinct between frontends."""
    raw = f"{socket.gethostname()}-{port}"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")[:64] or f"frontend-{port}"


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
        self.sessions = SessionStore(self.storage_root)

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
        return new_session_token()

    def browser_state_secret(self) -> str:
        return self.sessions.browser_state_secret()

    def session(self, token: str) -> SessionRecord:
        return self.sessions.read(token)

    # -- uploads ---------------------------------------------------------------------------

    def submit_uploads(self, token: str, files: list[Path]) -> SubmitOutcome:
        """Each .zip becomes one task; loose DICOM files of one upload become one task together.

        Queued files are moved (not copied) into storage: no second copy of patient data
        stays in the upload folder. Refused files stay where they are, for a retry.
        """
        outcome = SubmitOutcome()
        plan = plan_uploads(files, self.settings)
        outcome.refused.extend(plan.refused)
        groups = plan.groups
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
            self.sessions.append(token, outcome.submitted)
        return outcome

    def _submit_group(self, group: list[Path], outcome: SubmitOutcome) -> SessionTask | None:
        task_id = uuid.uuid4().hex
        folder = upload_dir(self.storage_root, task_id)
        if is_zip_group(group):
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
        path = self.sessions.files_dir(token) / f"screening_{stamp}.xlsx"
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
