"""``body_part_regression`` in the model repository: its config in every flavour, the demo
build, a bpreg model folder through the CLI, ``--no-bpr``, the TensorRT step, and the
embedded backend that loads it (or refuses a broken repository)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from test_bpr_scores import SETTINGS as REAL_SETTINGS
from tritonclient.grpc import model_config_pb2

from convertation.bpr.loading import MODEL_FILE, write_model_folder
from convertation.bpr.network import BodyPartRegressionNet, demo_state_dict
from convertation.build_repository import BPR_SETTINGS_RELATIVE_PATH, build_repository, main
from convertation.model_sources import demo_body_part, demo_models, sha256_of
from convertation.python_backend import TEMPLATE_MODEL_PY
from convertation.tensorrt_plans import BPR_TRT_SCRIPT, tensorrt_commands
from convertation.triton_config import Flavour, config_text, flavour_header, model_configs
from services.core.body_part.bpr_settings import BprInferenceSettings
from services.core.config import InferenceSettings
from services.core.errors import ModelRepositoryError
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.model_metadata import BODY_PART_REGRESSION_NAME, read_metadata

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = PROJECT_ROOT / "tests" / "data" / "ctvit_tiny.json"
COMMITTED = PROJECT_ROOT / "model_repository_running" / BODY_PART_REGRESSION_NAME / "config.pbtxt"
SEED = 4
FP32 = model_config_pb2.DataType.Value("TYPE_FP32")
EMBEDDED = InferenceSettings(onnx_intra_op_threads=1)


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def slices(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (count, 1, 128, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python flavour with demo encoder, heads and body-part regression model."""
    models = demo_models(SEED, TINY_CONFIG)
    models.body_part_regression = demo_body_part(SEED)
    repository = tmp_path_factory.mktemp("bpr_repository")
    build_repository(repository, Flavour.PYTHON, models)
    return repository


@pytest.mark.parametrize("flavour", list(Flavour), ids=lambda f: f.value)
def test_the_config_takes_batches_of_slices_in_every_flavour(flavour: Flavour) -> None:
    configs = model_configs(flavour, (24, 40, 40), 32, body_part_regression=True)
    config = configs[BODY_PART_REGRESSION_NAME]
    assert config == parse_config_text(config_text(config))
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("slices", FP32, [1, 128, 128])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("scores", FP32, [1])]
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16, 32]
    expected = {
        Flavour.PYTHON: ("python", ""),
        Flavour.ONNXRUNTIME: ("", "onnxruntime_onnx"),
        Flavour.TENSORRT: ("", "tensorrt_plan"),
    }[flavour]
    assert (config.backend, config.platform) == expected
    assert BODY_PART_REGRESSION_NAME not in model_configs(flavour, (24, 40, 40), 32)


