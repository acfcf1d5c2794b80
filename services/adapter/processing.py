"""What an adapter does with one task, apart from RabbitMQ: run the pipeline, write the files,
build the StudyResult. Runs on the adapter's worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
from loguru import logger

from services.adapter.previews import write_previews
from services.broker.schemas import ResultFile, StudyResult, StudyTask, TaskStatus, utc_now
from services.broker.storage import relative_to_storage, result_files_dir
from services.core.config import Settings
from services.core.inference.base import InferenceBackend, ModelOutputs, TransientBackendError
from services.core.reports import write_reports
from services.core.schemas import ProcessingStatus, StudyReport

ProgressCallback = Callable[[str, float, str], None]  # stage, fraction 0..1, message
PREVIEWS_DIR = "previews"


class AdapterStopping(TransientBackendError):
    """The adapter is shutting down while a study waits for Triton: give the task back."""


class StudyNotFoundError(FileNotFoundError):
    """The task's study is not in the shared storage (yet): the task is retried a bounded
    number of times (another adapter, or a slow shared volume, may see it) and then failed."""


class ModelServerWaitExceeded(RuntimeError):
    """The model server stayed unavailable for longer than the study may wait: the study
    fails with this reason instead of holding its worker (and its queue slot) forever."""


def backoff(initial_s: float = 1.0, maximum_s: float = 30.0) -> Iterator[float]:
    delay = initial_s
    while True:
        yield delay
        delay = min(delay * 2, maximum_s)


class RetryingBackend:
    """Wraps a backend so that a transient Triton failure waits and retries the same request.

    The study is neither failed nor given back to the queue (that would count as a
    delivery): the worker thread simply waits, and the pika I/O thread keeps the broker
    connection alive meanwhile. A shutdown ends the wait (AdapterStopping); so does
    ``wait_limit_s`` (ModelServerWaitExceeded, the study fails): a request that times out
    every time (inference.triton_timeout_s) or a server that never comes back must not
    hold the study forever. Keep the limit under RabbitMQ's consumer_timeout (30 min by
    default), after which the broker would take the unacked task back.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        stop: threading.Event,
        on_retry: Callable[[str], None] | None = None,
        maximum_delay_s: float = 30.0,
        wait_limit_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._stop = stop
        self._on_retry = on_retry
        self._maximum_delay_s = maximum_delay_s
        self._wait_limit_s = wait_limit_s
        self._clock = clock
        self.name = backend.name
        self.metadata = backend.metadata
        self.retries = 0

    def infer(self, volume: np.ndarray) -> ModelOutputs:
        first_failure: float | None = None
        for delay in backoff(maximum_s=self._maximum_delay_s):
            if self._stop.is_set():
                raise AdapterStopping("the adapter is stopping")
            try:
                return self._backend.infer(volume)
            except AdapterStopping:
                raise
            except TransientBackendError as error:
                self.retries += 1
                now = self._clock()
                first_failure = now if first_failure is None else first_failure
                waited = now - first_failure
                if self._wait_limit_s is not None and waited + delay > self._wait_limit_s:
                    raise ModelServerWaitExceeded(
                        f"the model server was unavailable for {waited:.0f} s; a study waits "
                        f"at most {self._wait_limit_s:.0f} s "
                        f"(inference.model_server_wait_limit_s); last error: {error}"
                    ) from error
                logger.warning("model server unavailable ({}); retrying in {:.0f} s", error, delay)
                if self._on_retry is not None:
                    self._on_retry(f"model server unavailable, retrying in {delay:.0f} s")
                if self._stop.wait(delay):
                    raise AdapterStopping("the adapter is stopping") from error
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._backend.close()


def failure_report(task: StudyTask, reason: str) -> StudyReport:
    """The customer's Failure row for a task that could not be processed at all."""
    return StudyReport(
        path_to_study=task.original_filename or task.study_path,
        processing_status=ProcessingStatus.FAILURE,
        failure_reason=reason,
    )


