"""The batch's work once its model is loading: every input through the pipeline, then
output.xlsx, the JSON and warnings files, the SRs and the summary line.

Apart from ``__main__`` for the cold start: ``__main__`` imports only what opening the
model needs, starts the model's load on a thread, and then imports this module, whose
imports (pydicom, highdicom, openpyxl, the pipeline: about 0.6 s) run beside the load
instead of before it (benchmarks/README.md, "Cold start").
"""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from services.batch.model_input_files import ModelInputSaver
from services.batch.preview_files import PREVIEWS_DIR_NAME, PreviewWriter
from services.batch.sr_files import StructuredReportFiles
from services.core.config import Settings
from services.core.inference.base import InferenceBackend
from services.core.pipeline import EventFanOut, PipelineEvents, process_input
from services.core.reports import write_reports
from services.core.schemas import StudyReport
from services.sr.document import document_context

if TYPE_CHECKING:
    from services.batch.registry_records import BatchRecorder

SR_DIR_NAME = "sr"  # one DICOM structured report per DICOM study


def summary_line(
    reports: Sequence[StudyReport], n_inputs: int, output_dir: Path, seconds: float
) -> str:
    statuses = Counter(report.processing_status.value for report in reports)
    demo = (
        " (DEMO weights: probabilities mean nothing)"
        if any(r.demo_weights for r in reports)
        else ""
    )
    return (
        f"{len(reports)} studies from {n_inputs} inputs in {seconds:.1f} s: "
        f"{statuses.get('Success', 0)} Success, {statuses.get('Failure', 0)} Failure; "
        f"report {output_dir / 'output.xlsx'}{demo}"
    )


def screen_and_write(
    inputs: list[Path],
    *,
    output_dir: Path,
    save_model_input: Path | None,
    settings: Settings,
    backend: InferenceBackend,
    recorder: BatchRecorder | None,
) -> list[StudyReport]:
    """Every input through the pipeline, then the report files and the SRs in
    ``output_dir``. The caller closes the backend and the recorder."""
    structured_reports = StructuredReportFiles(
        document_context(uuid.uuid4().hex, backend.metadata, settings.inference),
        beside_model=not backend.computes_on_this_cpu,
    )
    reports: list[StudyReport] = []
    try:
        previews = PreviewWriter(
            output_dir / PREVIEWS_DIR_NAME, spacing_mm=backend.metadata.target_spacing_mm
        )
        # disable=None: no bar unless stderr is a terminal (a bar in a file is one line per
        # update).
        with tqdm(inputs, desc="studies", unit="input", file=sys.stderr, disable=None) as bar:
            for input_path in bar:
                task = recorder.begin(input_path) if recorder is not None else None
                found = process_input(
                    input_path,
                    backend=backend,
                    settings=settings,
                    display_name=str(input_path),
                    events=EventFanOut(
                        _events(save_model_input, input_path, previews), structured_reports
                    ),
                )
                if recorder is not None and task is not None:
                    recorder.finish(task[0], input_path, found, task[1])
                reports.extend(found)
                failed = sum(not report.succeeded for report in reports)
                bar.set_postfix(success=len(reports) - failed, failure=failed)
    except BaseException:
        structured_reports.close()
        raise
    write_reports(reports, output_dir)
    structured_reports.write(output_dir / SR_DIR_NAME)
    return reports


def _events(
    save_model_input: Path | None, input_path: Path, previews: PreviewWriter
) -> PipelineEvents:
    if save_model_input is None:
        return previews
    return EventFanOut(previews, ModelInputSaver(save_model_input, input_path))
