"""The batch's DICOM SRs (``OUTPUT_DIR/sr``), one per DICOM study.

What an SR needs of its study's source files is gathered while the study is read
(EvidenceCollector). Most of the document does not depend on the model's answer (the
patient and study modules, the evidence, the 300 source-image references): that skeleton
is made on a thread of its own while the model computes, as the adapter's model stage does
(services/adapter/task_runner.py, EarlySkeletons), and completed when the run ends.

It does so only where the model does not compute on this process's CPU cores
(``InferenceBackend.computes_on_this_cpu``). With ONNX Runtime's CPU provider the encoder's
threads fill every core (on the measured 2-core host), and a skeleton made beside it
(0.3 core-s, pure Python) slows the run by more than it saves at the end; the skeletons are
then made when the SRs are written. Measured on a one-study batch
of the 300-slice study, 8 interleaved pairs on a 2-core Xeon: 5.64-6.27 s (median 5.67)
with the skeletons made at the end, 5.74-6.59 s (median 5.94) made beside the encoder
(benchmarks/README.md, "Cold start, 2026-12-06 12:10-12:45 UTC").
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from services.core.dicom.objects import Series, Study
from services.core.pipeline import PipelineEvents, PreparedStudy
from services.core.schemas import StudyReport
from services.sr.document import (
    DocumentContext,
    DocumentSkeleton,
    skeletons_made,
    structured_report_skeleton,
    write_structured_reports,
)
from services.sr.evidence import EvidenceCollector


class StructuredReportFiles(PipelineEvents):
    """Gathers every study's evidence, makes its SR skeleton while the model computes
    (``beside_model``) or at the end, and writes the SRs at the end (``write``)."""

    def __init__(self, context: DocumentContext, *, beside_model: bool = True) -> None:
        self.context = context
        self.beside_model = beside_model
        self.evidence = EvidenceCollector()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sr-skeleton")
        self._skeletons: dict[int, Future[DocumentSkeleton]] = {}

    def series_selected(
        self, study: Study, series: Series | None, *, study_index: int, n_studies: int
    ) -> None:
        self.evidence.series_selected(study, series, study_index=study_index, n_studies=n_studies)

    def model_input_ready(self, prepared: PreparedStudy) -> None:
        if not self.beside_model:
            return
        study = self.evidence.pending(prepared.index)
        if study is None:
            return
        # Studies finish one after the other (process_input), so this one's place among
        # the run's SRs is the next.
        position = len(self.evidence.studies) + 1
        self._skeletons[position] = self._pool.submit(
            structured_report_skeleton, study, self.context, instance_number=position
        )

    def study_finished(self, report: StudyReport, *, study_index: int, n_studies: int) -> None:
        self.evidence.finish(report, study_index)

    def write(self, folder: Path) -> list[Path]:
        """Every study's SR in ``folder``; a skeleton that could not be made early is made
        again there (where its failure is reported)."""
        try:
            made = skeletons_made(self._skeletons)
            return write_structured_reports(self.evidence.studies, folder, self.context, made)
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
