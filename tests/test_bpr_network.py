"""Body-part regression network: bpreg's keys, reference parity (torch, ONNX), strict loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from convertation.bpr.export import INPUT_NAME, OUTPUT_NAME, export_bpr_onnx, main
from convertation.bpr.loading import (
    CONFIG_FILE,
    MODEL_FILE,
    SETTINGS_FILE,
    load_bpr_model,
    load_network,
    write_demo_model_folder,
)
from convertation.bpr.network import BodyPartRegressionNet, demo_state_dict, expected_shapes
from convertation.errors import CheckpointError
from convertation.onnx_export import run_onnx
from services.core.body_part.bpr_settings import demo_inference_settings, inference_settings_json

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARITY_TOLERANCE = 1e-4
OTHER_SEED = 7


def _scores(network: BodyPartRegressionNet, slices: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return network.eval()(torch.from_numpy(slices)).numpy()


def _seeded_slices(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 1, 128, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def reference_weights(reference_dir: Path) -> Path:
    return reference_dir / "bpr_demo_state_dict.npz"


@pytest.fixture(scope="module")
def reference_io(reference_dir: Path) -> dict[str, np.ndarray]:
    with np.load(reference_dir / "bpr_demo_io.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def reference_onnx(reference_weights: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("bpr") / "bpr.onnx"
    export_bpr_onnx(load_network(reference_weights), output)
    return output


def _state_as_tensors(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in state.items()}


# ----------------------------------------------------------------------------- architecture


def test_keys_and_shapes_are_bpregs(reference_dir: Path):
    rows = (reference_dir / "bpr_keys.tsv").read_text().splitlines()[1:]
    reference = {
        key: tuple(int(n) for n in shape.split("x"))
        for key, shape, _ in (r.split("\t") for r in rows)
    }
    assert expected_shapes() == reference
    assert list(expected_shapes()) == list(reference)  # same order as bpreg's state dict


def test_first_convolution_has_no_bias_and_one_channel():
    first = BodyPartRegressionNet().model[0]
    assert first.in_channels == 1
    assert first.bias is None


# ----------------------------------------------------------------------------- parity


def test_torch_reproduces_the_reference_scores(reference_weights, reference_io):
    scores = _scores(load_network(reference_weights), reference_io["input"])
    assert scores.shape == (3, 1)
    assert np.max(np.abs(scores - reference_io["scores"])) < PARITY_TOLERANCE


@pytest.mark.slow
def test_onnx_reproduces_the_reference_scores(reference_onnx, reference_io):
    (scores,) = run_onnx(reference_onnx, {INPUT_NAME: reference_io["input"]})
    assert scores.dtype == np.float32
    assert scores.shape == (3, 1)
    assert np.max(np.abs(scores - reference_io["scores"])) < PARITY_TOLERANCE


@pytest.mark.slow
def test_onnx_signature_has_a_dynamic_batch(reference_onnx, reference_weights):
    graph = onnx.load(str(reference_onnx)).graph
    (graph_input,) = graph.input
    (graph_output,) = graph.output
    assert (graph_input.name, graph_output.name) == (INPUT_NAME, OUTPUT_NAME)
    input_dims = graph_input.type.tensor_type.shape.dim
    assert input_dims[0].dim_param
    assert [d.dim_value for d in input_dims[1:]] == [1, 128, 128]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    network = load_network(reference_weights)
    for batch in (1, 5):
        slices = _seeded_slices(batch, seed=batch)
        (scores,) = run_onnx(reference_onnx, {INPUT_NAME: slices})
        assert scores.shape == (batch, 1)
        assert np.max(np.abs(scores - _scores(network, slices))) < PARITY_TOLERANCE


@pytest.mark.slow
def test_other_seeded_weights_agree_in_torch_and_onnx(tmp_path):
    network = BodyPartRegressionNet()
    network.load_state_dict(_state_as_tensors(demo_state_dict(OTHER_SEED)))
    output = tmp_path / "other.onnx"
    export_bpr_onnx(network, output)
    slices = _seeded_slices(4, seed=OTHER_SEED)
    expected = _scores(network, slices)
    (scores,) = run_onnx(output, {INPUT_NAME: slices})
    assert np.ptp(expected) > 0  # the seeded weights tell the slices apart
    assert np.max(np.abs(scores - expected)) < PARITY_TOLERANCE


# ----------------------------------------------------------------------------- loading


def _write_bpreg_folder(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """A folder as bpreg's post-processing leaves it (extra entries included)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / MODEL_FILE)
    config = {"base_model": "vgg", "lr": 1e-4, "alpha": 0.2, "batch_size": 64, "name": "x.p"}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    document = inference_settings_json(demo_inference_settings())
    document.pop("demo")  # bpreg's files have no demo flag
    document.update(slope_median=0.118, slope_std=0.012, tangential_slope_mean=0.113)
    document["lookuptable_train"] = document["lookuptable_train_val"]
    document["settings"].update(upper_tangential_quantile=0.995, lower_tangential_quantile=0.005)
    (folder / SETTINGS_FILE).write_text(json.dumps(document))
    return folder


