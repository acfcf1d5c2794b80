"""Model inputs kept in the adapter's memory between its stages (services/adapter/held_inputs.py)
and the answer when an input is gone (services/adapter/stages.py): the model stage sends the
task back to its preparation lane and the preparation prepares it again, on the real fixture
and the tiny demo repository; its result is the one the input from memory or from the storage
gives."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.adapter.handoff import read_check, read_handoff, remove_prepared
from services.adapter.held_inputs import Handover, HeldInputs
from services.adapter.stages import TaskContext, finish_model_task, prepare_task
from services.broker.schemas import ModelTask, StudyResult, StudyTask, TaskStatus
from services.broker.storage import prepared_dir
from services.core.config import InferenceSettings, Settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend


def _input(value: float) -> np.ndarray:
    return np.full((2, 3, 4), value, dtype=np.float32)


def test_held_inputs_are_found_by_task_and_name_until_their_result_is_stored() -> None:
    held = HeldInputs(2)
    first, second = _input(1.0), _input(2.0)
    assert held.hold("t1", "study1.npy", first)
    assert held.hold("t2", "study1.npy", second)
    assert held.find("t1", "study2.npy") is None  # another study of the task
    assert held.find("t3", "study1.npy") is None  # another task: never another's input
    assert held.find("t2", "study1.npy") is second
    assert held.find("t2", "study1.npy") is second  # a model request given back finds it again
    held.drop("t2")  # its result is stored
    assert held.find("t2", "study1.npy") is None
    held.drop_finished(lambda task_id: task_id == "t1")  # stored by another adapter
    assert len(held) == 0


def test_a_full_store_or_another_model_stage_means_the_input_is_written() -> None:
    alone = [True]
    held = HeldInputs(1, may_hold=lambda: alone[0])
    assert held.hold("t1", "study1.npy", _input(1.0))
    assert not held.hold("t2", "study1.npy", _input(2.0))  # full
    assert held.hold("t1", "study1.npy", _input(3.0))  # the same input again (a redelivery)
    held.drop("t1")  # its result is stored
    alone[0] = False  # a second adapter's model stage is alive
    assert not held.hold("t2", "study1.npy", _input(2.0))
    assert len(held) == 0
    assert not HeldInputs(0).hold("t1", "study1.npy", _input(1.0))  # held_inputs: 0


def test_an_input_held_too_long_or_when_all_go_is_written_before_it_is_forgotten() -> None:
    now = [0.0]
    alone = [True]
    written: list[tuple[str, str, float]] = []

    def release(task_id: str, name: str, model_input: np.ndarray) -> None:
        assert held.find(task_id, name) is model_input  # still found while it is written
        written.append((task_id, name, float(model_input[0, 0, 0])))

    held = HeldInputs(
        1, max_age_s=60.0, clock=lambda: now[0], may_hold=lambda: alone[0], release=release
    )
    assert held.hold("taken-elsewhere", "study1.npy", _input(1.0))
    now[0] = 59.0
    assert not held.hold("t2", "study1.npy", _input(2.0))  # full
    now[0] = 61.0
    assert held.hold("t2", "study1.npy", _input(2.0))  # the stale one written, room made
    assert written == [("taken-elsewhere", "study1.npy", 1.0)]
    assert held.find("taken-elsewhere", "study1.npy") is None
    now[0] = 122.0
    alone[0] = False  # a second model stage: nothing more is held, the stale one still goes
    assert not held.hold("t3", "study1.npy", _input(3.0))
    assert written[-1] == ("t2", "study1.npy", 2.0)
    assert len(held) == 0
    alone[0] = True
    assert held.hold("t4", "study1.npy", _input(4.0))
    held.release_all()  # the adapter stops
    assert written[-1] == ("t4", "study1.npy", 4.0)
    assert len(held) == 0


@pytest.fixture
def chest_task(fixtures_dir: Path, tmp_path: Path) -> tuple[Settings, StudyTask]:
    settings = Settings()
    root = settings.storage.root = tmp_path / "storage"
    upload = root / "uploads" / "t1" / "chest"
    shutil.copytree(fixtures_dir / "chest_ct_lung_dx_a0002", upload)
    return settings, StudyTask(
        task_id="t1", study_path="uploads/t1/chest", original_filename="chest"
    )


class _Stages:
    """One adapter's two stages in this process, its model inputs held as configured."""

    def __init__(self, settings: Settings, backend: OnnxRuntimeBackend, held: HeldInputs | None):
        self.handovers: list[Handover] = []
        self.context = TaskContext(
            backend=backend,
            settings=settings,
            adapter_id="a",
            attempt=1,
            held_inputs=held,
            on_handover=self.handovers.append,
        )

    def prepare(self, task: StudyTask) -> ModelTask:
        handoff = prepare_task(task, self.context)
        assert isinstance(handoff, ModelTask)
        return handoff

    def finish(self, handoff: ModelTask) -> StudyResult:
        result = finish_model_task(handoff, self.context)
        assert isinstance(result, StudyResult)
        assert result.status is TaskStatus.COMPLETED
        if self.context.held_inputs is not None:
            self.context.held_inputs.drop(handoff.task.task_id)  # as its stored result does
        return result


