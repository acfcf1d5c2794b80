"""Export the CT-CLIP image encoder to ONNX.

    python -m convertation.vit.export --ctvit-config CONFIG.json --checkpoint FILE --output encoder.onnx
    python -m convertation.vit.export --demo-seed 0 --output encoder.onnx   # full-size demo weights

The graph takes ``volume`` float32 ``[batch, 1, D, H, W]`` (dynamic batch, fixed D, H, W =
`CTClipImageEncoder.expected_input_shape`) and returns ``embedding`` ``[batch, dim_latent]``,
L2-normalised.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from torch import Tensor, nn

from convertation.checkpoints import load_strict, read_checkpoint
from convertation.errors import ConversionError, OnnxExportError, report_cli_failure
from convertation.onnx_export import export_module, run_onnx
from convertation.vit.ctvit import CTClipImageEncoder, build_demo_encoder
from convertation.vit.ctvit_config import CTViTConfig, encoder_config_or_full
from convertation.vit.fused_attention import fused_attention_export, translation_table

INPUT_NAME = "volume"
OUTPUT_NAME = "embedding"


class _EncoderWithFrozenBias(nn.Module):
    """The encoder with its spatial position bias computed once and stored as a constant.

    The bias depends on the weights only; computing it in the graph would cost an MLP over
    (h*w)^2 token pairs per volume (~177 GFLOP for the full model).
    """

    spatial_bias: Tensor

    def __init__(self, encoder: CTClipImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        with torch.no_grad():
            self.register_buffer("spatial_bias", encoder.visual_transformer.spatial_bias())

    def forward(self, volume: Tensor) -> Tensor:
        return self.encoder(volume, self.spatial_bias)


def load_encoder(config: CTViTConfig, dim_latent: int, checkpoint: Path) -> CTClipImageEncoder:
    """An encoder with the weights of a CT-CLIP checkpoint (strict; see `load_strict`)."""
    encoder = CTClipImageEncoder(config, dim_latent)
    load_strict(encoder, read_checkpoint(checkpoint))
    return encoder.eval()


def export_encoder_onnx(
    encoder: CTClipImageEncoder, output: Path, *, check: bool = True, fused_attention: bool = True
) -> Path:
    """Write ``encoder`` as one ONNX file; with ``check``, onnxruntime loads and runs it once.

    ``fused_attention``: every attention is one ``com.microsoft.MultiHeadAttention`` node
    (ONNX Runtime's own op: the embedded backend, Triton's python and onnxruntime
    flavours); without it the attention is written out in standard ONNX operators (the
    graph TensorRT builds its plans from).
    """
    depth, height, width = encoder.expected_input_shape()
    example = torch.zeros(2, 1, depth, height, width)
    with fused_attention_export() if fused_attention else nullcontext():
        path = export_module(
            _EncoderWithFrozenBias(encoder.eval()),
            example,
            output,
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            custom_translation_table=translation_table() if fused_attention else None,
        )
    if check:
        probe = np.random.default_rng(0).uniform(-1, 1, (1, 1, depth, height, width))
        (embedding,) = run_onnx(path, {INPUT_NAME: probe.astype(np.float32)})
        norm = float(np.linalg.norm(embedding))
        if embedding.shape != (1, encoder.dim_latent) or not abs(norm - 1) < 1e-3:
            raise OnnxExportError(
                f"onnxruntime check failed: shape {embedding.shape}, norm {norm:.4f}"
            )
        logger.info("onnxruntime loads and runs {}", path.name)
    return path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ctvit-config",
        type=Path,
        help="JSON {'ctvit': {...}, 'dim_latent': N}; default: the full CT-CLIP configuration",
    )
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", type=Path, help="CT-CLIP checkpoint (.pt/.pth/.npz)")
    weights.add_argument("--demo-seed", type=int, help="seeded demo weights instead")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    started = time.perf_counter()
    try:
        config, dim_latent = encoder_config_or_full(args.ctvit_config)
        if args.checkpoint is not None:
            encoder = load_encoder(config, dim_latent, args.checkpoint)
        else:
            encoder = build_demo_encoder(config, dim_latent, args.demo_seed)
        export_encoder_onnx(encoder, args.output, check=not args.no_check)
    except ConversionError as error:
        return report_cli_failure(error)
    logger.info("encoder exported in {:.1f} s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
