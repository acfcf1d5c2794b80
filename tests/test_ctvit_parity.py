"""The CT-CLIP image encoder against the reference outputs, in torch and as ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from convertation.checkpoints import load_strict, read_checkpoint
from convertation.onnx_export import run_onnx
from convertation.vit.ctvit import CTClipImageEncoder, build_demo_encoder
from convertation.vit.ctvit_config import FULL_CTVIT_CONFIG, FULL_DIM_LATENT, read_encoder_config
from convertation.vit.export import export_encoder_onnx

TOLERANCE = 1e-4
TINY_CONFIG = Path(__file__).parent / "data" / "ctvit_tiny.json"


@pytest.fixture(scope="module")
def reference_io(reference_dir: Path) -> dict[str, np.ndarray]:
    with np.load(reference_dir / "ctvit_small_io.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def small_encoder(reference_dir: Path) -> CTClipImageEncoder:
    config, dim_latent = read_encoder_config(reference_dir / "ctvit_small_config.json")
    encoder = CTClipImageEncoder(config, dim_latent)
    load_strict(encoder, read_checkpoint(reference_dir / "ctvit_small_state_dict.npz"))
    return encoder.eval()


@pytest.fixture(scope="module")
def small_onnx(small_encoder: CTClipImageEncoder, tmp_path_factory) -> Path:
    return export_encoder_onnx(small_encoder, tmp_path_factory.mktemp("onnx") / "encoder.onnx")


def test_small_config_fits_the_reference_input(small_encoder, reference_io):
    assert small_encoder.expected_input_shape() == reference_io["input"].shape[2:]


def test_torch_reproduces_reference_tokens_and_embedding(small_encoder, reference_io):
    volume = torch.from_numpy(reference_io["input"])
    with torch.no_grad():
        tokens = small_encoder.encode_tokens(volume).numpy()
        embedding = small_encoder.unnormalised_embedding(volume).numpy()
    assert tokens.shape == reference_io["encoded_tokens"].shape
    np.testing.assert_allclose(tokens, reference_io["encoded_tokens"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(embedding, reference_io["embedding"], atol=TOLERANCE, rtol=0)


def test_torch_forward_is_the_normalised_reference_embedding(small_encoder, reference_io):
    with torch.no_grad():
        embedding = small_encoder(torch.from_numpy(reference_io["input"])).numpy()
    reference = reference_io["embedding"]
    expected = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(embedding, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_onnx_reproduces_normalised_reference_embedding(small_onnx, reference_io):
    (embedding,) = run_onnx(small_onnx, {"volume": reference_io["input"]})
    reference = reference_io["embedding"]
    expected = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert embedding.shape == reference.shape
    np.testing.assert_allclose(embedding, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_onnx_matches_torch_for_another_config_seed_and_batch(tmp_path):
    config, dim_latent = read_encoder_config(TINY_CONFIG)
    encoder = build_demo_encoder(config, dim_latent, seed=7)
    path = export_encoder_onnx(encoder, tmp_path / "tiny.onnx")
    rng = np.random.default_rng(3)
    for batch in (1, 3):
        volume = rng.uniform(-1, 1, (batch, 1, *encoder.expected_input_shape()))
        volume = volume.astype(np.float32)
        with torch.no_grad():
            expected = encoder(torch.from_numpy(volume)).numpy()
        (embedding,) = run_onnx(path, {"volume": volume})
        assert embedding.shape == (batch, dim_latent)
        np.testing.assert_allclose(embedding, expected, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_fused_and_portable_graphs_compute_the_same(small_onnx, small_encoder, tmp_path):
    """The embedded/Triton graph (one com.microsoft MultiHeadAttention per attention) and the
    portable one TensorRT builds from (standard operators) agree to rounding; the fused one
    has no Softmax and none of the head transposes left."""
    portable = export_encoder_onnx(small_encoder, tmp_path / "portable.onnx", fused_attention=False)
    fused_ops = [node.op_type for node in onnx.load(str(small_onnx)).graph.node]
    portable_ops = [node.op_type for node in onnx.load(str(portable)).graph.node]
    layers = small_encoder.config.spatial_depth + small_encoder.config.temporal_depth
    assert fused_ops.count("MultiHeadAttention") == layers
    assert "Softmax" not in fused_ops
    assert "MultiHeadAttention" not in portable_ops
    assert portable_ops.count("Softmax") == layers
    assert portable_ops.count("Transpose") - fused_ops.count("Transpose") >= 4 * layers
    volume = np.random.default_rng(11).uniform(-1, 1, (3, 1, *small_encoder.expected_input_shape()))
    feed = {"volume": volume.astype(np.float32)}
    np.testing.assert_allclose(
        run_onnx(small_onnx, feed)[0], run_onnx(portable, feed)[0], atol=1e-6
    )


def test_batch_items_are_encoded_independently(small_encoder, reference_io):
    volume = torch.from_numpy(reference_io["input"])
    with torch.no_grad():
        together = small_encoder.unnormalised_embedding(volume)
        alone = small_encoder.unnormalised_embedding(volume[1:])
    np.testing.assert_allclose(together[1:].numpy(), alone.numpy(), atol=1e-5, rtol=0)


def test_demo_weights_are_seeded():
    config, dim_latent = read_encoder_config(TINY_CONFIG)
    first = build_demo_encoder(config, dim_latent, seed=1).state_dict()
    again = build_demo_encoder(config, dim_latent, seed=1).state_dict()
    other = build_demo_encoder(config, dim_latent, seed=2).state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["to_visual_latent.weight"], other["to_visual_latent.weight"])


def _reference_keys(reference_dir: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (reference_dir / "ctclip_image_encoder_keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        shapes[key] = tuple(int(n) for n in shape.split("x"))
    return shapes


def test_full_architecture_has_ct_clip_keys_and_shapes(reference_dir):
    with torch.device("meta"):
        encoder = CTClipImageEncoder(FULL_CTVIT_CONFIG, FULL_DIM_LATENT)
    ours = {key: tuple(tensor.shape) for key, tensor in encoder.state_dict().items()}
    reference = _reference_keys(reference_dir)
    assert {key: reference.get(key) for key in ours} == ours
    # What the encoder path does not read: the first-frame patch embedding (CT-CLIP embeds
    # every frame with to_patch_emb) and the cross-attention context norms.
    unused = sorted(set(reference) - set(ours))
    assert all("to_patch_emb_first_frame" in key or "context_norm" in key for key in unused)
    assert encoder.expected_input_shape() == (240, 480, 480)
