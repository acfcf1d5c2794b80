"""Checking first (services/core/pipeline/prepare.py, CheckFirst), on the real fixtures of
../shared: what the adapter's preparation stage does with a new task while others wait. A
study that will be refused gets the same refusal as in a full preparation; one that passes
stops before its costly steps (its work directory removed)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack_support import zip_directory

from services.adapter.handoff import kept_intake_dir, read_check, read_handoff
from services.adapter.stages import TaskContext, finish_model_task, prepare_task
from services.broker.schemas import ModelTask, StudyTask
from services.core.config import InferenceSettings, Settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.pipeline import PreparationDeferred, PreparedStudy, prepare_studies
from services.core.pipeline.events import PipelineEvents
from services.core.pipeline.prepare import CheckFirst
from services.core.preprocessing import PreprocessingTarget
from services.core.schemas import ProcessingStatus

SMALL_TARGET = PreprocessingTarget(shape=(24, 40, 40), spacing_mm=(15.0, 9.0, 9.0))
CHEST = "chest_ct_lung_dx_a0002"  # 30 slices of 512x512: 7.9 M voxels
ANY_SIZE = CheckFirst(max_checked_voxels=10**12)
HEADERS_ONLY = CheckFirst(max_checked_voxels=0)


class StagesSeen(PipelineEvents):
    def __init__(self) -> None:
        self.stages: list[str] = []

    def stage_started(self, stage: str, *, study_index: int, n_studies: int) -> None:
        self.stages.append(stage)


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path: Path) -> Iterator[Path]:
    """The pipeline's work directories go here, to be counted."""
    folder = tmp_path / "temp"
    folder.mkdir()
    before, tempfile.tempdir = tempfile.tempdir, str(folder)
    yield folder
    tempfile.tempdir = before


def prepare(path: Path, check_first: CheckFirst | None, events: PipelineEvents | None = None):
    kwargs = {} if events is None else {"events": events}
    return list(
        prepare_studies(
            path, settings=Settings(), target=SMALL_TARGET, check_first=check_first, **kwargs
        )
    )


def only_report(studies: list[PreparedStudy]):
    (study,) = studies
    assert study.model_input is None
    return study.report


@pytest.mark.parametrize(
    ("fixture", "words"),
    [("head_ct_gantry_tilt", "not a chest"), ("mr_brain_t1", "no ct series")],
)
def test_a_study_that_will_be_refused_is_refused_alike(
    fixtures_dir: Path, fixture: str, words: str
) -> None:
    checked = only_report(prepare(fixtures_dir / fixture, ANY_SIZE))
    full = only_report(prepare(fixtures_dir / fixture, None))
    assert words in (checked.failure_reason or "").lower()
    assert checked.failure_reason == full.failure_reason
    assert checked.failure_kind == full.failure_kind
    assert checked.chest_check == full.chest_check


def test_a_broken_archive_is_refused_at_intake(fixtures_dir: Path, tmp_path: Path) -> None:
    archive = zip_directory(fixtures_dir / CHEST, tmp_path / "chest.zip")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(archive.read_bytes()[:5000])
    report = only_report(prepare(broken, HEADERS_ONLY))
    assert (report.failure_reason or "").startswith("intake failed")


@pytest.mark.parametrize(
    ("check_first", "why", "last_stage", "not_reached"),
    [
        (ANY_SIZE, "preprocessing", "chest_check", "preprocessing"),  # a small series
        (HEADERS_ONLY, "large CT series", "selection", "volume"),  # a large one
    ],
)
def test_a_chest_ct_stops_before_its_costly_steps(
    fixtures_dir: Path,
    own_temp_dir: Path,
    check_first: CheckFirst,
    why: str,
    last_stage: str,
    not_reached: str,
) -> None:
    seen = StagesSeen()
    with pytest.raises(PreparationDeferred, match=why):
        prepare(fixtures_dir / CHEST, check_first, seen)
    assert seen.stages[-1] == last_stage
    assert not_reached not in seen.stages
    assert list(own_temp_dir.iterdir()) == []  # its work directory is gone


def test_without_check_first_the_chest_is_prepared(fixtures_dir: Path) -> None:
    (study,) = prepare(fixtures_dir / CHEST, None)
    assert study.model_input is not None


def test_the_input_a_check_unpacked_is_prepared_without_unpacking_it_again(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    """The check keeps what it unpacked beside its record; the full preparation reads that,
    even when the upload itself is gone, and finds the same intake."""
    archive = zip_directory(fixtures_dir / CHEST, tmp_path / "chest.zip")
    kept = tmp_path / "prepared" / "intake"

    def run(check_first: CheckFirst | None) -> list[PreparedStudy]:
        return list(
            prepare_studies(
                archive,
                settings=Settings(),
                target=SMALL_TARGET,
                check_first=check_first,
                kept_intake_dir=kept,
            )
        )

    with pytest.raises(PreparationDeferred):
        run(ANY_SIZE)
    assert (kept / "intake.json").is_file()
    assert len(list((kept / "files").rglob("*"))) >= 30
    fresh = prepare(archive, None)[0].report.intake
    archive.unlink()
    (study,) = run(None)
    assert study.model_input is not None
    assert study.report.intake == fresh


def test_a_task_checked_first_is_prepared_later_from_what_its_check_kept(
    fixtures_dir: Path, tmp_path: Path, tiny_model_repository: Path
) -> None:
    """The adapter's two turns of a task checked first (services/adapter/stages.py): the
    check keeps the unpacked input and its time; the preparation prepares what was kept (the
    upload is spoilt meanwhile), removes it and counts the check in its time."""
    settings = Settings()
    settings.storage.root = tmp_path / "storage"
    upload = settings.storage.root / "uploads" / "t1" / "chest.zip"
    upload.parent.mkdir(parents=True)
    zip_directory(fixtures_dir / CHEST, upload)
    task = StudyTask(task_id="t1", study_path="uploads/t1/chest.zip", original_filename="c.zip")
    backend = OnnxRuntimeBackend(tiny_model_repository, InferenceSettings(onnx_intra_op_threads=1))
    # The check on the task's 2nd delivery (its 1st adapter died): the count goes on.
    context = TaskContext(backend=backend, settings=settings, adapter_id="a", attempt=2)
    try:
        assert prepare_task(task, context, check_first=True) == task  # for its preparation lane
        kept = kept_intake_dir(settings.storage.root, "t1")
        assert (kept / "intake.json").is_file()
        check = read_check(settings.storage.root, "t1")
        assert check is not None
        assert check.seconds > 0
        assert check.attempt == 2
        # Taken again from its task lane (its hand-on was lost): not checked twice.
        assert prepare_task(task, context, check_first=True) == task
        assert read_check(settings.storage.root, "t1") == check
        upload.write_bytes(b"not an archive any more")  # unpacking it again would fail
        later = TaskContext(backend=backend, settings=settings, adapter_id="b", attempt=1)
        handoff = prepare_task(task, later)  # the first delivery from the preparation lane
        assert isinstance(handoff, ModelTask)
        # Kept until the result is stored: a second delivery of the task may be reading it.
        assert (kept / "intake.json").is_file()
        record = read_handoff(settings.storage.root, "t1")
        assert record is not None
        assert record.check_seconds == check.seconds
        assert record.prepare_seconds > record.check_seconds
        result = finish_model_task(handoff, context)
    finally:
        backend.close()
    assert result.reports[0].processing_status is ProcessingStatus.SUCCESS
    assert result.check_seconds == record.check_seconds
    assert result.attempt == 2  # the delivery count of its check carries on
    assert result.prepare_seconds == record.prepare_seconds
