"""One-off measurement of the full-size CT-CLIP encoder: build, ONNX export, onnxruntime run.

    .venv/bin/python benchmarks/encoder_onnx.py [--output DIR] [--runs N] [--threads T]

Prints the time to build the seeded demo encoder and export it, the file size, the
onnxruntime session start and the time for one 1x1x240x480x480 volume, and the analytic
FLOP count of one volume (multiply-add = 2 FLOP).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from convertation.vit.ctvit import FULL_CTVIT_CONFIG, FULL_DIM_LATENT, CTViTConfig
from convertation.vit.export import export_encoder_onnx


def encoder_flops(config: CTViTConfig, dim_latent: int, batch: int = 1) -> dict[str, float]:
    """FLOP of one forward pass by stage (matrix products and convolutions only)."""
    side = config.patches_per_side
    t = config.depth_slices // config.temporal_patch_size
    spatial_tokens = side * side
    tokens = batch * t * spatial_tokens
    dim, inner = config.dim, config.dim_head * config.heads
    ff = config.ff_inner_dim

    def layer_projections() -> float:  # q, kv, out, GEGLU feed-forward, depthwise conv
        per_token = dim * inner + dim * 2 * inner + inner * dim + dim * 2 * ff + ff * dim
        return 2.0 * tokens * per_token + 2.0 * tokens * dim * 27

    def attention(sequences: int, length: int) -> float:  # q k^T and attn v
        return 2 * 2.0 * sequences * config.heads * length * length * config.dim_head

    bias_pairs = spatial_tokens * spatial_tokens
    return {
        "patch embedding": 2.0 * tokens * config.patch_volume * dim,
        "spatial transformer": config.spatial_depth
        * (layer_projections() + attention(batch * t, spatial_tokens)),
        "temporal transformer": config.temporal_depth
        * (layer_projections() + attention(batch * spatial_tokens, t)),
        "vector quantiser": 2.0 * tokens * config.codebook_size * dim,
        "to_visual_latent": 2.0 * batch * spatial_tokens * dim * dim_latent,
        # Weights only: the export stores its result as a constant.
        "position bias MLP (not in the graph)": 2.0
        * bias_pairs
        * (2 * dim + dim * dim + dim * config.heads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="folder for encoder.onnx (default: temp)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: onnxruntime's default")
    args = parser.parse_args()

    flops = encoder_flops(FULL_CTVIT_CONFIG, FULL_DIM_LATENT)
    in_graph = sum(v for k, v in flops.items() if "not in the graph" not in k)
    for stage, value in flops.items():
        print(f"  {stage:40s} {value / 1e9:8.1f} GFLOP")
    print(f"FLOP per volume: {sum(flops.values()) / 1e9:.1f} GFLOP as CT-CLIP runs it, ")
    print(f"                 {in_graph / 1e9:.1f} GFLOP in the exported graph")

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.output or Path(scratch)
        path = folder / "encoder.onnx"
        started = time.perf_counter()
        from convertation.vit.ctvit import build_demo_encoder

        encoder = build_demo_encoder(FULL_CTVIT_CONFIG, FULL_DIM_LATENT, seed=0)
        built = time.perf_counter()
        export_encoder_onnx(encoder, path, check=False)
        exported = time.perf_counter()
        del encoder
        print(f"build demo encoder: {built - started:.1f} s, export: {exported - built:.1f} s")
        print(f"file: {path.stat().st_size / 1e6:.1f} MB")

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        started = time.perf_counter()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        print(f"onnxruntime session start: {time.perf_counter() - started:.1f} s")
        volume = np.random.default_rng(0).uniform(-1, 1, (1, 1, 240, 480, 480))
        volume = volume.astype(np.float32)
        for run in range(args.runs):
            started = time.perf_counter()
            (embedding,) = session.run(None, {"volume": volume})
            seconds = time.perf_counter() - started
            print(
                f"run {run + 1}: {seconds:.2f} s for 1x1x240x480x480 "
                f"({in_graph / seconds / 1e9:.0f} GFLOP/s), |embedding| = "
                f"{np.linalg.norm(embedding):.4f}"
            )
    print(f"cores: {os.cpu_count()}, onnxruntime {ort.__version__}, threads {args.threads}")


if __name__ == "__main__":
    main()
