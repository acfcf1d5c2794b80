"""The embedded onnxruntime backend on the tiny demo repository built by the real builder."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from services.core.config import InferenceSettings, Settings
from services.core.inference import create_backend
from services.core.inference.base import pathology_probabilities
from services.core.inference.onnxruntime_backend import (
    ModelRepositoryError,
    OnnxRuntimeBackend,
    session_options,
)
from services.core.labels import FINDING_LABELS


@pytest.fixture(scope="module")
def backend(tiny_model_repository):
    backend = OnnxRuntimeBackend(tiny_model_repository, InferenceSettings(onnx_intra_op_threads=1))
    yield backend
    backend.close()


def test_outputs_have_the_protocol_shapes_and_ranges(backend):
    rng = np.random.default_rng(0)
    volumes = rng.uniform(-1, 1, size=(2, 1, *backend.metadata.target_shape)).astype(np.float32)
    outputs = backend.infer(volumes)
    assert outputs.embedding.shape == (2, backend.metadata.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(outputs.embedding, axis=1), 1.0, atol=1e-5)
    assert outputs.pathology_probability.shape == (2,)
    assert outputs.finding_probabilities.shape == (2, len(FINDING_LABELS))
    for array in (outputs.pathology_probability, outputs.finding_probabilities):
        assert array.dtype == np.float32
        assert np.all((array >= 0) & (array <= 1))
    # A batch gives what its members give alone.
    alone = backend.infer(volumes[1:])
    np.testing.assert_allclose(
        alone.finding_probabilities[0], outputs.finding_probabilities[1], atol=1e-5
    )
    assert backend.metadata.demo is True
    assert backend.name == "onnxruntime"


def test_wrong_input_shape_is_a_clear_error(backend):
    with pytest.raises(ValueError, match="model input must be"):
        backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))


def test_factory_picks_onnxruntime(tiny_model_repository):
    settings = Settings.model_validate(
        {"inference": {"backend": "onnxruntime", "model_repository": str(tiny_model_repository)}}
    )
    backend = create_backend(settings)
    try:
        assert isinstance(backend, OnnxRuntimeBackend)
        assert backend.metadata.target_shape == (24, 40, 40)
    finally:
        backend.close()


def test_missing_metadata_is_reported_with_the_build_command(tiny_model_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(tiny_model_repository, repository)
    (repository / "chest_screening" / "metadata.json").unlink()
    with pytest.raises(ModelRepositoryError, match=r"chest_screening/metadata.json") as error:
        OnnxRuntimeBackend(repository, InferenceSettings())
    assert "python -m convertation.build_repository" in str(error.value)


def test_session_options_follow_the_settings():
    options = session_options(3)
    assert options.intra_op_num_threads == 3
    assert options.enable_mem_pattern is True
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_ALL")


def test_pathology_column_reads_every_head_layout():
    np.testing.assert_allclose(pathology_probabilities(np.array([[0.3], [0.6]])), [0.3, 0.6])
    np.testing.assert_allclose(pathology_probabilities(np.array([[0.7, 0.3]])), [0.3])
    np.testing.assert_allclose(pathology_probabilities(np.array([0.4])), [0.4])
    with pytest.raises(ValueError, match="unexpected binary head output"):
        pathology_probabilities(np.zeros((1, 3)))
