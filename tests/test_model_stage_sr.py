"""The SRs of the adapter's model stage (services/adapter/stages.py): their skeletons are made
on a thread of their own while the model runs (task_runner.EarlySkeletons) and completed
with the result. A task of two studies, a chest CT and a head CT (refused, but in a task that
goes on to the model), on the real fixtures and the tiny demo repository: each study gets its
SR, valid for dciodvfy, and each is the SR the batch makes whole in one go."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sr_support import dciodvfy_errors, read_screening_sr, without_creation_times

from services.adapter.handoff import evidence_from_json, read_handoff
from services.adapter.stages import TaskContext, finish_model_task, prepare_task
from services.adapter.task_runner import sr_context
from services.broker.schemas import ModelTask, StudyTask
from services.core.config import InferenceSettings, Settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.schemas import ProcessingStatus
from services.sr.document import write_structured_reports

pytestmark = pytest.mark.slow


def test_each_study_of_a_model_task_gets_its_sr_as_the_batch_makes_it(
    fixtures_dir: Path, tmp_path: Path, tiny_model_repository: Path
) -> None:
    settings = Settings()
    root = settings.storage.root = tmp_path / "storage"
    upload = root / "uploads" / "t2" / "two.zip"
    upload.parent.mkdir(parents=True)
    # One archive of both studies, as an export of a patient's day could be.
    with zipfile.ZipFile(upload, "w") as archive:
        for fixture in ("chest_ct_lung_dx_a0002", "head_ct_gantry_tilt"):
            for path in sorted((fixtures_dir / fixture).iterdir()):
                archive.write(path, arcname=f"{fixture}/{path.name}")
    task = StudyTask(task_id="t2", study_path="uploads/t2/two.zip", original_filename="two.zip")
    backend = OnnxRuntimeBackend(tiny_model_repository, InferenceSettings(onnx_intra_op_threads=1))
    context = TaskContext(backend=backend, settings=settings, adapter_id="a", attempt=1)
    try:
        handoff = prepare_task(task, context)
        assert isinstance(handoff, ModelTask)  # the chest needs the model
        record = read_handoff(root, "t2")
        assert record is not None
        result = finish_model_task(handoff, context)
        sr_context_of_task = sr_context("t2", backend, settings, None)
    finally:
        backend.close()
    statuses = {report.processing_status for report in result.reports}
    assert statuses == {ProcessingStatus.SUCCESS, ProcessingStatus.FAILURE}
    written = sorted(root / file.path for file in result.files if file.kind == "sr")
    assert len(written) == 2  # the refused head CT's too
    by_study: dict[str, Dataset] = {}
    for path in written:
        assert dciodvfy_errors(path) == []
        document = pydicom.dcmread(path)
        by_study[str(document.StudyInstanceUID)] = document
    for report in result.reports:
        values = read_screening_sr(by_study[str(report.study_uid)])
        if report.succeeded:
            assert values.screening["Processing status"] == "Success"
            assert values.screening["Probability of pathology"] == pytest.approx(
                report.probability_of_pathology, abs=1e-6
            )
            assert len(values.findings) == len(report.findings) > 0
        else:
            assert values.screening["Processing status"] == "Failure"
            assert "not a chest" in str(values.screening["Failure reason"]).lower()
    # The SRs made whole from the same reports and evidence, as the batch makes them.
    studies = [
        (report, evidence_from_json(entry.evidence))
        for report, entry in zip(result.reports, record.entries, strict=True)
    ]
    whole = write_structured_reports(studies, tmp_path / "whole", sr_context_of_task)
    assert sorted(path.name for path in whole) == [path.name for path in written]
    for early, made_whole in zip(written, sorted(whole), strict=True):
        assert without_creation_times(early) == without_creation_times(made_whole)