def test_loads_a_model_folder_laid_out_like_bpregs(tmp_path, reference_weights, reference_io):
    state = {key: torch.from_numpy(value) for key, value in np.load(reference_weights).items()}
    folder = _write_bpreg_folder(tmp_path / "public_bpr_model", state)
    loaded = load_bpr_model(folder)
    assert loaded.weights_path == folder / MODEL_FILE
    assert len(loaded.weights_sha256) == 64
    assert loaded.settings is not None
    assert not loaded.demo
    assert loaded.settings.settings.start_landmark == "pelvis_start"
    scores = _scores(loaded.network, reference_io["input"])
    assert np.max(np.abs(scores - reference_io["scores"])) < PARITY_TOLERANCE


def test_demo_folder_is_labelled_demo_and_loads(tmp_path):
    loaded = load_bpr_model(write_demo_model_folder(tmp_path / "demo", seed=3))
    assert loaded.demo
    assert loaded.settings is not None
    assert loaded.settings.demo
    expected = demo_state_dict(3)["fc7.weight"]
    assert np.array_equal(loaded.network.fc7.weight.detach().numpy(), expected)


def test_a_prefixed_state_dict_loads(tmp_path, reference_weights, reference_io):
    state = {f"module.{key}": torch.from_numpy(v) for key, v in np.load(reference_weights).items()}
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    scores = _scores(load_network(tmp_path / "wrapped.pth"), reference_io["input"])
    assert np.max(np.abs(scores - reference_io["scores"])) < PARITY_TOLERANCE


def test_a_missing_key_is_named(tmp_path):
    state = _state_as_tensors(demo_state_dict(0))
    del state["model.14.bias"]
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.14\.bias"):
        load_network(tmp_path / "model.pt")


def test_a_wrong_shape_is_named(tmp_path):
    state = demo_state_dict(0)
    state["fc7.weight"] = np.zeros((2, 512), np.float32)
    np.savez(tmp_path / "weights.npz", **state)
    with pytest.raises(CheckpointError, match=r"fc7\.weight.*\(2, 512\)"):
        load_network(tmp_path / "weights.npz")


@pytest.mark.parametrize("missing", [MODEL_FILE, CONFIG_FILE, SETTINGS_FILE])
def test_an_incomplete_folder_names_the_missing_file(tmp_path, missing):
    folder = write_demo_model_folder(tmp_path / "model", seed=0)
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_bpr_model(folder)


def test_bad_settings_name_the_field(tmp_path):
    folder = write_demo_model_folder(tmp_path / "model", seed=0)
    document = json.loads((folder / SETTINGS_FILE).read_text())
    del document["slope_mean"]
    document["settings"]["start-landmark"] = "knee"
    (folder / SETTINGS_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="slope_mean: Field required"):
        load_bpr_model(folder)
    document["slope_mean"] = 0.118
    (folder / SETTINGS_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="'knee'"):
        load_bpr_model(folder)


def test_a_settings_table_without_the_needed_landmarks_is_refused(tmp_path):
    folder = write_demo_model_folder(tmp_path / "model", seed=0)
    document = json.loads((folder / SETTINGS_FILE).read_text())
    for table in document["lookuptable_train_val"].values():
        del table["Th7"]
    (folder / SETTINGS_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"lacks landmarks .*Th7"):
        load_bpr_model(folder)


def test_a_resnet_config_is_refused(tmp_path):
    folder = write_demo_model_folder(tmp_path / "model", seed=0)
    (folder / CONFIG_FILE).write_text(json.dumps({"base_model": "resnet"}))
    with pytest.raises(CheckpointError, match="base_model 'resnet'"):
        load_bpr_model(folder)


# ----------------------------------------------------------------------------- command line


@pytest.mark.slow
def test_cli_exits_non_zero_naming_the_missing_key(tmp_path):
    state = _state_as_tensors(demo_state_dict(0))
    del state["conv6.weight"]
    torch.save(state, tmp_path / "broken.pt")
    command = [sys.executable, "-m", "convertation.bpr.export", "--checkpoint",
               str(tmp_path / "broken.pt"), "--output", str(tmp_path / "bpr.onnx")]  # fmt: skip
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "conv6.weight" in error_lines[0]
    assert not (tmp_path / "bpr.onnx").exists()


@pytest.mark.slow
def test_cli_demo_writes_a_folder_and_a_matching_onnx(tmp_path):
    folder, output = tmp_path / "demo_model", tmp_path / "bpr.onnx"
    argv = ["--demo", "--demo-seed", "5", "--demo-folder", str(folder), "--output", str(output)]
    assert main(argv) == 0
    loaded = load_bpr_model(folder)
    assert loaded.demo
    slices = _seeded_slices(3, seed=11)
    (scores,) = run_onnx(output, {INPUT_NAME: slices})
    assert np.max(np.abs(scores - _scores(loaded.network, slices))) < PARITY_TOLERANCE
