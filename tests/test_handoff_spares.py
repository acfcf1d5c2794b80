"""A finished task's model input files are kept as spares and overwritten by the next
preparations (services/adapter/handoff.py): the content is always the new study's, a spare
goes to one preparation only, and none is kept long or beyond SPARE_INPUTS."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from services.adapter.handoff import (
    SPARE_INPUT_MAX_AGE_S,
    SPARE_INPUTS,
    load_model_input,
    remove_prepared,
    save_model_input,
    sweep_prepared,
)
from services.broker.storage import prepared_dir, spare_inputs_dir

SHAPE = (1, 1, 4, 8, 8)


def model_input(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def prepare(storage: Path, task_id: str, seed: int, studies: int = 1) -> list[np.ndarray]:
    """What the preparation stage writes for a task of ``studies`` chest CTs."""
    arrays = [model_input(seed + index) for index in range(studies)]
    for index, array in enumerate(arrays):
        save_model_input(
            prepared_dir(storage, task_id), index, array, spares=spare_inputs_dir(storage)
        )
    return arrays


def spares(storage: Path) -> list[Path]:
    folder = spare_inputs_dir(storage)
    return sorted(folder.iterdir()) if folder.exists() else []


def test_a_finished_task_s_input_is_overwritten_in_place_by_the_next(tmp_path: Path) -> None:
    prepare(tmp_path, "first", seed=1)
    remove_prepared(tmp_path, "first")
    assert not prepared_dir(tmp_path, "first").exists()
    (spare,) = spares(tmp_path)
    inode = spare.stat().st_ino

    second = prepare(tmp_path, "second", seed=2)
    written = prepared_dir(tmp_path, "second") / "study1.npy"
    assert spares(tmp_path) == []  # taken
    assert written.stat().st_ino == inode  # the same file, so the same cached pages
    np.testing.assert_array_equal(load_model_input(written.parent, written.name), second[0])


def test_a_longer_spare_is_cut_to_the_new_input(tmp_path: Path) -> None:
    spare_inputs_dir(tmp_path).mkdir(parents=True)
    np.save(spare_inputs_dir(tmp_path) / "old.npy", model_input(1, (1, 1, 16, 8, 8)))
    (array,) = prepare(tmp_path, "task", seed=2)
    written = prepared_dir(tmp_path, "task") / "study1.npy"
    fresh = tmp_path / "fresh.npy"
    np.save(fresh, array)
    assert written.read_bytes() == fresh.read_bytes()


def test_no_more_than_spare_inputs_are_kept(tmp_path: Path) -> None:
    prepare(tmp_path, "three-studies", seed=1, studies=SPARE_INPUTS + 1)
    remove_prepared(tmp_path, "three-studies")
    assert len(spares(tmp_path)) == SPARE_INPUTS
    prepare(tmp_path, "another", seed=9)  # takes one
    prepare(tmp_path, "and-another", seed=10)  # takes the other
    assert spares(tmp_path) == []
    assert not prepared_dir(tmp_path, "three-studies").exists()


def test_each_spare_goes_to_one_preparation_only(tmp_path: Path) -> None:
    prepare(tmp_path, "done", seed=1)
    remove_prepared(tmp_path, "done")
    (spare,) = spares(tmp_path)
    inode = spare.stat().st_ino
    barrier = threading.Barrier(4)
    written: dict[str, np.ndarray] = {}

    def preparation(task_id: str, seed: int) -> None:
        barrier.wait()
        written[task_id] = prepare(tmp_path, task_id, seed)[0]

    threads = [threading.Thread(target=preparation, args=(f"task-{n}", n + 10)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    paths = {task: prepared_dir(tmp_path, task) / "study1.npy" for task in written}
    assert sum(path.stat().st_ino == inode for path in paths.values()) == 1
    for task, path in paths.items():
        np.testing.assert_array_equal(np.load(path), written[task])


def test_the_sweep_deletes_spares_unused_for_their_time(tmp_path: Path) -> None:
    prepare(tmp_path, "old", seed=1)
    prepare(tmp_path, "recent", seed=2)
    remove_prepared(tmp_path, "old")
    (old,) = spares(tmp_path)
    written_long_ago = time.time() - SPARE_INPUT_MAX_AGE_S - 1
    os.utime(old, (written_long_ago, written_long_ago))
    remove_prepared(tmp_path, "recent")
    assert len(spares(tmp_path)) == 2
    sweep_prepared(tmp_path)
    (kept,) = spares(tmp_path)
    assert kept != old