@pytest.mark.slow
def test_an_input_held_in_memory_or_prepared_again_gives_the_result_of_the_written_one(
    chest_task: tuple[Settings, StudyTask], tiny_model_repository: Path
) -> None:
    settings, task = chest_task
    root = settings.storage.root
    folder = prepared_dir(root, task.task_id)
    backend = OnnxRuntimeBackend(tiny_model_repository, InferenceSettings(onnx_intra_op_threads=1))
    try:
        # Written to the storage (another model stage alive, or held_inputs 0).
        written = _Stages(settings, backend, HeldInputs(2, may_hold=lambda: False))
        by_file = written.finish(written.prepare(task))
        assert written.handovers == [Handover.FILE]
        remove_prepared(root, task.task_id)

        # Held: nothing written, and the model stage takes it from memory.
        held = HeldInputs(2)
        holding = _Stages(settings, backend, held)
        handoff = holding.prepare(task)
        record = read_handoff(root, task.task_id)
        assert record is not None
        assert [entry.input_in_memory for entry in record.entries] == [True]
        assert not list(folder.glob("*.npy"))
        by_memory = holding.finish(handoff)
        assert holding.handovers == [Handover.MEMORY]
        assert len(held) == 0
        remove_prepared(root, task.task_id)

        # Held by an adapter that is gone: the next one's model stage sends the task back to
        # its preparation, its deliveries counted on (here the ModelTask's second delivery);
        # its preparation finds the record's input gone and prepares the task again, holding
        # the input, or writing it where another model stage is alive.
        handoff = holding.prepare(task)
        by_preparing_again = []
        assert handoff.prepare_attempt == 1
        for again, handover in (
            (_Stages(settings, backend, HeldInputs(2)), Handover.MEMORY),
            (_Stages(settings, backend, HeldInputs(2, may_hold=lambda: False)), Handover.FILE),
        ):
            assert finish_model_task(handoff, replace(again.context, attempt=2)) == task
            # The deliveries spent go on: a study that kills its adapter in the model stage
            # each time still reaches the delivery limit.
            spent = handoff.prepare_attempt + 1
            check = read_check(root, task.task_id)
            assert check is not None
            assert check.attempt == spent
            assert read_handoff(root, task.task_id) is None  # waiting for its preparation
            handoff = again.prepare(task)
            assert handoff.prepare_attempt == spent
            result = again.finish(handoff)
            assert result.attempt == spent
            assert again.handovers == [Handover.PREPARED_AGAIN, handover]
            by_preparing_again.append(result)
    finally:
        backend.close()
    assert [result.attempt for result in by_preparing_again] == [2, 3]
    expected = by_file.reports[0]
    assert expected.probability_of_pathology is not None
    for result in [by_memory, *by_preparing_again]:
        (report,) = result.reports
        assert report.probability_of_pathology == pytest.approx(
            expected.probability_of_pathology, abs=1e-6
        )
        assert [finding.probability for finding in report.findings] == pytest.approx(
            [finding.probability for finding in expected.findings], abs=1e-6
        )
