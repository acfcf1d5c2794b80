"""The adapter's pure logic and housekeeping: previews, transport choice, waiting through a
model-server outage, leftovers of dead adapters, one stored result per task (no broker or
Triton needed; tests/test_adapter.py and tests/test_fault_suite.py run the real stack).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from report_support import screened_report

from services.adapter.delivery import unreadable_task_id, with_demo_flag
from services.adapter.handoff import load_model_input, save_model_input, sweep_prepared
from services.adapter.housekeeping import (
    abandoned_regions,
    sweep_shared_memory,
    sweep_temp_dirs,
    temp_base,
    use_own_temp_dir,
)
from services.adapter.model_server_wait import RetryingBackend
from services.broker.schemas import ResultFile, StudyResult, StudyTask, TaskStatus, encode_message
from services.broker.storage import HANDOFF_FILE, load_result, prepared_dir, store_result_once
from services.core.config import Backoff
from services.core.errors import ModelServerUnavailable, ModelServerWaitExceeded, WorkInterrupted
from services.core.inference.base import ModelOutputs
from services.core.schemas import ChestCheckEvidence
from services.triton.local_server import free_local_ports

QUICK = Backoff(initial_s=0.01, maximum_s=0.01)
IMMEDIATE = Backoff(initial_s=1e-6, maximum_s=1e-6)  # waits that cost no time at all


def test_preview_orientation_follows_the_radiological_convention() -> None:
    from services.core.previews import axial_slice, coronal_slice, preview_images

    # SLP+ volume: axis 0 toward superior, 1 toward the patient's left, 2 toward posterior.
    volume = np.full((10, 20, 30), -1.0, dtype=np.float32)
    volume[5, 18, 2] = 1.0  # far left, anterior, mid-height
    axial = axial_slice(volume, 0.5)
    assert axial.shape == (30, 20)  # rows: anterior -> posterior, columns: right -> left
    assert np.unravel_index(np.argmax(axial), axial.shape) == (2, 18)
    volume[:] = -1.0
    volume[9, 18, 15] = 1.0  # top (most superior) slice, far left
    coronal = coronal_slice(volume, 0.5)
    assert np.unravel_index(np.argmax(coronal), coronal.shape) == (0, 18)  # superior at the top
    images = preview_images(volume[None, None])
    assert set(images) == {"axial_30", "axial_50", "axial_70", "coronal_50"}
    assert all(image.dtype == np.uint8 for image in images.values())
    assert images["coronal_50"].shape == (10, 20)  # without a spacing: one row per slice
    # With the contract's spacing (1.5 mm slices, 0.75 mm pixels) a slice is two rows high.
    proportional = preview_images(volume[None, None], (1.5, 0.75, 0.75))
    assert proportional["coronal_50"].shape == (20, 20)


def test_transport_choice_and_output_shapes() -> None:
    from services.core.inference.base import pathology_probabilities as pathology_vector
    from services.core.inference.triton_transport import choose_transport, url_host

    assert url_host("127.0.0.1:8001") == "127.0.0.1"
    assert url_host("[::1]:8001") == "[::1]"
    assert choose_transport("auto", "localhost:8001") == "shared_memory"
    assert choose_transport("auto", "triton:8001") == "grpc"
    assert choose_transport("grpc", "127.0.0.1:8001") == "grpc"
    np.testing.assert_allclose(pathology_vector(np.array([[0.2], [0.7]])), [0.2, 0.7], rtol=1e-6)
    np.testing.assert_allclose(pathology_vector(np.array([[0.8, 0.2]])), [0.2], rtol=1e-6)


def test_retrying_backend_waits_through_transient_errors_and_stops_on_request() -> None:
    from services.adapter.model_server_wait import RetryingBackend
    from services.core.errors import ModelServerUnavailable, WorkInterrupted
    from services.core.inference.base import ModelOutputs

    class FlakyBackend:  # a stand-in for Triton: fails twice, then answers
        name = "flaky"
        metadata = None
        body_part_model = None
        computes_on_this_cpu = False

        def __init__(self) -> None:
            self.calls = 0

        def infer(self, volume: np.ndarray) -> ModelOutputs:
            self.calls += 1
            if self.calls <= 2:
                raise ModelServerUnavailable("unavailable")
            return ModelOutputs(volume, volume[:, 0], volume)

        def close(self) -> None:
            pass

    stop = threading.Event()
    notes: list[str] = []
    flaky = FlakyBackend()
    flaky.computes_on_this_cpu = True
    retrying = RetryingBackend(flaky, stop, on_retry=notes.append, backoff=QUICK)
    assert retrying.computes_on_this_cpu  # passed on: the batch's SR timing reads it
    outputs = retrying.infer(np.ones((1, 2), dtype=np.float32))
    assert flaky.calls == 3
    assert retrying.retries == 2
    assert len(notes) == 2
    assert outputs.pathology_probability.tolist() == [1.0]
    stop.set()
    with pytest.raises(WorkInterrupted):
        RetryingBackend(FlakyBackend(), stop, backoff=QUICK).infer(np.ones((1, 2)))


class _DownBackend:
    """A model server that is never there."""

    name = "down"
    metadata = None
    body_part_model = None
    computes_on_this_cpu = False

    def infer(self, volume: np.ndarray) -> ModelOutputs:
        raise ModelServerUnavailable("unavailable")

    def close(self) -> None:
        pass


def test_a_study_waits_for_the_model_server_only_up_to_its_limit() -> None:
    class ClockedStop(threading.Event):
        """A stop event whose waits move a fake clock instead of sleeping."""

        def __init__(self) -> None:
            super().__init__()
            self.now = 0.0

        def wait(self, timeout: float | None = None) -> bool:
            self.now += 4.0
            return False

    stop = ClockedStop()
    retrying = RetryingBackend(
        _DownBackend(), stop, backoff=IMMEDIATE, wait_limit_s=10.0, clock=lambda: stop.now
    )
    with pytest.raises(ModelServerWaitExceeded, match="model_server_wait_limit_s"):
        retrying.infer(np.zeros((1, 1), dtype=np.float32))
    assert retrying.retries == 4  # failures after 0, 4 and 8 s are retried; after 12 s: over


def test_retrying_backend_waits_for_the_body_part_model_too() -> None:
    """The chest check's body-part regression calls go to the same server: an outage there
    is waited out like one during inference, within the same limit."""
    from services.core.body_part.bpr_detector import BodyPartRegressionModel
    from services.core.body_part.bpr_settings import demo_inference_settings

    calls: list[int] = []

    def flaky_scores(slices: np.ndarray) -> np.ndarray:
        calls.append(len(slices))
        if len(calls) <= 2:
            raise ModelServerUnavailable("unavailable")
        return np.arange(len(slices), dtype=np.float32).reshape(-1, 1)

    class ServerWithBodyPartModel(_DownBackend):
        body_part_model = BodyPartRegressionModel(
            score_slices=flaky_scores,
            settings=demo_inference_settings(),
            demo=True,
            source="test",
        )

    backend = RetryingBackend(ServerWithBodyPartModel(), threading.Event(), backoff=IMMEDIATE)
    assert backend.body_part_model is not None
    scores = backend.body_part_model.score_slices(np.zeros((3, 1, 128, 128), np.float32))
    assert scores.ravel().tolist() == [0.0, 1.0, 2.0]
    assert calls == [3, 3, 3]
    assert backend.retries == 2
    assert backend.body_part_model.settings == ServerWithBodyPartModel.body_part_model.settings

    stop = threading.Event()
    stop.set()
    stopped = RetryingBackend(ServerWithBodyPartModel(), stop, backoff=IMMEDIATE)
    with pytest.raises(WorkInterrupted):
        stopped.body_part_model.score_slices(np.zeros((1, 1, 128, 128), np.float32))
    assert RetryingBackend(_DownBackend(), stop, backoff=IMMEDIATE).body_part_model is None


def test_only_regions_of_dead_adapters_are_swept(tmp_path: Path) -> None:
    (port,) = free_local_ports(1)  # no Triton there: the files are swept all the same
    for name in ("cts_111_0123456789ab", "cts_probe_111_01234567", "cts_222_0123456789ab"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    (tmp_path / "triton_python_backend_shm_region_1").write_bytes(b"")  # not ours
    (tmp_path / "cts_111_notaregion").write_bytes(b"")
    alive = {222}.__contains__
    assert abandoned_regions(["cts_111_0123456789ab", "cts_222_0123456789ab"], alive) == [
        "cts_111_0123456789ab"
    ]
    removed = sweep_shared_memory(f"127.0.0.1:{port}", shm_dir=tmp_path, alive=alive)
    assert removed == ["cts_111_0123456789ab", "cts_probe_111_01234567"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cts_111_notaregion",
        "cts_222_0123456789ab",
        "triton_python_backend_shm_region_1",
    ]


def test_an_adapter_keeps_its_temporary_files_apart_and_dead_ones_are_swept(
    tmp_path: Path,
) -> None:
    (tmp_path / "cts-adapter-111" / "cts-intake-x" / "files").mkdir(parents=True)
    (tmp_path / "cts-adapter-111" / "cts-intake-x" / "files" / "slice.dcm").write_bytes(b"x")
    (tmp_path / "cts-adapter-222").mkdir()
    (tmp_path / "cts-intake-other").mkdir()  # not an adapter's folder: left alone
    alive = {222}.__contains__
    assert sweep_temp_dirs(tmp_path, alive) == ["cts-adapter-111"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cts-adapter-222", "cts-intake-other"]
    before = tempfile.tempdir
    try:
        own = use_own_temp_dir(tmp_path)
        assert own.name == f"cts-adapter-{os.getpid()}"
        assert Path(tempfile.mkdtemp(prefix="cts-intake-")).parent == own
        assert temp_base() == tmp_path
        sweep_temp_dirs(tmp_path)  # the real check: pid 222 is gone here, this one is not
        assert own.is_dir()
        assert not (tmp_path / "cts-adapter-222").exists()
    finally:
        tempfile.tempdir = before


def test_prepared_folders_of_finished_tasks_are_swept(tmp_path: Path) -> None:
    """An adapter killed between storing a result and removing the task's prepared folder
    leaves the model inputs behind; the housekeeping sweep removes them, and only them."""
    for task_id in ("finished", "waiting", "half-prepared"):
        folder = prepared_dir(tmp_path, task_id)
        folder.mkdir(parents=True)
        (folder / "study0.npy").write_bytes(b"model input")
    (prepared_dir(tmp_path, "waiting") / HANDOFF_FILE).write_text("{}")
    store_result_once(tmp_path, StudyResult(task_id="finished", status=TaskStatus.COMPLETED))
    assert sweep_prepared(tmp_path) == ["finished"]
    assert not prepared_dir(tmp_path, "finished").exists()
    # Waiting for the model, or prepared again on its next delivery: both are kept.
    assert prepared_dir(tmp_path, "waiting").exists()
    assert prepared_dir(tmp_path, "half-prepared").exists()
    assert sweep_prepared(tmp_path / "no-storage-yet") == []


def test_two_preparations_of_one_task_never_write_into_one_file(tmp_path: Path) -> None:
    """A task redelivered while its first preparation still runs is prepared twice at once:
    each writer has its own partial file, so the input left is one writer's, whole."""
    folder = prepared_dir(tmp_path, "twice")
    inputs = [np.full((1, 1, 64, 256, 256), value, dtype=np.float32) for value in (1.0, 2.0)]
    barrier = threading.Barrier(len(inputs))
    errors: list[BaseException] = []

    def prepare(model_input: np.ndarray) -> None:
        barrier.wait()
        try:
            for _ in range(5):
                save_model_input(folder, "study1.npy", model_input)
        except Exception as error:  # noqa: BLE001 - every error is asserted below
            errors.append(error)

    writers = [threading.Thread(target=prepare, args=(item,)) for item in inputs]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert errors == []
    written = load_model_input(folder, "study1.npy")
    assert any(np.array_equal(written, item) for item in inputs)
    assert sorted(path.name for path in folder.iterdir()) == ["study1.npy"]  # no partial left


