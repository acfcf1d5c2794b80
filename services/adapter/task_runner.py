"""The pieces of an adapter's task apart from RabbitMQ: the pipeline's events (progress, side
files) and the report files of a finished task. services/adapter/stages.py chains them into
the preparation and model stages; both run on a stage's worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loguru import logger

from services.adapter.handoff import evidence_from_json
from services.adapter.progress import (
    STAGE_MESSAGES,
    InferenceTimes,
    ModelTicker,
    ProgressCallback,
    study_progress,
)
from services.adapter.viewer_data import viewer_stack, write_viewer
from services.broker.schemas import ResultFile
from services.broker.storage import relative_to_storage
from services.core.config import Settings
from services.core.inference.base import InferenceBackend
from services.core.pipeline import PipelineEvents, PreparedStudy
from services.core.previews import write_previews
from services.core.quality import QualityFlag
from services.core.reports import write_reports
from services.core.schemas import StudyReport
from services.core.volume import Volume
from services.sr.document import (
    DocumentContext,
    DocumentSkeleton,
    EarlierReports,
    document_context,
    skeletons_made,
    structured_report_skeleton,
    write_structured_reports,
)
from services.sr.evidence import StudyEvidence

PREVIEWS_DIR = "previews"
VIEWER_DIR = "viewer"
SR_DIR = "sr"  # one DICOM structured report per DICOM study (services/sr)
# Result file kinds of the side files, by the folder they are written to.
SIDE_FILE_KINDS = {PREVIEWS_DIR: "preview", VIEWER_DIR: "viewer"}


class TaskEvents(PipelineEvents):
    """Progress messages for the submitter; preview images and slice-viewer data, written on
    a second thread while the pipeline goes on."""

    def __init__(
        self,
        progress: ProgressCallback | None,
        output_dir: Path,
        *,
        inference_times: InferenceTimes | None = None,
        spacing_mm: tuple[float, float, float] | None = None,
    ) -> None:
        self._progress = progress
        self._spacing_mm = spacing_mm  # of the model input: true proportions in the previews
        self._output_dir = output_dir
        self._inference_times = inference_times or InferenceTimes()
        self._ticker: ModelTicker | None = None
        # The files are written on a second thread: while the model request is in flight the
        # adapter has nothing else to do, so they add nothing to the study's latency.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="side-files")
        self._pending: list[Future[list[Path]]] = []

    def report(self, stage: str, fraction: float, message: str) -> None:
        if self._progress is not None:
            self._progress(stage, fraction, message)

    def stage_started(self, stage: str, *, study_index: int, n_studies: int) -> None:
        if stage == "inference":
            self._start_ticker(study_index, n_studies)
            return
        if stage == "findings":
            self._stop_ticker(record=True)
        message = STAGE_MESSAGES.get(stage, stage)
        if n_studies > 1:
            message = f"study {study_index + 1} of {n_studies}: {message}"
        self.report(stage, study_progress(stage, study_index, n_studies), message)

    def volume_loaded(self, volume: Volume, *, study_index: int, n_studies: int) -> None:
        # Reduced, compressed and written on the writer thread, beside the chest check
        # (mostly a wait for the body-part model) rather than before it: 0.04 s for
        # 300x512x512 off the study's path. The pipeline holds the volume until its
        # preprocessing has ended; this reference usually goes during the chest check, later
        # only where the writer is still busy with an earlier study's files.
        self._pending.append(
            self._writer.submit(_viewer_files, volume, self._output_dir / VIEWER_DIR, study_index)
        )

    def model_input_ready(self, prepared: PreparedStudy) -> None:
        assert prepared.model_input is not None
        self._pending.append(
            self._writer.submit(
                write_previews,
                prepared.model_input,
                self._output_dir / PREVIEWS_DIR,
                f"study{prepared.index + 1}",
                self._spacing_mm,
            )
        )

    def study_finished(self, report: StudyReport, *, study_index: int, n_studies: int) -> None:
        self._stop_ticker(record=False)
        fraction = study_progress("selection", study_index + 1, max(n_studies, 1))
        self.report(
            "study finished", fraction, f"study {study_index + 1}: {report.processing_status.value}"
        )

    def _start_ticker(self, study_index: int, n_studies: int) -> None:
        self._stop_ticker(record=False)
        prefix = "running the model"
        if n_studies > 1:
            prefix = f"study {study_index + 1} of {n_studies}: {prefix}"
        self._ticker = ModelTicker(
            self.report,
            start=study_progress("inference", study_index, n_studies),
            end=study_progress("findings", study_index, n_studies),
            expected_s=self._inference_times.expected(),
            prefix=prefix,
        ).start()

    def _stop_ticker(self, *, record: bool) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            seconds = ticker.stop()
            if record:  # only an answered request says how long the model takes
                self._inference_times.add(seconds)

    def finish(self) -> list[Path]:
        """Wait for the side files; the files written (a failed one is only logged)."""
        self._stop_ticker(record=False)
        self._writer.shutdown(wait=True)
        written: list[Path] = []
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                written.extend(future.result())
            except (OSError, ValueError) as error:  # side files never fail a study
                logger.warning("side file not written: {}", error)
        return written


def _viewer_files(volume: Volume, directory: Path, study_index: int) -> list[Path]:
    try:
        stack = viewer_stack(volume)
    except Exception:  # noqa: BLE001 - the viewer is a convenience, never a failure
        logger.opt(exception=True).warning("viewer data of study {} not built", study_index)
        return []
    return write_viewer(stack, directory, f"study{study_index + 1}")


LATE_INSTANCES_WARNING = (
    "late images: they arrived after the study's earlier images were screened; this result "
    "is of the late images only"
)


def mark_late_instances(reports: list[StudyReport]) -> None:
    """The warning and flag of a task of late images (StudyTask.late_instances): the
    listener knows it, the pipeline cannot see it in the images."""
    for report in reports:
        report.warnings.append(LATE_INSTANCES_WARNING)
        report.quality_flags.append(QualityFlag.LATE_INSTANCES)


def side_file_kind(output_dir: Path, path: Path) -> str:
    """ "preview" or "viewer", by the folder under the task's output folder."""
    folder = path.relative_to(output_dir).parts[0]
    return SIDE_FILE_KINDS.get(folder, folder)