def failed_result(
    task: StudyTask,
    reason: str,
    *,
    adapter_id: str,
    attempt: int,
    started_at: datetime | None = None,
) -> StudyResult:
    finished = utc_now()
    return StudyResult(
        task_id=task.task_id,
        correlation_id=task.reply_correlation_id,
        status=TaskStatus.FAILED,
        reports=[failure_report(task, reason)],
        error=reason,
        original_filename=task.original_filename,
        study_path=task.study_path,
        adapter_id=adapter_id,
        attempt=attempt,
        started_at=started_at,
        finished_at=finished,
        seconds=(finished - started_at).total_seconds() if started_at else 0.0,
    )


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


class _ObservedBackend:
    """Passes requests through and shows each model input to ``on_input`` first (previews,
    progress) -- the pipeline stays the single path from study to report."""

    def __init__(self, backend: InferenceBackend, on_input: Callable[[np.ndarray], None]) -> None:
        self._backend = backend
        self._on_input = on_input
        self.name = backend.name
        self.metadata = backend.metadata

    def infer(self, volume: np.ndarray) -> ModelOutputs:
        self._on_input(volume)
        return self._backend.infer(volume)

    def close(self) -> None:
        self._backend.close()


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

    TransientBackendError (and AdapterStopping) propagate: the study is fine, the model
    server is not, and the caller gives the task back instead of failing it. So does
    StudyNotFoundError: the caller retries the task a bounded number of times.
    """
    from services.core.pipeline import process_input

    def report_progress(stage: str, fraction: float, message: str = "") -> None:
        if progress is not None:
            progress(stage, fraction, message)

    storage_root = settings.storage.root
    output_dir = result_files_dir(storage_root, task.task_id)
    started = utc_now()
    clock = time.perf_counter()
    previews: list[Path] = []
    finished_studies = 0

    # Previews are drawn on a second thread while the model request is in flight: the
    # adapter has nothing else to do then, so they add nothing to the study's latency.
    preview_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="previews")
    pending_previews: list[Future[list[Path]]] = []

    def on_model_input(volume: np.ndarray) -> None:
        study_number = finished_studies + 1
        report_progress("inference", 0.6, f"running the model on study {study_number}")
        pending_previews.append(
            preview_writer.submit(
                write_previews, volume, output_dir / PREVIEWS_DIR, f"study{study_number}"
            )
        )

    def collect_previews() -> None:
        for future in pending_previews:
            try:
                previews.extend(future.result())
            except OSError as error:  # previews are a convenience, never a reason to fail
                logger.warning("task {}: previews not written: {}", task.task_id, error)

    def on_study_finished(report: StudyReport) -> None:
        nonlocal finished_studies
        finished_studies += 1
        report_progress(
            "study finished", 0.8, f"study {finished_studies}: {report.processing_status.value}"
        )

    try:
        study_path = task.resolve_study_path(storage_root)
        if not study_path.exists():
            raise StudyNotFoundError(
                f"the study {task.study_path!r} is not in the shared storage "
                "(was it uploaded to the same storage volume?)"
            )
        report_progress("reading", 0.1, "reading and checking the DICOM files")
        reports = process_input(
            study_path,
            backend=_ObservedBackend(backend, on_model_input),
            settings=settings,
            display_name=task.original_filename or None,
            progress=on_study_finished,
        )
        if not reports:
            raise RuntimeError("the pipeline returned no report")
        report_progress("writing", 0.9, "writing the report files")
        files = _result_files(storage_root, output_dir, reports)
        collect_previews()
        files.extend(
            ResultFile(kind="preview", path=relative_to_storage(storage_root, path))
            for path in previews
        )
    except (TransientBackendError, StudyNotFoundError):
        raise  # the caller retries these (the study may be fine)
    except Exception as error:  # an error of this study: report it, do not retry it
        logger.exception("task {} failed", task.task_id)
        return failed_result(
            task,
            f"{type(error).__name__}: {error}",
            adapter_id=adapter_id,
            attempt=attempt,
            started_at=started,
        )
    finally:
        preview_writer.shutdown(wait=True)
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
