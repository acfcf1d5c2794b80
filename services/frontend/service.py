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
from pathlib import Path

from loguru import logger

from services.broker.connection import ReplyListener, submit_task
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
from services.frontend.metrics import FrontendMetrics, Refusal, frontend_metrics
from services.frontend.queue_status import QueueMonitor, StudyDurations, read_queue_status
from services.frontend.sessions import (
    SessionRecord,
    SessionStore,
    SessionTask,
    is_session_token,
    new_session_token,
)
from services.frontend.task_view import (
    SubmitOutcome,
    TaskState,
    TaskView,
    session_summary,
    with_queue_places,
)
from services.frontend.uploads import content_sha256, is_zip_group, plan_uploads, safe_file_name

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


def frontend_instance_id(host: str, port: int) -> str:
    """Stable across restarts of the same frontend, distinct between frontends."""
    raw = f"{socket.gethostname()}-{port}"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")[:64] or f"frontend-{port}"


class FrontendService:
    def __init__(
        self,
        settings: Settings,
        *,
        instance_id: str | None = None,
        metrics: FrontendMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or frontend_metrics()
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
        self.queue = QueueMonitor(lambda: read_queue_status(settings.rabbitmq))
        self.durations = StudyDurations()

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
                self.metrics.result_received(message)
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
        """Each archive or NIfTI file becomes one task; loose DICOM files of one upload become
        one task together.

        Queued files are moved (not copied) into storage: no second copy of patient data
        stays in the upload folder. Refused files stay where they are, for a retry. An upload
        whose bytes this session already screened is not queued again: it is listed as a
        duplicate that shows the earlier result, and its file is deleted.
        """
        outcome = SubmitOutcome()
        plan = plan_uploads(files, self.settings)
        outcome.refused.extend(plan.refused)
        for reason in plan.refusals:
            self.metrics.refusal(reason)
        earlier = {
            task.content_sha256: task
            for task in self.session(token).tasks
            if task.content_sha256 and self._reusable(task)
        }
        groups: list[tuple[list[Path], str]] = []  # first uploads of their bytes
        repeats: list[tuple[list[Path], str]] = []  # the same bytes again in this upload
        for group in plan.groups:
            digest = content_sha256(group)
            if digest in earlier:
                outcome.duplicates.append(self._duplicate(group, earlier[digest]))
            elif any(digest == seen for _group, seen in groups):
                repeats.append((group, digest))
            else:
                groups.append((group, digest))
        if groups:
            self._queue_groups(groups, outcome)
        queued = {task.content_sha256: task for task in outcome.submitted}
        for group, digest in repeats:
            if digest in queued:
                outcome.duplicates.append(self._duplicate(group, queued[digest]))
        self.metrics.uploads.inc(len(outcome.submitted))
        self.metrics.duplicates.inc(len(outcome.duplicates))
        if outcome.submitted or outcome.duplicates:
            self.sessions.append(token, [*outcome.submitted, *outcome.duplicates])
        return outcome

    def queue_upload(self, path: Path) -> SubmitOutcome:
        """One upload without a browser session (the REST API): the UI's checks and queue
        limit, no search for duplicates (an integrator's resubmission is a new task)."""
        outcome = SubmitOutcome()
        plan = plan_uploads([path], self.settings)
        outcome.refused.extend(plan.refused)
        for reason in plan.refusals:
            self.metrics.refusal(reason)
        if plan.groups:
            self._queue_groups([(group, content_sha256(group)) for group in plan.groups], outcome)
        self.metrics.uploads.inc(len(outcome.submitted))
        return outcome

    def _queue_groups(self, groups: list[tuple[list[Path], str]], outcome: SubmitOutcome) -> None:
        """Queue every group, or none when the broker is unreachable or the queue is full."""
        try:
            status = read_queue_status(self.settings.rabbitmq)
        except Exception as error:  # noqa: BLE001 - an unreachable broker refuses, it does not crash
            logger.error("cannot reach RabbitMQ: {}", error)
            self.metrics.refusal(Refusal.BROKER_UNREACHABLE, len(groups))
            outcome.refused.append(
                "The processing queue is unreachable right now; please try again in a minute."
            )
            return
        limit = self.settings.rabbitmq.max_queue_depth
        if status.waiting + len(groups) > limit:
            self.metrics.refusal(Refusal.QUEUE_FULL, len(groups))
            outcome.refused.append(
                f"The processing queue is full ({status.waiting} studies waiting, limit {limit}): "
                "nothing was queued, please try again later."
            )
            return
        for position, (group, digest) in enumerate(groups):
            task = self._submit_group(group, outcome)
            if task is not None:
                task.content_sha256 = digest
                task.queued_behind = status.waiting + position
                outcome.submitted.append(task)

    def _reusable(self, task: SessionTask) -> bool:
        """An earlier upload whose result a duplicate may show: not one that failed as a
        whole task (a crash or a lost study is worth a second try)."""
        result = self.result(task.duplicate_of or task.task_id)
        return result is None or result.status is not TaskStatus.FAILED

    def _duplicate(self, group: list[Path], original: SessionTask) -> SessionTask:
        name = group[0].name if len(group) == 1 else f"{group[0].name} (+{len(group) - 1} files)"
        for path in group:  # the earlier copy is in storage already
            path.unlink(missing_ok=True)
        logger.info("duplicate upload of task {}: not queued", original.task_id)
        return SessionTask(
            task_id=uuid.uuid4().hex,
            original_filename=name,
            submitted_at=utc_now(),
            content_sha256=original.content_sha256,
            duplicate_of=original.duplicate_of or original.task_id,
        )

    def remove_task(self, token: str, task_id: str) -> bool:
        """Take a study off the session's worklist (its stored result stays)."""
        return is_session_token(token) and self.sessions.remove(token, task_id)

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
            self.metrics.refusal(Refusal.PUBLISH_FAILED)
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

    def task_view(self, task: SessionTask, *, original: SessionTask | None = None) -> TaskView:
        """The task's state; a duplicate shows the state of the task it duplicates."""
        task_id = task.duplicate_of or task.task_id
        result = self.result(task_id)
        if result is not None:
            failed = result.status is TaskStatus.FAILED
            if not failed:
                self.durations.add(result.task_id, result.seconds)
            return TaskView(
                task=task,
                state=TaskState.FAILED if failed else TaskState.DONE,
                fraction=1.0,
                message=result.error
                or f"{len(result.reports)} report(s) in {result.seconds:.1f} s",
                result=result,
                duplicate_of=original,
            )
        with self._lock:
            progress = self._progress.get(task_id)
        if progress is not None:
            return TaskView(
                task,
                TaskState.PROCESSING,
                progress.fraction,
                progress.message or progress.stage,
                stage=progress.stage,
                duplicate_of=original,
            )
        return TaskView(
            task, TaskState.QUEUED, 0.0, "waiting for a free worker", duplicate_of=original
        )

    def session_views(self, token: str) -> list[TaskView]:
        if not is_session_token(token):
            return []
        tasks = self.session(token).tasks
        by_id = {task.task_id: task for task in tasks}
        task_views = [
            self.task_view(task, original=by_id.get(task.duplicate_of or "")) for task in tasks
        ]
        return self._with_queue_places(task_views)

    def _with_queue_places(self, task_views: list[TaskView]) -> list[TaskView]:
        if not any(view.state is TaskState.QUEUED for view in task_views):
            return task_views  # no broker round trip when nothing waits
        return with_queue_places(task_views, self.queue.status(), self.durations.typical())

    def session_xlsx(self, token: str, task_views: list[TaskView] | None = None) -> Path | None:
        """One xlsx with every finished study of the session (the customer's table); a
        duplicate upload adds no row. Older files of the session are removed."""
        if task_views is None:
            task_views = self.session_views(token)
        reports = [
            report
            for view in task_views
            if view.result is not None and view.task.duplicate_of is None
            for report in view.result.reports
        ]
        if not reports:
            return None
        stamp = utc_now().strftime("%Y%m%d-%H%M%S-%f")
        folder = self.sessions.files_dir(token)
        path = write_xlsx(reports, folder / f"screening_{stamp}.xlsx")
        for older in folder.glob("screening_*.xlsx"):
            if older != path:
                older.unlink(missing_ok=True)
        return path

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
