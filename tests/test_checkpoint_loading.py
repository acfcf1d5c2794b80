"""Strict checkpoint loading: the CLI refuses broken checkpoints and names the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from loguru import logger

from convertation.checkpoints import find_prefix, load_strict, read_checkpoint
from convertation.errors import CheckpointError, EncoderConfigError
from convertation.vit.ctvit import CTClipImageEncoder
from convertation.vit.ctvit_config import read_encoder_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PATCH_WEIGHT = "visual_transformer.to_patch_emb.2.weight"
# Keys of the small reference state dict that the encoder does not read.
UNUSED_IN_REFERENCE = 14


@pytest.fixture(scope="module")
def small_config(reference_dir: Path) -> Path:
    return reference_dir / "ctvit_small_config.json"


@pytest.fixture(scope="module")
def reference_state(reference_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(reference_dir / "ctvit_small_state_dict.npz")


@pytest.fixture
def small_encoder(small_config: Path) -> CTClipImageEncoder:
    return CTClipImageEncoder(*read_encoder_config(small_config))


def run_export_cli(config: Path, checkpoint: Path, output: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "convertation.vit.export",
        "--ctvit-config",
        str(config),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(output),
    ]
    return subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_cli_refuses_a_missing_key_and_names_it(tmp_path, small_config, reference_state):
    broken = dict(reference_state)
    del broken[PATCH_WEIGHT]
    torch.save(broken, tmp_path / "missing.pt")
    result = run_export_cli(small_config, tmp_path / "missing.pt", tmp_path / "out.onnx")
    assert result.returncode != 0
    assert PATCH_WEIGHT in result.stderr
    assert "missing key" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_cli_refuses_a_wrong_shape_and_names_the_key(tmp_path, small_config, reference_state):
    broken = dict(reference_state)
    broken["to_visual_latent.weight"] = broken["to_visual_latent.weight"][:, :-1].clone()
    torch.save(broken, tmp_path / "shape.pt")
    result = run_export_cli(small_config, tmp_path / "shape.pt", tmp_path / "out.onnx")
    assert result.returncode != 0
    assert "to_visual_latent.weight" in result.stderr
    assert "shape mismatch" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_cli_refuses_an_unknown_prefix_and_names_a_key(tmp_path, small_config, reference_state):
    # The image tower saved under another name: only to_visual_latent.weight still matches.
    renamed = {
        key.replace("visual_transformer.", "image_encoder."): value
        for key, value in reference_state.items()
    }
    torch.save(renamed, tmp_path / "renamed.pt")
    result = run_export_cli(small_config, tmp_path / "renamed.pt", tmp_path / "out.onnx")
    assert result.returncode != 0
    assert "missing key 'visual_transformer." in result.stderr


@pytest.mark.slow
def test_cli_failure_is_one_line_without_a_traceback(tmp_path, small_config, reference_state):
    # torch's refusal of a pickled object spans several lines; the CLI reports one.
    torch.save({"model": reference_state, "hook": Path("x")}, tmp_path / "object.pt")
    result = run_export_cli(small_config, tmp_path / "object.pt", tmp_path / "out.onnx")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "object.pt" in line]
    assert line.startswith("error: cannot read checkpoint object.pt: ")


@pytest.mark.slow
def test_cli_names_an_impossible_encoder_config(tmp_path, small_config):
    document = json.loads(small_config.read_text())
    document["ctvit"]["patch_size"] = document["ctvit"]["image_size"] + 1
    (tmp_path / "config.json").write_text(json.dumps(document))
    result = run_export_cli(tmp_path / "config.json", tmp_path / "absent.pt", tmp_path / "x.onnx")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert str(tmp_path / "config.json") in line
    assert "not a multiple of patch_size" in line


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "Expecting property name"),
        ('{"ctvit": {"dim": 8}}', "expected keys 'ctvit' and 'dim_latent'"),
        ('{"ctvit": {"dim": 8}, "dim_latent": 4}', "codebook_size"),
    ],
)
def test_unreadable_encoder_configs_raise_encoder_config_error(tmp_path, content, problem):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(EncoderConfigError, match=problem):
        read_encoder_config(tmp_path / "config.json")
    with pytest.raises(EncoderConfigError, match=r"absent.json"):
        read_encoder_config(tmp_path / "absent.json")


@pytest.mark.slow
def test_cli_exports_a_nested_prefixed_checkpoint(tmp_path, small_config, reference_state):
    nested = {"epoch": 3, "model": {f"module.{k}": v for k, v in reference_state.items()}}
    torch.save(nested, tmp_path / "nested.pth")
    result = run_export_cli(small_config, tmp_path / "nested.pth", tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.onnx").stat().st_size > 0


@pytest.mark.parametrize("nesting", ["state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_nested_and_prefixed_checkpoints_load(
    tmp_path, small_encoder, reference_state, nesting, prefix
):
    content = {nesting: {prefix + key: value for key, value in reference_state.items()}}
    torch.save(content, tmp_path / "checkpoint.pt")
    summary = load_strict(small_encoder, read_checkpoint(tmp_path / "checkpoint.pt"))
    assert summary.prefix == prefix
    assert summary.loaded == len(small_encoder.state_dict())
    assert summary.skipped == UNUSED_IN_REFERENCE
    for key, tensor in small_encoder.state_dict().items():
        assert torch.equal(tensor, reference_state[key]), key


def test_text_tower_keys_are_skipped_and_counted_in_one_line(small_encoder, reference_state):
    checkpoint = dict(reference_state)
    text_keys = {
        "text_transformer.embeddings.word_embeddings.weight": torch.zeros(10, 4),
        "text_transformer.encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4),
        "text_transformer.encoder.layer.1.attention.self.query.weight": torch.zeros(4, 4),
        "to_text_latent.weight": torch.zeros(32, 4),
        "temperature": torch.tensor(1.0),
    }
    checkpoint.update(text_keys)
    messages: list[str] = []
    sink = logger.add(messages.append, format="{message}")
    try:
        summary = load_strict(small_encoder, checkpoint)
    finally:
        logger.remove(sink)
    assert summary.skipped == UNUSED_IN_REFERENCE + len(text_keys)
    skip_lines = [message for message in messages if "skipped" in message]
    assert len(skip_lines) == 1
    assert f"skipped {UNUSED_IN_REFERENCE + len(text_keys)} unneeded keys" in skip_lines[0]
    assert "text_transformer.encoder.layer.*.attention.self.query: 2" in skip_lines[0]


def test_required_prefix_is_not_second_guessed(small_encoder, reference_state):
    prefixed = {f"module.{key}": value for key, value in reference_state.items()}
    with pytest.raises(CheckpointError, match=r"missing key 'model.visual_transformer"):
        load_strict(small_encoder, prefixed, required_prefix="model.")
    assert load_strict(small_encoder, prefixed, required_prefix="module.").prefix == "module."


def test_prefix_is_the_one_most_keys_sit_under():
    expected = ["a.weight", "b.weight", "c.weight"]
    available = ["x.a.weight", "x.b.weight", "x.c.weight", "a.weight", "y.x.c.weight"]
    assert find_prefix(expected, available) == "x."
    with pytest.raises(CheckpointError, match=r"a.weight"):
        find_prefix(expected, ["unrelated.key"])


def test_unreadable_checkpoints_raise_checkpoint_error(tmp_path, reference_state):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError, match="unsupported"):
        read_checkpoint(tmp_path / "weights.h5")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage.pt"):
        read_checkpoint(tmp_path / "garbage.pt")
    # weights_only loading refuses arbitrary pickled objects.
    torch.save({"model": reference_state, "hook": Path("x")}, tmp_path / "object.pt")
    with pytest.raises(CheckpointError, match=r"object.pt"):
        read_checkpoint(tmp_path / "object.pt")


def test_npz_and_pt_give_the_same_tensors(tmp_path, reference_dir, reference_state):
    torch.save(reference_state, tmp_path / "same.pt")
    from_pt = read_checkpoint(tmp_path / "same.pt")
    assert from_pt.keys() == reference_state.keys()
    with np.load(reference_dir / "ctvit_small_state_dict.npz") as archive:
        for key in archive.files:
            np.testing.assert_array_equal(from_pt[key].numpy(), archive[key])
