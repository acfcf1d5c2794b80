"""The optimised-graph cache of ONNX Runtime sessions and the embedded backend's background load."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.core.config import InferenceSettings
from services.core.errors import ModelRepositoryError
from services.core.inference import optimised_graphs
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend, session_options
from services.core.inference.optimised_graphs import (
    CACHE_FOLDER,
    OPTIMISED_NAME,
    WEIGHTS_NAME,
    cache_key,
    create_session,
)
from services.core.model_metadata import ENCODER_NAME

CPU = ["CPUExecutionProvider"]


def options() -> ort.SessionOptions:
    return session_options(1)


@pytest.fixture
def encoder_copy(tiny_model_repository: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "encoder" / "1"
    folder.mkdir(parents=True)
    return Path(
        shutil.copyfile(
            tiny_model_repository / ENCODER_NAME / "1" / "model.onnx", folder / "model.onnx"
        )
    )


@pytest.fixture
def volume(tiny_model_repository: Path) -> np.ndarray:
    shape = (2, 1, 24, 40, 40)  # tests/data/ctvit_tiny.json
    return np.random.default_rng(5).uniform(-1, 1, shape).astype(np.float32)


def _embedding(session: ort.InferenceSession, volume: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: volume})[0]


def test_the_second_session_starts_from_the_saved_graph_and_computes_the_same(
    encoder_copy: Path, volume: np.ndarray
) -> None:
    plain = ort.InferenceSession(str(encoder_copy), options(), providers=CPU)
    first, how_first = create_session(encoder_copy, options, CPU)
    second, how_second = create_session(encoder_copy, options, CPU)
    assert (how_first, how_second) == ("saved", "cached")
    entry = encoder_copy.parent / CACHE_FOLDER / cache_key(encoder_copy, options(), CPU)
    assert (entry / OPTIMISED_NAME).is_file()
    assert (entry / WEIGHTS_NAME).stat().st_size > 0
    expected = _embedding(plain, volume)
    np.testing.assert_array_equal(_embedding(first, volume), expected)
    np.testing.assert_array_equal(_embedding(second, volume), expected)


def test_a_changed_model_gets_a_new_entry_and_the_old_one_goes(encoder_copy: Path) -> None:
    create_session(encoder_copy, options, CPU)
    old_key = cache_key(encoder_copy, options(), CPU)
    stat = encoder_copy.stat()
    os.utime(encoder_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    new_key = cache_key(encoder_copy, options(), CPU)
    assert new_key != old_key
    assert create_session(encoder_copy, options, CPU)[1] == "saved"
    entries = sorted(p.name for p in (encoder_copy.parent / CACHE_FOLDER).iterdir())
    assert entries == [new_key]


def test_a_damaged_entry_is_dropped_and_saved_again(encoder_copy: Path, volume) -> None:
    create_session(encoder_copy, options, CPU)
    entry = encoder_copy.parent / CACHE_FOLDER / cache_key(encoder_copy, options(), CPU)
    (entry / WEIGHTS_NAME).write_bytes(b"truncated")
    session, how = create_session(encoder_copy, options, CPU)
    assert how == "saved"
    plain = ort.InferenceSession(str(encoder_copy), options(), providers=CPU)
    np.testing.assert_array_equal(_embedding(session, volume), _embedding(plain, volume))


def test_a_read_only_repository_uses_the_user_cache(encoder_copy: Path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    # The tests run as root, for whom no folder is read-only: the repository's folder is
    # declared read-only instead.
    writable = optimised_graphs._writable
    monkeypatch.setattr(
        optimised_graphs,
        "_writable",
        lambda folder: folder.parent != encoder_copy.parent and writable(folder),
    )
    assert create_session(encoder_copy, options, CPU)[1] == "saved"
    assert create_session(encoder_copy, options, CPU)[1] == "cached"
    assert not (encoder_copy.parent / CACHE_FOLDER).exists()
    assert len(list((tmp_path / "user-cache").rglob(OPTIMISED_NAME))) == 1
    monkeypatch.setattr(optimised_graphs, "_writable", lambda folder: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-cache"))
    assert create_session(encoder_copy, options, CPU)[1] == "uncached"


def test_without_the_cache_nothing_is_written(encoder_copy: Path) -> None:
    assert create_session(encoder_copy, options, CPU, use_cache=False)[1] == "uncached"
    assert not (encoder_copy.parent / CACHE_FOLDER).exists()


def test_a_model_that_cannot_load_fails_at_first_use_with_its_name(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(tiny_model_repository, repository, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    (repository / ENCODER_NAME / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    backend = OnnxRuntimeBackend(repository, InferenceSettings(onnx_intra_op_threads=1))
    try:
        with pytest.raises(ModelRepositoryError, match=f"{ENCODER_NAME} cannot be loaded"):
            backend.infer(np.zeros((1, 1, 24, 40, 40), np.float32))
    finally:
        backend.close()


def test_the_backend_reports_how_each_session_started(tiny_model_repository, tmp_path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(tiny_model_repository, repository, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    settings = InferenceSettings(onnx_intra_op_threads=1)
    for expected in ("saved", "cached"):
        backend = OnnxRuntimeBackend(repository, settings)
        backend.wait_until_loaded()
        assert backend.session_starts[ENCODER_NAME] == expected
        assert set(backend.session_starts.values()) == {expected}
        backend.close()
