"""The encoder and the resampling on a GPU, through PyTorch (README: "GPU").

A GPU host's image usually has PyTorch with CUDA; onnxruntime-gpu and TensorRT may not be
there (a 255 MB wheel that could not be taken to the lent machine, 2026-11-26). This
measures what the GPU gives with the project's own torch modules, on one input built here:

* the preprocessing contract (clip, trilinear resize, scale, crop/pad) with
  ``F.interpolate`` on the GPU from the int16 volume, against the numpy implementation the
  pipeline runs (services/core/preprocessing) on this host's cores: time and max abs diff;
* the full-size demo encoder (``build_demo_encoder``, the seed ``build_repository --demo``
  uses, so the deployed demo graph's weights) in FP32 on the CPU as the reference, then on
  the GPU in FP32, TF32, BF16 and FP16 (autocast) at batch 1, 2 and 4: seconds per batch and
  per study, peak GPU memory, and parity of the L2-normalised embedding against the CPU
  FP32 one with the precision gate's tolerance (cosine >= 0.999, max abs diff <= 0.01).

    python -m benchmarks.gpu_torch [--batches 1 2 4] [--runs 5] [--json OUT.json]

The input is a seeded smooth field scaled to CT values (300 x 512 x 512 at 1 x 0.7 x 0.7
mm, like the 300-slice benchmark study); nothing is read from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convertation.vit.ctvit import build_demo_encoder
from convertation.vit.ctvit_config import FULL_CTVIT_CONFIG, FULL_DIM_LATENT
from services.core.arrays import Int16Array
from services.core.preprocessing import PreprocessingTarget, preprocess_array, resized_shape

SHAPE = (300, 512, 512)
SPACING_MM = (1.0, 0.7, 0.7)
TOLERANCE = {"cosine": 0.999, "max_abs_diff": 0.01}  # convertation/precision.py's gate
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def ct_like_volume(seed: int) -> Int16Array:
    """A smooth random field in HU: air around a body, lungs darker, bone brighter."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, 12, 24, 24), generator=generator)
    field = F.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=False)[0, 0]
    hu = (field * 700.0).clamp(-1000.0, 1500.0)
    return hu.round().to(torch.int16).numpy()


def preprocess_torch(volume: torch.Tensor, target: PreprocessingTarget) -> torch.Tensor:
    """The same contract as services/core/preprocessing, with F.interpolate on the device."""
    new_shape = resized_shape(volume.shape, SPACING_MM, target.spacing_mm)
    low, high = target.hu_window
    hu = volume.to(torch.float32).clamp(low, high)
    resized = F.interpolate(hu[None, None], size=new_shape, mode="trilinear", align_corners=False)
    resized = resized[0, 0] / 1000.0
    out = torch.full(target.shape, -1.0, device=volume.device)
    source, destination = [], []
    for n, t in zip(new_shape, target.shape, strict=True):
        offset = abs(n - t) // 2
        if n >= t:  # centre crop
            source.append(slice(offset, offset + t))
            destination.append(slice(0, t))
        else:  # centre pad
            source.append(slice(0, n))
            destination.append(slice(offset, offset + n))
    out[tuple(destination)] = resized[tuple(source)]
    return out


def timed(function: Any, runs: int, synchronise: bool) -> tuple[float, Any]:
    """Median seconds of ``runs`` calls after one warm-up call, and the last result."""
    result = function()
    times = []
    for _ in range(runs):
        if synchronise:
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = function()
        if synchronise:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def parity(embedding: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    embedding = F.normalize(embedding.float().cpu(), dim=-1)
    reference = F.normalize(reference.float().cpu(), dim=-1).expand_as(embedding)
    return {
        "cosine": float(F.cosine_similarity(embedding, reference, dim=-1).min()),
        "max_abs_diff": float((embedding - reference).abs().max()),
    }


def within(numbers: dict[str, float]) -> bool:
    return (
        numbers["cosine"] >= TOLERANCE["cosine"]
        and numbers["max_abs_diff"] <= TOLERANCE["max_abs_diff"]
    )


def measure(batches: list[int], runs: int, seed: int) -> dict[str, Any]:
    device = torch.device("cuda")
    target = PreprocessingTarget()
    volume = ct_like_volume(seed)
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "input": f"{SHAPE} int16 at {SPACING_MM} mm -> model input {target.shape}",
    }

    numpy_s, numpy_input = timed(
        lambda: preprocess_array(volume.astype(np.float32), SPACING_MM, target), 3, False
    )
    on_device = torch.from_numpy(volume)
    gpu_s, gpu_input = timed(
        lambda: preprocess_torch(on_device.to(device, non_blocking=False), target), runs, True
    )
    report["preprocessing"] = {
        "numpy_cpu_s": numpy_s,
        "torch_gpu_s_with_upload": gpu_s,
        "max_abs_diff": float(np.abs(gpu_input.cpu().numpy() - numpy_input).max()),
    }

    encoder = build_demo_encoder(FULL_CTVIT_CONFIG, FULL_DIM_LATENT, seed=0)
    model_input = torch.from_numpy(numpy_input)[None, None]
    with torch.inference_mode():
        started = time.perf_counter()
        reference = encoder(model_input)
        report["encoder_cpu_fp32_s"] = time.perf_counter() - started
    encoder = encoder.to(device)
    rows = []
    for precision in PRECISIONS:
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        for batch in batches:
            batch_input = model_input.to(device).expand(batch, -1, -1, -1, -1).contiguous()
            torch.cuda.reset_peak_memory_stats(device)

            def run(batch_input: torch.Tensor = batch_input, dtype: Any = dtype) -> torch.Tensor:
                with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                                            enabled=dtype is not None):  # fmt: skip
                    return encoder(batch_input)

            seconds, embedding = timed(run, runs, True)
            numbers = parity(embedding, reference)
            rows.append(
                {
                    "precision": precision,
                    "batch": batch,
                    "s_per_batch": seconds,
                    "s_per_study": seconds / batch,
                    "studies_per_s": batch / seconds,
                    "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                    **numbers,
                    "within_tolerance": within(numbers),
                }
            )
            del batch_input
    report["encoder_gpu"] = rows
    return report


def render(report: dict[str, Any]) -> str:
    pre = report["preprocessing"]
    lines = [
        f"GPU {report['gpu']}, torch {report['torch']}, {report['cpu_cores']} CPU cores; "
        f"{report['input']}",
        f"preprocessing: numpy on the CPU {pre['numpy_cpu_s']:.3f} s; torch on the GPU "
        f"(int16 upload included) {pre['torch_gpu_s_with_upload'] * 1000:.1f} ms; "
        f"max abs diff {pre['max_abs_diff']:.1e}",
        f"encoder FP32 on the CPU (reference): {report['encoder_cpu_fp32_s']:.2f} s",
        "| precision | batch | s per batch | ms per study | studies/s | peak GiB | cosine "
        "| max abs diff | within tolerance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["encoder_gpu"]:
        lines.append(
            f"| {row['precision']} | {row['batch']} | {row['s_per_batch']:.4f} "
            f"| {row['s_per_study'] * 1000:.1f} | {row['studies_per_s']:.1f} "
            f"| {row['peak_gib']:.1f} | {row['cosine']:.6f} | {row['max_abs_diff']:.2e} "
            f"| {row['within_tolerance']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the input field")
    parser.add_argument("--json", type=Path, default=None)
    arguments = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this measures the GPU")
    report = measure(arguments.batches, arguments.runs, arguments.seed)
    print(render(report))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
