"""The repository builder's reduced-precision gate (convertation/precision.py) on the tiny model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from convertation.errors import BuildError
from convertation.precision import (
    ParityTolerance,
    Precision,
    PrecisionRefused,
    load_parity_volumes,
    measure_parity,
    quantise_int8,
    reduce_encoder_precision,
)
from services.core.checksums import sha256_of
from services.core.config import InferenceSettings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.inference.optimised_graphs import CACHE_FOLDER
from services.core.model_metadata import ENCODER_NAME, read_metadata

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPE = (24, 40, 40)  # tests/data/ctvit_tiny.json


@pytest.fixture
def repository(tiny_model_repository: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repository"
    shutil.copytree(tiny_model_repository, copy, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    return copy


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(17)
    paths = []
    for index in range(2):
        path = tmp_path / f"reference_{index}.npy"
        np.save(path, rng.uniform(-1, 1, (1, 1, *TINY_SHAPE)).astype(np.float32))
        paths.append(path)
    return load_parity_volumes(paths, TINY_SHAPE)


def _encoder(repository: Path) -> Path:
    return repository / ENCODER_NAME / "1" / "model.onnx"


def _measured(repository: Path, volumes, tmp_path: Path):
    """What the gate will measure: the INT8 candidate's parity, computed here on its own."""
    codebook_size = read_metadata(repository).ctvit_config["ctvit"]["codebook_size"]
    candidate = quantise_int8(_encoder(repository), tmp_path / "candidate.onnx", codebook_size)
    return measure_parity(_encoder(repository), candidate, volumes)


def test_int8_is_deployed_when_its_parity_is_within_the_tolerance(repository, volumes, tmp_path):
    measured = _measured(repository, volumes, tmp_path)
    worst_cosine = min(p.cosine for p in measured)
    worst_diff = max(p.max_abs_diff for p in measured)
    assert worst_cosine < 1.0
    assert worst_diff > 0.0
    fp32_version = read_metadata(repository).model_version
    tolerance = ParityTolerance(min_cosine=worst_cosine - 1e-4, max_abs_diff=worst_diff + 1e-4)

    verdict = reduce_encoder_precision(repository, Precision.INT8, volumes, tolerance)

    assert verdict.accepted
    ops = {node.op_type for node in onnx.load(str(_encoder(repository))).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    metadata = read_metadata(repository)
    record = metadata.encoder_precision
    assert record.precision == "int8"
    assert record.min_cosine == tolerance.min_cosine
    assert [(p.volume, p.cosine, p.max_abs_diff) for p in record.parity] == [
        (p.volume, p.cosine, p.max_abs_diff) for p in measured
    ]
    encoder_weight = next(w for w in metadata.weights if w.model == ENCODER_NAME)
    assert encoder_weight.sha256 == sha256_of(_encoder(repository))
    assert metadata.model_version != fp32_version
    # The embedded backend serves the INT8 graph: its embedding is the INT8 session's.
    backend = OnnxRuntimeBackend(repository, InferenceSettings(onnx_intra_op_threads=1))
    try:
        volume = next(iter(volumes.values()))
        served = backend.infer(volume).embedding
    finally:
        backend.close()
    session = ort.InferenceSession(str(_encoder(repository)), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(served, session.run(None, {"volume": volume})[0], atol=1e-6)


def test_a_tolerance_just_beyond_the_measured_parity_refuses_and_keeps_fp32(
    repository, volumes, tmp_path
):
    measured = _measured(repository, volumes, tmp_path)
    worst_cosine = min(p.cosine for p in measured)
    before = sha256_of(_encoder(repository))
    tolerance = ParityTolerance(min_cosine=worst_cosine + 1e-5, max_abs_diff=1.0)
    with pytest.raises(PrecisionRefused, match=r"short by 1e-05") as refused:
        reduce_encoder_precision(repository, Precision.INT8, volumes, tolerance)
    assert not refused.value.verdict.accepted
    assert "the FP32 encoder is kept" in str(refused.value)
    assert sha256_of(_encoder(repository)) == before
    assert read_metadata(repository).encoder_precision.precision == "fp32"


def test_parity_volumes_must_fit_the_encoder(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="needs --parity-volumes"):
        load_parity_volumes([], TINY_SHAPE)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 1, 24, 40, 41), np.float32))
    with pytest.raises(BuildError, match=r"the encoder takes \[1, 1, 24, 40, 40\]"):
        load_parity_volumes([wrong], TINY_SHAPE)


@pytest.mark.slow  # builds a repository
def test_the_cli_refuses_and_keeps_a_complete_fp32_repository(tmp_path: Path) -> None:
    volume = tmp_path / "reference.npy"
    np.save(volume, np.random.default_rng(3).uniform(-1, 1, (1, 1, *TINY_SHAPE)).astype("float32"))
    repository = tmp_path / "repository"
    command = [sys.executable, "-m", "convertation.build_repository", "--output", str(repository)]
    command += ["--flavour", "python", "--demo", "--no-bpr", "--ctvit-config"]
    command += [str(PROJECT_ROOT / "tests" / "data" / "ctvit_tiny.json")]
    # Zero difference allowed: INT8 always changes the embedding somewhat, so the gate must
    # refuse whatever the CPU's rounding (the demo weights' verdict at the default tolerance
    # depends on whether a code flips: benchmarks/README.md shows the full-size one).
    command += ["--precision", "int8", "--parity-volumes", str(volume)]
    command += ["--parity-max-abs-diff", "0"]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert completed.returncode == 1
    assert "error: int8 encoder refused" in completed.stderr
    assert "reference.npy: " in completed.stderr
    assert "> 0 (over by" in completed.stderr
    metadata = read_metadata(repository)
    assert metadata.encoder_precision.precision == "fp32"
    backend = OnnxRuntimeBackend(repository, InferenceSettings(onnx_intra_op_threads=1))
    try:
        assert backend.infer(np.zeros((1, 1, *TINY_SHAPE), np.float32)).embedding.shape == (1, 16)
    finally:
        backend.close()
