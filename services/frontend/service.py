"""What the web UI and the REST API do, without the UI: queue uploads, answer from the study
registry, record what the adapters report.

Each upload is recorded in the registry (door, sender, when) before its task is published;
the worklist and the REST API read the registry, so every viewer sees every study of every
door. Results and files stay where the adapters stored them (``results/<task_id>.json``);
the registry indexes them.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from services.broker.connection import submit_task
from services.broker.schemas import (
    Priority,
    QueueTopology,
    StudyResult,
    StudyTask,
    TaskStatus,
    utc_now,
)
from services.broker.storage import load_result, upload_dir
from services.core.access import Principal
from services.core.config import Settings
from services.core.model_metadata import read_metadata
from services.core.reports import write_xlsx
from services.frontend.metrics import FrontendMetrics, Refusal, frontend_metrics
from services.frontend.queue_status import (
    QueueMonitor,
    QueuePlace,
    in_line,
    pending_tasks,
    queue_places,
    read_queue_status,
)
from services.frontend.sessions import browser_state_secret, downloads_dir
from services.frontend.study_access import may_see, shown, viewer_name, visible
from services.frontend.task_view import SubmitOutcome
from services.frontend.uploads import content_sha256, is_zip_group, plan_uploads, safe_file_name
from services.registry import Door, Registry, StudyFilter, StudyRecord, Submission
from services.registry.recorder import RegistryRecorder
from services.registry.records import Priority as RecordedPriority

RESULT_CACHE_SECONDS = 300.0
RESULT_CACHE_ENTRIES = 2000
WORKLIST_ROWS = 500  # the newest studies the page lists (the REST API pages through all)
REGISTRY_UNAVAILABLE = (
    "The study registry cannot be reached right now: nothing was queued; please try again "
    "in a minute."
)


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
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or frontend_metrics()
        self.storage_root = settings.storage.root
        self.instance_id = instance_id or frontend_instance_id(
            settings.frontend.host, settings.frontend.port
        )
        self.topology = QueueTopology.from_settings(settings.rabbitmq)
        self.registry = registry or Registry.open(settings)  # refuses another schema
        self.queue = QueueMonitor(lambda: read_queue_status(settings.rabbitmq))
        self._results: dict[str, tuple[StudyResult, float]] = {}  # result, when read
        self._lock = threading.Lock()
        self._recorder: RegistryRecorder | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Record what the adapters report, when this frontend is the recorder."""
        if self.settings.registry.record_results:
            self._recorder = RegistryRecorder(
                self.settings, self.registry, on_result=self.metrics.result_received
            )
            self._recorder.start()
            if not self._recorder.consumer.ready.wait(30):
                logger.warning("registry queue not consumed yet: RabbitMQ unreachable?")

    def stop(self) -> None:
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None
        self.registry.close()

    def browser_state_secret(self) -> str:
        return browser_state_secret(self.storage_root)

    # -- uploads ---------------------------------------------------------------------------

    def submit_uploads(
        self,
        viewer: str,
        sender: str | None,
        files: list[Path],
        *,
        priority: Priority = Priority.ROUTINE,
        principal: Principal | None = None,
    ) -> SubmitOutcome:
        """Each archive or NIfTI file becomes one task; loose DICOM files of one upload become
        one task together. ``priority``: the lane its tasks travel in (the page's STAT
        toggle passes Priority.STAT); a STAT or urgent task is taken before routine ones.

        Queued files are moved (not copied) into storage: no second copy of patient data stays
        in the upload folder. Refused files stay where they are, for a retry. An upload whose
        bytes were screened before (by anyone) is not queued again: its earlier row is shown
        on the viewer's list, and the file is deleted. When ``principal`` may not open that
        row (a technologist, another's study), the message says so and names nobody.
        """
        outcome = SubmitOutcome()
        plan = plan_uploads(files, self.settings)
        outcome.refused.extend(plan.refused)
        for reason in plan.refusals:
            self.metrics.refusal(reason)
        groups: list[tuple[list[Path], str]] = []
        try:
            for group in plan.groups:
                digest = content_sha256(group)
                earlier = self.registry.earlier_upload(digest)
                if earlier is None and any(digest == seen for _group, seen in groups):
                    continue  # the same bytes twice in this upload: queued once
                if earlier is None:
                    groups.append((group, digest))
                    continue
                opens = principal is None or may_see(principal, earlier)
                self._screened_before(viewer, group, earlier, outcome, opens=opens)
        except SQLAlchemyError:
            outcome.refused.append(REGISTRY_UNAVAILABLE)
            return outcome
        if groups:
            self._queue_groups(groups, outcome, door=Door.UPLOAD, sender=sender, priority=priority)
        self.metrics.uploads.inc(len(outcome.submitted))
        self.metrics.duplicates.inc(len(outcome.screened_before) + len(outcome.screened_elsewhere))
        return outcome

    def _screened_before(
        self,
        viewer: str,
        group: list[Path],
        earlier: StudyRecord,
        outcome: SubmitOutcome,
        *,
        opens: bool,
    ) -> None:
        name = group[0].name if len(group) == 1 else f"{group[0].name} (+{len(group) - 1} files)"
        for path in group:  # the earlier copy is in storage already
            path.unlink(missing_ok=True)
        logger.info("upload of task {}'s bytes again: not queued", earlier.task_id)
        if not opens:  # someone else's study this viewer may not open
            outcome.screened_elsewhere.append(name)
            return
        for record in self.registry.task_studies(earlier.task_id):
            self.registry.unhide(record.id, viewer)
        outcome.screened_before.append((name, earlier))

    def queue_upload(
        self,
        path: Path,
        *,
        door: Door,
        sender: str | None,
        priority: Priority = Priority.ROUTINE,
    ) -> SubmitOutcome:
        """One upload without a browser (the REST API): the UI's checks and queue limit, no
        search for earlier uploads (an integrator's resubmission is a new task)."""
        outcome = SubmitOutcome()
        plan = plan_uploads([path], self.settings)
        outcome.refused.extend(plan.refused)
        for reason in plan.refusals:
            self.metrics.refusal(reason)
        if plan.groups:
            groups = [(group, content_sha256(group)) for group in plan.groups]
            self._queue_groups(groups, outcome, door=door, sender=sender, priority=priority)
        self.metrics.uploads.inc(len(outcome.submitted))
        return outcome

    def _queue_groups(
        self,
        groups: list[tuple[list[Path], str]],
        outcome: SubmitOutcome,
        *,
        door: Door,
        sender: str | None,
        priority: Priority,
    ) -> None:
        """Queue every group, or none when the broker is unreachable or the queue is full."""
        try:
            status = read_queue_status(self.settings.rabbitmq)
        except Exception as error:  # noqa: BLE001 - an unreachable broker refuses, it does not crash
            logger.error("cannot reach RabbitMQ: {}", type(error).__name__)
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
        for group, digest in groups:
            record = self._submit_group(
                group, digest, outcome, door=door, sender=sender, priority=priority
            )
            if record is not None:
                outcome.submitted.append(record)

    def _submit_group(
        self,
        group: list[Path],
        digest: str,
        outcome: SubmitOutcome,
        *,
        door: Door,
        sender: str | None,
        priority: Priority,
    ) -> StudyRecord | None:
        """Store the files, record the task, publish it; None (and a refusal) on failure."""
        task_id = uuid.uuid4().hex
        folder = upload_dir(self.storage_root, task_id)
        original, study_path = self._store_group(group, folder)
        now = utc_now()
        task = StudyTask(
            task_id=task_id,
            correlation_id=task_id,
            study_path=study_path.relative_to(self.storage_root).as_posix(),
            original_filename=original,
            submitted_at=now,
            submitted_by=self.instance_id,
            priority=priority,
        )
        submission = Submission(
            task_id=task_id,
            door=door,
            sender=sender,
            original_filename=original,
            study_path=task.study_path,
            content_sha256=digest,
            priority=RecordedPriority(priority.value),
            received_at=now,
            queued_at=now,
        )
        try:
            self.registry.record_submission(submission)
        except SQLAlchemyError as error:
            logger.error("could not record an upload: {}", type(error).__name__)
            shutil.rmtree(folder, ignore_errors=True)
            outcome.refused.append(f"{original}: {REGISTRY_UNAVAILABLE}")
            return None
        try:
            submit_task(self.settings.rabbitmq, task, name=f"frontend {self.instance_id}")
        except Exception as error:  # noqa: BLE001 - one failed upload must not lose the others
            logger.error("could not queue an upload: {}", type(error).__name__)
            self.metrics.refusal(Refusal.PUBLISH_FAILED)
            self._record_not_queued(task, type(error).__name__)
            outcome.refused.append(
                f"{original}: could not be queued ({type(error).__name__}); please try again"
            )
            return None
        logger.info("queued task {}", task_id)
        return self.registry.study(task_id)

    def _store_group(self, group: list[Path], folder: Path) -> tuple[str, Path]:
        """Move the upload into its task folder: (its name, the study path)."""
        if is_zip_group(group):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = folder / safe_file_name(group[0].name)
            shutil.move(group[0], target)
            return group[0].name, target
        original = (
            group[0].name if len(group) == 1 else f"{group[0].name} (+{len(group) - 1} files)"
        )
        study_path = folder / "dicom"
        study_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for index, path in enumerate(group):
            shutil.move(path, study_path / f"{index:05d}_{safe_file_name(path.name)}")
        return original, study_path

    def _record_not_queued(self, task: StudyTask, why: str) -> None:
        """The recorded task ends as failed (its row says why); its files are removed."""
        from services.adapter.delivery import failed_result

        reason = f"the study could not be queued ({why}); upload it again"
        try:
            self.registry.record_result(failed_result(task, reason, adapter_id="", attempt=0))
        except SQLAlchemyError:
            logger.error("task {} is recorded as queued but is not", task.task_id)
        shutil.rmtree(upload_dir(self.storage_root, task.task_id), ignore_errors=True)

    # -- what the worklist and the REST API read ----------------------------------------------

    def worklist_for(self, principal: Principal, browser_token: str | None) -> list[StudyRecord]:
        """The newest studies the principal may see, less the ones they hid, each as they may
        see it (identity only for a role allowed it)."""
        records = self.worklist_records(
            viewer_name(principal, browser_token), visible(StudyFilter(), principal)
        )
        return [shown(record, principal) for record in records]

    def worklist_records(self, viewer: str, wanted: StudyFilter | None = None) -> list[StudyRecord]:
        """The newest studies (of ``wanted``), less the ones this viewer hid."""
        wanted = (wanted or StudyFilter()).model_copy(update={"hidden_for": viewer})
        return self.registry.list_studies(wanted, limit=WORKLIST_ROWS).items

    def queue_places(self) -> dict[str, QueuePlace]:
        """Each queued study's place in the order the adapters take them and its expected
        wait, re-estimated on every call from the queue as it is now (the worklist's
        refresh and the REST API read it; services/frontend/wait_estimate.py)."""
        rows = self.registry.pipeline_tasks()
        if not any(in_line(row.state, row.stage) for row in rows):
            return {}  # no broker round trip when nothing waits
        tasks = pending_tasks(rows, self.storage_root, utc_now())
        return queue_places(
            tasks,
            self.queue.status(),
            self.registry.stage_times(),
            check_first=self.settings.adapter.check_first,
            max_checked_waiting=self.settings.adapter.check_first_max_waiting,
        )

    def hide(self, viewer: str, task_id: str, report_index: int) -> bool:
        """Take a study off this viewer's worklist (everyone else still sees it)."""
        record = self.registry.study(task_id, report_index)
        return record is not None and self.registry.hide(record.id, viewer)

    def result(self, task_id: str) -> StudyResult | None:
        """The stored result of a finished task. Cached for a few minutes: a result changes
        only when it is deleted or purged (then this frontend forgets it at once, the others
        within RESULT_CACHE_SECONDS)."""
        with self._lock:
            cached = self._results.get(task_id)
        if cached is not None and time.monotonic() - cached[1] < RESULT_CACHE_SECONDS:
            return cached[0]
        stored = load_result(self.storage_root, task_id)
        if stored is not None:
            with self._lock:
                if len(self._results) > RESULT_CACHE_ENTRIES:
                    self._results.clear()
                self._results[task_id] = (stored, time.monotonic())
        return stored

    def forget_result(self, task_id: str) -> None:
        with self._lock:
            self._results.pop(task_id, None)

    def xlsx_for(self, viewer: str, records: list[StudyRecord]) -> Path | None:
        """One xlsx with every finished study of the list (the customer's table). Older files
        of the viewer are removed."""
        reports = []
        for task_id in dict.fromkeys(record.task_id for record in records if record.state.final):
            result = self.result(task_id)
            if result is not None:
                reports.extend(result.reports)
        if not reports:
            return None
        folder = downloads_dir(self.storage_root, viewer)
        stamp = utc_now().strftime("%Y%m%d-%H%M%S-%f")
        path = write_xlsx(reports, folder / f"screening_{stamp}.xlsx")
        for older in folder.glob("screening_*.xlsx"):
            if older != path:
                older.unlink(missing_ok=True)
        return path

    def demo_weights_in_use(self, records: list[StudyRecord] | None = None) -> bool:
        """True if the served model is the demo set, or any listed result came from it."""
        if records and any(record.demo_weights for record in records):
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

    def failed(self, task_id: str) -> bool:
        result = self.result(task_id)
        return result is not None and result.status is TaskStatus.FAILED
