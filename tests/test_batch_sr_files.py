"""The batch's SRs (services/batch/sr_files.py): where the model does not compute on this
process's CPU, a study that reaches the model has its SR skeleton made on a thread while the
model computes; where it does, every skeleton is made at the end. Either way the files
written are the SRs made whole in one go, and a refused study in the same input gets its SR
as before. On the real fixtures (a chest CT and a head CT in one archive) and the tiny demo
repository."""

from __future__ import annotations

import threading
import uuid
import zipfile
from pathlib import Path

import pydicom
import pytest
from sr_support import dciodvfy_errors, without_creation_times

from services.batch.screening import screen_and_write
from services.batch.sr_files import StructuredReportFiles
from services.core.config import InferenceSettings, Settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.pipeline import process_input
from services.core.schemas import ProcessingStatus
from services.sr import document as sr_document
from services.sr.document import (
    DocumentContext,
    DocumentSkeleton,
    document_context,
    structured_report_skeleton,
    write_structured_reports,
)
from services.sr.evidence import StudyEvidence

pytestmark = pytest.mark.slow


def _chest_and_head_archive(fixtures_dir: Path, folder: Path) -> Path:
    archive = folder / "two.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for fixture in ("head_ct_gantry_tilt", "chest_ct_lung_dx_a0002"):
            for path in sorted((fixtures_dir / fixture).iterdir()):
                handle.write(path, arcname=f"{fixture}/{path.name}")
    return archive


@pytest.mark.parametrize("beside_model", [True, False], ids=["beside-model", "at-the-end"])
def test_the_batch_s_srs_made_during_the_model_run_equal_those_made_whole(
    fixtures_dir: Path,
    tmp_path: Path,
    tiny_model_repository: Path,
    monkeypatch: pytest.MonkeyPatch,
    beside_model: bool,
) -> None:
    archive = _chest_and_head_archive(fixtures_dir, tmp_path)
    settings = Settings()
    backend = OnnxRuntimeBackend(tiny_model_repository, InferenceSettings(onnx_intra_op_threads=1))
    try:
        context = document_context(uuid.uuid4().hex, backend.metadata, settings.inference)
        files = StructuredReportFiles(context, beside_model=beside_model)
        reports = process_input(archive, backend=backend, settings=settings, events=files)
    finally:
        backend.close()
    statuses = [report.processing_status for report in reports]
    assert sorted(statuses) == [ProcessingStatus.FAILURE, ProcessingStatus.SUCCESS]
    # Beside the model, only the study that reached the model had its skeleton made early,
    # at its place: writing makes again only the head CT's, and the chest's is used, not
    # rebuilt. At the end, writing makes both (and the comparison with the SRs made whole
    # below then holds by construction: what can fail there is this count).
    chest = statuses.index(ProcessingStatus.SUCCESS) + 1
    made_when_written: list[int] = []

    def counted_skeleton(
        evidence: StudyEvidence, context: DocumentContext, *, instance_number: int = 1
    ) -> DocumentSkeleton:
        made_when_written.append(instance_number)
        return structured_report_skeleton(evidence, context, instance_number=instance_number)

    monkeypatch.setattr(sr_document, "structured_report_skeleton", counted_skeleton)
    written = files.write(tmp_path / "sr")
    monkeypatch.undo()
    assert made_when_written == ([3 - chest] if beside_model else [1, 2])
    whole = write_structured_reports(files.evidence.studies, tmp_path / "whole", context)
    assert [path.name for path in written] == [path.name for path in whole]
    assert len(written) == 2
    for early, made_whole in zip(written, whole, strict=True):
        assert dciodvfy_errors(early) == []
        assert without_creation_times(early) == without_creation_times(made_whole)
    studies = {str(pydicom.dcmread(path).StudyInstanceUID) for path in written}
    assert studies == {str(report.study_uid) for report in reports}


@pytest.mark.parametrize("on_this_cpu", [True, False], ids=["cpu-provider", "elsewhere"])
def test_the_batch_makes_skeletons_beside_the_model_only_where_it_computes_elsewhere(
    fixtures_dir: Path,
    tmp_path: Path,
    tiny_model_repository: Path,
    monkeypatch: pytest.MonkeyPatch,
    on_this_cpu: bool,
) -> None:
    """With ONNX Runtime's CPU provider the encoder keeps every core busy, so the skeletons
    wait for the end (on the batch's own thread); a model computing elsewhere has them made
    on the skeleton thread while it runs."""
    archive = _chest_and_head_archive(fixtures_dir, tmp_path)
    made_on: dict[int, str] = {}  # the SR's place in the run -> the thread that made it

    def recorded_skeleton(
        evidence: StudyEvidence, context: DocumentContext, *, instance_number: int = 1
    ) -> DocumentSkeleton:
        made_on[instance_number] = threading.current_thread().name
        return structured_report_skeleton(evidence, context, instance_number=instance_number)

    monkeypatch.setattr("services.batch.sr_files.structured_report_skeleton", recorded_skeleton)
    monkeypatch.setattr(sr_document, "structured_report_skeleton", recorded_skeleton)
    backend = OnnxRuntimeBackend(tiny_model_repository, InferenceSettings(onnx_intra_op_threads=1))
    backend.computes_on_this_cpu = on_this_cpu
    try:
        reports = screen_and_write(
            [archive],
            output_dir=tmp_path / "out",
            save_model_input=None,
            settings=Settings(),
            backend=backend,
            recorder=None,
        )
    finally:
        backend.close()
    statuses = [report.processing_status for report in reports]
    assert sorted(statuses) == [ProcessingStatus.FAILURE, ProcessingStatus.SUCCESS]
    chest = statuses.index(ProcessingStatus.SUCCESS) + 1
    main = threading.main_thread().name
    assert made_on[3 - chest] == main  # the refused head CT's: when the SRs are written
    if on_this_cpu:
        assert made_on[chest] == main
    else:  # the chest's beside the model, on the skeleton thread
        assert made_on[chest] != main
        assert made_on[chest].startswith("sr-skeleton")
    written = sorted((tmp_path / "out" / "sr").glob("*.dcm"))
    assert len(written) == 2
    assert all(dciodvfy_errors(path) == [] for path in written)