def parse_config_text(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_the_committed_config_is_what_the_builder_writes() -> None:
    """Regenerate with `python -m convertation.build_repository --output
    model_repository_running --flavour python --demo`."""
    configs = model_configs(Flavour.PYTHON, (240, 480, 480), 512, body_part_regression=True)
    expected = config_text(
        configs[BODY_PART_REGRESSION_NAME], header=flavour_header(Flavour.PYTHON)
    )
    assert COMMITTED.read_text() == expected


@pytest.mark.slow  # builds a repository (ONNX export of VGG16)
def test_the_demo_build_serves_it_with_its_table_and_provenance(demo_repository: Path) -> None:
    folder = demo_repository / BODY_PART_REGRESSION_NAME
    assert parse_config(folder / "config.pbtxt").name == BODY_PART_REGRESSION_NAME
    assert (folder / "1" / "model.py").read_text() == TEMPLATE_MODEL_PY.read_text()
    metadata = read_metadata(demo_repository)
    info = metadata.body_part_regression
    assert info is not None
    assert info.demo
    assert info.max_batch_size == 32
    assert info.inference_settings == BPR_SETTINGS_RELATIVE_PATH
    assert info.source == f"demo: seeded (seed={SEED}), invented lookup table"
    table = BprInferenceSettings.model_validate_json(
        (demo_repository / BPR_SETTINGS_RELATIVE_PATH).read_text()
    )
    assert table.demo
    (weight,) = [w for w in metadata.weights if w.model == BODY_PART_REGRESSION_NAME]
    assert weight.path == f"{BODY_PART_REGRESSION_NAME}/1/model.onnx"
    assert weight.sha256 == sha256_of(demo_repository / weight.path)
    # The encoder's version is the repository's version, whatever else it serves.
    assert metadata.model_version.startswith("demo-")

    # The exported graph computes the seeded network.
    network = BodyPartRegressionNet()
    network.load_state_dict({k: torch.from_numpy(v) for k, v in demo_state_dict(SEED).items()})
    batch = slices(3)
    with torch.no_grad():
        expected = network.eval()(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(
        str(demo_repository / weight.path), providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(["scores"], {"slices": batch})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.slow  # builds a repository (ONNX export of VGG16)
def test_the_embedded_backend_scores_with_the_repository_graph(demo_repository: Path) -> None:
    backend = OnnxRuntimeBackend(demo_repository, EMBEDDED)
    try:
        model = backend.body_part_model
        assert model is not None
        assert model.demo
        assert model.settings.demo
        batch = slices(40, seed=1)  # more than one served batch (32)
        scores = model.score_slices(batch)
        session = ort.InferenceSession(
            str(demo_repository / BODY_PART_REGRESSION_NAME / "1" / "model.onnx"),
            providers=["CPUExecutionProvider"],
        )
        (expected,) = session.run(["scores"], {"slices": batch})
        assert scores.shape == (40, 1)
        assert scores.dtype == np.float32
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match=r"must be \[N, 1, 128, 128\]"):
            model.score_slices(np.zeros((2, 128, 128), np.float32))
    finally:
        backend.close()


@pytest.mark.slow  # builds a repository (ONNX export of VGG16)
def test_the_embedded_backend_refuses_a_repository_missing_its_files(
    demo_repository: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "no_settings"
    shutil.copytree(demo_repository, broken)
    (broken / BPR_SETTINGS_RELATIVE_PATH).unlink()
    with pytest.raises(ModelRepositoryError, match=r"inference-settings.json cannot be read"):
        OnnxRuntimeBackend(broken, EMBEDDED)
    (broken / BPR_SETTINGS_RELATIVE_PATH).write_text('{"slope_mean": 1}')
    with pytest.raises(
        ModelRepositoryError,
        match=r"settings .* are invalid: .*lookuptable_train_val: Field required",
    ):
        OnnxRuntimeBackend(broken, EMBEDDED)
    shutil.copyfile(
        demo_repository / BPR_SETTINGS_RELATIVE_PATH, broken / BPR_SETTINGS_RELATIVE_PATH
    )
    (broken / BODY_PART_REGRESSION_NAME / "1" / "model.onnx").unlink()
    with pytest.raises(ModelRepositoryError, match="lists a body-part regression model but"):
        OnnxRuntimeBackend(broken, EMBEDDED)


@pytest.mark.slow  # builds a repository (ONNX export of VGG16)
def test_a_bpreg_model_folder_through_the_cli_then_none(tmp_path: Path) -> None:
    """A real-looking bpreg folder (seeded weights, a non-demo table) is converted with its
    provenance; rebuilding with --no-bpr removes the model and the backend goes without it."""
    folder = write_model_folder(tmp_path / "bpreg_model", demo_state_dict(SEED + 1), REAL_SETTINGS)
    repository = tmp_path / "repository"
    common = ["--output", str(repository), "--flavour", "onnxruntime", "--demo", "--seed", "2"]
    common += ["--ctvit-config", str(TINY_CONFIG)]
    assert main([*common, "--bpr-model", str(folder)]) == 0
    info = read_metadata(repository).body_part_regression
    assert info is not None
    assert not info.demo
    assert info.source == str((folder / MODEL_FILE).resolve())
    assert info.source_sha256 == sha256_of(folder / MODEL_FILE)
    table = (repository / BPR_SETTINGS_RELATIVE_PATH).read_text()
    assert BprInferenceSettings.model_validate_json(table) == REAL_SETTINGS
    backend = OnnxRuntimeBackend(repository, EMBEDDED)
    assert backend.body_part_model is not None
    assert not backend.body_part_model.demo
    backend.close()

    assert main([*common, "--no-bpr"]) == 0
    assert not (repository / BODY_PART_REGRESSION_NAME).exists()
    metadata = read_metadata(repository)
    assert metadata.body_part_regression is None
    assert all(w.model != BODY_PART_REGRESSION_NAME for w in metadata.weights)
    backend = OnnxRuntimeBackend(repository, EMBEDDED)
    assert backend.body_part_model is None
    backend.close()


def test_the_cli_refuses_a_bare_weights_file(tmp_path: Path, capsys) -> None:
    folder = write_model_folder(tmp_path / "bpreg_model", demo_state_dict(0), REAL_SETTINGS)
    code = main(
        [
            "--output", str(tmp_path / "repository"), "--demo",
            "--ctvit-config", str(TINY_CONFIG), "--bpr-model", str(folder / MODEL_FILE),
        ]
    )  # fmt: skip
    assert code == 1
    assert "a bare weights file has no lookup table" in capsys.readouterr().err


def test_the_tensorrt_step_builds_its_plan_with_the_slice_profile(tmp_path: Path) -> None:
    commands = tensorrt_commands(tmp_path, (24, 40, 40), 32, body_part_regression=True)
    assert len(commands) == 4
    assert str(BPR_TRT_SCRIPT) in commands[-1]
    assert len(tensorrt_commands(tmp_path, (24, 40, 40), 32)) == 3

    # The script's trtexec arguments, through a stand-in trtexec that records them.
    trtexec = tmp_path / "trtexec"
    trtexec.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    trtexec.chmod(trtexec.stat().st_mode | stat.S_IEXEC)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    environment = {**os.environ, "TRTEXEC": str(trtexec), "ARGS_FILE": str(tmp_path / "args")}
    subprocess.run(
        ["bash", str(BPR_TRT_SCRIPT), str(onnx), str(tmp_path / "model.plan")],
        check=True,
        env=environment,
        capture_output=True,
    )
    assert (tmp_path / "args").read_text().split() == [
        f"--onnx={onnx}",
        f"--saveEngine={tmp_path / 'model.plan'}",
        "--minShapes=slices:1x1x128x128",
        "--optShapes=slices:4x1x128x128",
        "--maxShapes=slices:32x1x128x128",
        "--fp16",
    ]
