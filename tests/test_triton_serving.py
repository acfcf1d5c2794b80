"""A real Triton server (the nvidia-pytriton wheel's tritonserver) serving a tiny
python-flavour repository built by the repository builder."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from stack_support import triton_server
from test_build_repository import run_chain

from convertation.build_repository import Flavour, build_repository, demo_models
from services.core.model_metadata import (
    BINARY_HEAD_NAME,
    ENCODER_NAME,
    ENSEMBLE_NAME,
    MULTILABEL_HEAD_NAME,
    read_metadata,
)
from services.triton.local_server import LocalTritonServer, TritonServerError, free_local_ports

pytestmark = pytest.mark.triton

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = PROJECT_ROOT / "tests" / "data" / "ctvit_tiny.json"
MODELS = (ENCODER_NAME, BINARY_HEAD_NAME, MULTILABEL_HEAD_NAME, ENSEMBLE_NAME)
OUTPUTS = ("embedding", "pathology_probability", "finding_probabilities")
READY_TIMEOUT_S = 120.0


def grpc_client(url: str) -> grpcclient.InferenceServerClient:
    # One full-size study is 221 MB: the gRPC message limits must be raised (gRPC's own
    # default is 4 MB); set them explicitly rather than rely on tritonclient's default.
    limit = grpcclient.MAX_GRPC_MESSAGE_SIZE
    return grpcclient.InferenceServerClient(
        url,
        channel_args=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ],
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("python_repository")
    build_repository(path, Flavour.PYTHON, demo_models(7, TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    log_file = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    with triton_server(repository, log_file, ready_timeout_s=READY_TIMEOUT_S) as running:
        yield running


def test_all_four_models_are_ready(server: LocalTritonServer) -> None:
    assert server.model_states() == dict.fromkeys(MODELS, "READY")
    client = grpc_client(server.grpc_url)
    assert client.is_server_ready()
    for name in MODELS:
        assert client.is_model_ready(name), name


def test_ensemble_over_grpc_equals_the_onnx_files_run_directly(
    server: LocalTritonServer, repository: Path
) -> None:
    metadata = read_metadata(repository)
    volume = np.random.default_rng(11).uniform(-1, 1, (2, 1, *metadata.target_shape))
    volume = volume.astype(np.float32)
    request = grpcclient.InferInput("volume", list(volume.shape), "FP32")
    request.set_data_from_numpy(volume)
    outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
    result = grpc_client(server.grpc_url).infer(
        ENSEMBLE_NAME, [request], outputs=outputs, client_timeout=60
    )
    expected = run_chain(repository, volume)
    for name in OUTPUTS:
        served = result.as_numpy(name)
        assert served is not None, name
        assert served.dtype == np.float32, name
        assert served.shape == expected[name].shape, name
        np.testing.assert_allclose(served, expected[name], rtol=0, atol=1e-5, err_msg=name)
    # The two studies of the batch must not be answered with the same numbers.
    assert not np.allclose(expected["embedding"][0], expected["embedding"][1])


def test_concurrent_requests_each_get_their_own_answer(
    server: LocalTritonServer, repository: Path
) -> None:
    """Requests sent together may be batched by Triton; model.py must split the batch back."""
    metadata = read_metadata(repository)
    rng = np.random.default_rng(5)
    volumes = [
        rng.uniform(-1, 1, (size, 1, *metadata.target_shape)).astype(np.float32)
        for size in (1, 2, 1)
    ]
    client = grpc_client(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    for index, volume in enumerate(volumes):
        request = grpcclient.InferInput("volume", list(volume.shape), "FP32")
        request.set_data_from_numpy(volume)
        client.async_infer(
            ENCODER_NAME,
            [request],
            callback=lambda result, error, index=index: answers.put((index, result, error)),
            client_timeout=60,
        )
    encoder = ort.InferenceSession(
        str(repository / ENCODER_NAME / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for _ in volumes:
        index, result, error = answers.get(timeout=60)
        assert error is None, error
        (expected,) = encoder.run(None, {"volume": volumes[index]})
        np.testing.assert_allclose(result.as_numpy("embedding"), expected, rtol=0, atol=1e-5)


def test_every_endpoint_binds_loopback(server: LocalTritonServer) -> None:
    log = server.log_file.read_text()
    started = dict(
        re.findall(r'Started (GRPCInferenceService|HTTPService|Metrics Service) at ([^"\s]+)', log)
    )
    assert started == {
        "GRPCInferenceService": f"127.0.0.1:{server.grpc_port}",
        "HTTPService": f"127.0.0.1:{server.http_port}",
        "Metrics Service": f"127.0.0.1:{server.metrics_port}",
    }
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        assert b"nv_inference_count" in response.read()


def test_a_model_that_cannot_load_fails_the_start_with_its_reason(
    repository: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    (broken / BINARY_HEAD_NAME / "1").mkdir(parents=True)
    (broken / BINARY_HEAD_NAME / "config.pbtxt").write_text(
        (repository / BINARY_HEAD_NAME / "config.pbtxt").read_text()
    )
    for source in (repository / BINARY_HEAD_NAME / "1").iterdir():
        if source.is_file() and source.name != "model.onnx":  # the python model, no model.onnx
            (broken / BINARY_HEAD_NAME / "1" / source.name).write_bytes(source.read_bytes())
    server = triton_server(broken, tmp_path / "broken.log", ready_timeout_s=READY_TIMEOUT_S)
    with pytest.raises(TritonServerError, match="ONNX file not found"):
        server.start()
    assert not server.is_running()


def test_cli_serves_until_sigterm_and_cleans_up(repository: Path, tmp_path: Path) -> None:
    http, grpc, metrics = free_local_ports(3)
    log_file = tmp_path / "cli.log"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "services.triton.local_server",
            "--model-repository", str(repository),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
            "--log-file", str(log_file),
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        client = grpc_client(f"127.0.0.1:{grpc}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(client):
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the CLI server never became ready"
            time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "tritonserver stopped" in output
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", grpc), timeout=2).close()


def _ready(client: grpcclient.InferenceServerClient) -> bool:
    try:
        return client.is_server_ready()
    except Exception:  # noqa: BLE001 - connection refused while the server starts
        return False
