"""A real Triton (the nvidia-pytriton wheel's tritonserver) serving ``body_part_regression``
from the tiny demo repository: the TritonBackend's scores equal ONNX Runtime run directly on
the same graph, over gRPC and shared memory, in batches larger than the served maximum and
from several threads; the pipeline's BPR evidence is the same through both backends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.core.config import Settings, load_settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.inference.triton_backend import TritonBackend
from services.core.model_metadata import BODY_PART_REGRESSION_NAME, read_metadata
from services.core.pipeline import process_input
from services.triton.local_server import LocalTritonServer, free_local_ports

pytestmark = pytest.mark.triton

# Triton's python flavour runs the same ONNX file with onnxruntime: the scores may differ
# only by float summation order.
PARITY_TOLERANCE = 1e-5
CHEST = "chest_ct_lung_dx_a0002"


@pytest.fixture(scope="module")
def server(tiny_model_repository: Path, tmp_path_factory) -> Iterator[LocalTritonServer]:
    http, grpc, metrics = free_local_ports(3)
    log = tmp_path_factory.mktemp("bpr-triton-log") / "tritonserver.log"
    with LocalTritonServer(
        tiny_model_repository, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log
    ) as running:
        yield running


@pytest.fixture
def settings(tiny_model_repository: Path, server: LocalTritonServer) -> Settings:
    settings = load_settings(environ={})
    settings.inference.backend = "triton"
    settings.inference.model_repository = tiny_model_repository
    settings.inference.triton_url = server.grpc_url
    settings.inference.triton_timeout_s = 60
    settings.inference.onnx_intra_op_threads = 1
    return settings


@pytest.fixture(scope="module")
def network_input(reference_dir: Path) -> np.ndarray:
    """The chest fixture's 30 slices as the network sees them, and 12 random ones: 42
    slices, more than one served batch (32)."""
    chest = np.load(reference_dir / "bpr_preprocess_chest_ct_lung_dx.npz")["bpr_input"]
    noise = np.random.default_rng(5).uniform(-1, 1, (12, 1, 128, 128)).astype(np.float32)
    return np.concatenate([chest.astype(np.float32), noise])


def direct_scores(repository: Path, batch: np.ndarray) -> np.ndarray:
    path = repository / BODY_PART_REGRESSION_NAME / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["scores"], {"slices": batch})[0]


def test_the_server_serves_it_beside_the_ensemble(server: LocalTritonServer) -> None:
    states = server.model_states()
    assert states[BODY_PART_REGRESSION_NAME] == "READY"
    assert states["chest_screening"] == "READY"


@pytest.mark.parametrize("transport", ["grpc", "shared_memory"])
def test_triton_scores_equal_onnxruntime(
    settings: Settings, tiny_model_repository: Path, network_input: np.ndarray, transport: str
) -> None:
    inference = settings.inference.model_copy(update={"triton_transport": transport})
    backend = TritonBackend(inference)
    try:
        model = backend.body_part_model
        assert model is not None
        assert model.demo
        embedded = OnnxRuntimeBackend(tiny_model_repository, inference).body_part_model
        assert embedded is not None
        assert model.settings == embedded.settings
        served = model.score_slices(network_input)
        again = model.score_slices(network_input[:4])  # a reused region, new numbers
        stats = backend.stats.as_dict()
    finally:
        backend.close()
    expected = direct_scores(tiny_model_repository, network_input)
    assert served.shape == (len(network_input), 1)
    assert served.dtype == np.float32
    difference = float(np.max(np.abs(served - expected)))
    assert difference <= PARITY_TOLERANCE, difference
    np.testing.assert_allclose(again, expected[:4], rtol=0, atol=PARITY_TOLERANCE)
    assert np.ptp(expected) > 0  # different slices, different scores
    moved = stats["shared_memory_bytes" if transport == "shared_memory" else "grpc_request_bytes"]
    assert moved == network_input.nbytes + network_input[:4].nbytes
    assert stats["requests"] == 3  # 32 + 10 slices, then 4


def test_requests_from_several_threads_each_get_their_own_scores(
    settings: Settings, tiny_model_repository: Path, network_input: np.ndarray
) -> None:
    """Triton may batch concurrent requests together; each must get its own slices back."""
    backend = TritonBackend(settings.inference)
    model = backend.body_part_model
    assert model is not None
    parts = [network_input[i : i + 3] for i in range(0, 24, 3)]
    results: dict[int, np.ndarray] = {}

    def score(index: int) -> None:
        results[index] = model.score_slices(parts[index])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(parts))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        backend.close()
    expected = direct_scores(tiny_model_repository, network_input[:24])
    got = np.concatenate([results[i] for i in range(len(parts))])
    np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_TOLERANCE)


def test_the_pipeline_sees_the_same_anatomy_through_both_backends(
    settings: Settings, tiny_model_repository: Path, fixtures_dir: Path
) -> None:
    triton = TritonBackend(settings.inference)
    embedded = OnnxRuntimeBackend(tiny_model_repository, settings.inference)
    try:
        (served,) = process_input(fixtures_dir / CHEST, backend=triton, settings=settings)
        (local,) = process_input(fixtures_dir / CHEST, backend=embedded, settings=settings)
    finally:
        triton.close()
        embedded.close()
    assert read_metadata(tiny_model_repository).body_part_regression is not None
    for report in (served, local):
        assert report.succeeded, report.failure_reason
        evidence = report.chest_check
        assert evidence is not None
        assert evidence.body_part_regression is not None
        assert evidence.body_part_regression.demo
        assert not evidence.body_part_regression_decides
    assert served.chest_check is not None
    assert local.chest_check is not None
    got = served.chest_check.body_part_regression
    want = local.chest_check.body_part_regression
    assert got is not None
    assert want is not None
    assert got.positions_mm == want.positions_mm
    # Transformed scores are raw scores x 100 / (table span 1.0): 1e-5 raw is 1e-3 here.
    np.testing.assert_allclose(
        got.transformed_scores, want.transformed_scores, rtol=0, atol=100 * PARITY_TOLERANCE
    )
    assert served.warnings == local.warnings
