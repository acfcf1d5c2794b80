"""What an adapter does with one task, apart from RabbitMQ: run the pipeline, write the files,
build the StudyResult. Runs on the adapter's worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from loguru import logger

from services.adapter.delivery import failed_result
from services.adapter.previews import write_previews
from services.broker.schemas import ResultFile, StudyResult, StudyTask, TaskStatus, utc_now
from services.broker.storage import relative_to_storage, result_files_dir
from services.core.config import Settings
from services.core.errors import ErrorPolicy, StudyNotFound, policy_of
from services.core.inference.base import InferenceBackend
from services.core.pipeline import PipelineEvents, PreparedStudy, process_input
from services.core.reports import write_reports
from services.core.schemas import StudyReport

ProgressCallback = Callable[[str, float, str], None]  # stage, fraction 0..1, message
PREVIEWS_DIR = "previews"
# Where each stage starts within one study's share of the progress bar.
STAGE_PROGRESS = {
    "selection": 0.0,
    "volume": 0.1,
    "chest_check": 0.3,
    "preprocessing": 0.4,
    "inference": 0.5,
    "findings": 0.95,
}
STAGE_MESSAGES = {
    "intake": "unpacking the upload",
    "headers": "reading the DICOM headers",
    "selection": "choosing the series",
    "volume": "reading the images",
    "chest_check": "checking that it is a chest CT",
    "preprocessing": "preparing the model input",
    "inference": "running the model",
    "findings": "reading the model's answer",
}
READING_SHARE = 0.1  # intake and headers, before the studies are known
WRITING_FRACTION = 0.9


def study_progress(stage: str, study_index: int, n_studies: int) -> float:
    """Overall fraction 0..1 when ``stage`` of study ``study_index`` (of n) begins."""
    if n_studies <= 0:
        return READING_SHARE * (0.5 if stage == "headers" else 0.0)
    within = STAGE_PROGRESS.get(stage, 0.0)
    share = (WRITING_FRACTION - READING_SHARE) / n_studies
    return READING_SHARE + share * (study_index + within)


class TaskEvents(PipelineEvents):
    """Progress messages for the submitter, and preview images drawn while the model runs."""

    def __init__(self, progress: ProgressCallback | None, previews_dir: Path) -> None:
        self._progress = progress
        self._previews_dir = previews_dir
        # Previews are drawn on a second thread while the model request is in flight: the
        # adapter has nothing else to do then, so they add nothing to the study's latency.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="previews")
        self._pending: list[Future[list[Path]]] = []

    def report(self, stage: str, fraction: float, message: str) -> None:
        if self._progress is not None:
            self._progress(stage, fraction, message)

    def stage_started(self, stage: str, *, study_index: int, n_studies: int) -> None:
        if stage == "inference":
            return  # announced by model_input_ready, once the previews are on their way
        message = STAGE_MESSAGES.get(stage, stage)
        if n_studies > 1:
            message = f"study {study_index + 1} of {n_studies}: {message}"
        self.report(stage, study_progress(stage, study_index, n_studies), message)

    def model_input_ready(self, prepared: PreparedStudy) -> None:
        number = prepared.index + 1
        assert prepared.model_input is not None
        self._pending.append(
            self._writer.submit(
                write_previews, prepared.model_input, self._previews_dir, f"study{number}"
            )
        )
        self.report(
            "inference",
            study_progress("inference", prepared.index, prepared.n_studies),
            f"running the model on study {number}",
        )

    def study_finished(self, report: StudyReport, *, study_index: int, n_studies: int) -> None:
        fraction = study_progress("selection", study_index + 1, max(n_studies, 1))
        self.report(
            "study finished", fraction, f"study {study_index + 1}: {report.processing_status.value}"
        )

    def finish(self) -> list[Path]:
        """Wait for the previews; the files written (a failed preview is only logged)."""
        self._writer.shutdown(wait=True)
        written: list[Path] = []
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                written.extend(future.result())
            except OSError as error:  # previews are a convenience, never a reason to fail
                logger.warning("previews not written: {}", error)
        return written


def _result_files(
    storage_root: Path, output_dir: Path, reports: list[StudyReport]
) -> list[ResultFile]:
    written = write_reports(reports, output_dir)
    files = [
        ResultFile(
            kind="xlsx",
            path=relative_to_storage(storage_root, written.xlsx),
            description="the report table",
        ),
        ResultFile(
            kind="warnings",
            path=relative_to_storage(storage_root, written.warnings),
            description="warnings and errors per study",
        ),
    ]
    files.extend(
        ResultFile(kind="json", path=relative_to_storage(storage_root, path), description="report")
        for path in written.json_files
    )
    return files


def run_task(
    task: StudyTask,
    *,
    backend: InferenceBackend,
    settings: Settings,
    adapter_id: str,
    attempt: int,
    progress: ProgressCallback | None = None,
) -> StudyResult:
    """Screen the task's study and write its files; errors of the study become a FAILED result.

    Errors whose policy is not FAILURE_ROW propagate (services/core/errors.py): the study
    may be fine, and the delivery rules give the task back (services/adapter/delivery.py).
    """
    storage_root = settings.storage.root
    output_dir = result_files_dir(storage_root, task.task_id)
    started = utc_now()
    clock = time.perf_counter()
    events = TaskEvents(progress, output_dir / PREVIEWS_DIR)
    try:
        study_path = task.resolve_study_path(storage_root)
        if not study_path.exists():
            raise StudyNotFound(
                f"the study {task.study_path!r} is not in the shared storage "
                "(was it uploaded to the same storage volume?)"
            )
        reports = process_input(
            study_path,
            backend=backend,
            settings=settings,
            display_name=task.original_filename or None,
            events=events,
        )
        if not reports:
            raise RuntimeError("the pipeline returned no report")
        events.report("writing", WRITING_FRACTION, "writing the report files")
        files = _result_files(storage_root, output_dir, reports)
        files.extend(
            ResultFile(kind="preview", path=relative_to_storage(storage_root, path))
            for path in events.finish()
        )
    except Exception as error:
        if policy_of(error) is not ErrorPolicy.FAILURE_ROW:
            raise  # the delivery rules decide (the study may be fine)
        logger.exception("task {} failed", task.task_id)
        return failed_result(
            task,
            f"{type(error).__name__}: {error}",
            adapter_id=adapter_id,
            attempt=attempt,
            started_at=started,
        )
    finally:
        events.finish()
    return StudyResult(
        task_id=task.task_id,
        correlation_id=task.reply_correlation_id,
        status=TaskStatus.COMPLETED,
        reports=reports,
        files=files,
        original_filename=task.original_filename,
        study_path=task.study_path,
        adapter_id=adapter_id,
        attempt=attempt,
        started_at=started,
        finished_at=utc_now(),
        seconds=time.perf_counter() - clock,
    )