def test_the_first_stored_result_of_a_task_stays_its_only_result(tmp_path: Path) -> None:
    first = StudyResult(task_id="task-1", status=TaskStatus.COMPLETED, adapter_id="a", attempt=1)
    second = StudyResult(task_id="task-1", status=TaskStatus.COMPLETED, adapter_id="b", attempt=2)
    assert store_result_once(tmp_path, first) == first
    assert store_result_once(tmp_path, second) == first  # the second writer publishes the first
    assert load_result(tmp_path, "task-1") == first
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["task-1.json"]  # no temp left
    # An unreadable leftover is replaced rather than kept forever.
    (tmp_path / "results" / "task-2.json").write_text("{not json")
    third = StudyResult(task_id="task-2", status=TaskStatus.FAILED, error="x")
    assert store_result_once(tmp_path, third) == third
    assert load_result(tmp_path, "task-2") == third


def test_a_result_sent_again_is_the_first_copy_byte_for_byte(tmp_path: Path) -> None:
    """The first reply is the stored result as computed; a task redelivered without its
    delivered mark (its adapter killed before it) republishes the result loaded from storage. A
    submitter drops the second by its bytes or its task id (services/broker/schemas.py),
    so the two must be the same bytes: floats, times and every report field round trip."""
    started = datetime(2026, 12, 6, 4, 28, 29, 298_123, tzinfo=UTC)
    evidence = ChestCheckEvidence(
        is_chest=True,
        reason="chest by tags and image",
        image_verdict=True,
        image_detector="lung_air",
        image_evidence={
            "lung_fraction": 0.1 + 0.2,
            "scored_slices": 12,
            "air": 3.0,
            "part": "chest",
        },
        coverage_mm=299.5,
    )
    reports = [
        screened_report(time_of_processing=0.1 + 0.2, chest_check=evidence),
        screened_report(finding_scale=7),
    ]
    # As the model stage makes it: the deployment's demo flag set on every row (model_copy,
    # which validates nothing), then stored once.
    computed = StudyResult(
        task_id="task-1",
        correlation_id="task-1",
        status=TaskStatus.COMPLETED,
        reports=reports,
        files=[ResultFile(kind="xlsx", path="results/task-1/report.xlsx")],
        original_filename="chest.zip",
        adapter_id="adapter-2",
        started_at=started,
        finished_at=started + timedelta(seconds=1 / 3),
        seconds=1 / 3,
        prepare_seconds=2 / 3,
        model_seconds=1e-7,
    )
    first_reply = encode_message(store_result_once(tmp_path, with_demo_flag(computed, False)))
    assert [report["demo_weights"] for report in json.loads(first_reply)["reports"]] == [False] * 2
    stored = load_result(tmp_path, "task-1")
    assert stored is not None
    assert encode_message(stored) == first_reply


def test_an_unreadable_task_is_answered_under_an_id_the_submitter_knows() -> None:

    task = StudyTask(study_path="uploads/x/y.zip", original_filename="y.zip")
    body = task.model_dump_json().replace('"schema_version":1', '"schema_version":9').encode()
    assert unreadable_task_id(body, "corr-1", "msg-1") == task.task_id
    assert unreadable_task_id(b"\x00garbage", "corr-1", "msg-1") == "corr-1"
    assert unreadable_task_id(b"[]", None, "msg-1") == "msg-1"
    generated = unreadable_task_id(b"{}", "../../etc", None)
    assert generated.startswith("unreadable-")
    assert "/" not in generated