def result_files(
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


def sr_context(
    task_id: str, backend: InferenceBackend, settings: Settings, earlier: EarlierReports | None
) -> DocumentContext:
    return document_context(task_id, backend.metadata, settings.inference, earlier)


class EarlySkeletons:
    """The SR skeletons of a task's studies (services/sr/document.py), made on a thread of
    their own from the hand-off's evidence while the model requests are in flight: none of
    it needs the model's answer."""

    def __init__(
        self, evidence: Sequence[list[dict[str, Any]] | None], context: DocumentContext
    ) -> None:
        self.context = context  # the SRs are completed with the context they were made with
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sr-skeleton")
        # By position in the task's studies (from 1), as write_structured_reports counts.
        self._evidence = [self._pool.submit(evidence_from_json, items) for items in evidence]
        self._skeletons = {
            position: self._pool.submit(self._skeleton, future, position)
            for position, future in enumerate(self._evidence, start=1)
        }

    def _skeleton(
        self, evidence: Future[StudyEvidence | None], position: int
    ) -> DocumentSkeleton | None:
        study = evidence.result()
        if study is None:
            return None
        return structured_report_skeleton(study, self.context, instance_number=position)

    def evidence(self) -> list[StudyEvidence | None]:
        """Each study's evidence (a file that could not be read raises, as it would here)."""
        return [future.result() for future in self._evidence]

    def skeletons(self) -> dict[int, DocumentSkeleton]:
        """The skeletons made (services/sr/document.py, ``skeletons_made``)."""
        return skeletons_made(self._skeletons)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def structured_report_files(
    storage_root: Path,
    output_dir: Path,
    evidence: list[tuple[StudyReport, StudyEvidence | None]],
    context: DocumentContext,
    skeletons: Mapping[int, DocumentSkeleton] | None = None,
) -> list[ResultFile]:
    """The studies' DICOM SRs next to the other report files (NIfTI studies have none)."""
    task_id = context.key
    try:
        written = write_structured_reports(evidence, output_dir / SR_DIR, context, skeletons)
    except Exception:  # noqa: BLE001 - the reports stand without their SR; the log says why
        logger.exception("task {}: structured reports not written", task_id)
        return []
    return [
        ResultFile(
            kind="sr",
            path=relative_to_storage(storage_root, path),
            description="DICOM structured report",
        )
        for path in written
    ]
