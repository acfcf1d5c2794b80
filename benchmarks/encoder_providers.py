"""The encoder on each ONNX Runtime execution provider at batch 1, 2 and 4, with parity
against FP32 on the CPU: the GPU measurement, ready for a machine with a GPU.

    .venv/bin/python benchmarks/encoder_providers.py [--repository DIR]
        [--providers cpu cuda tensorrt-fp16] [--batches 1 2 4] [--runs 5]
        [--input MODEL_INPUT.npy | --study ZIP | --synthetic] [--json OUT.json]

Providers: ``cpu`` (FP32, the reference), ``cuda`` (FP32 on the GPU) and ``tensorrt-fp16``
(TensorRT with FP16 kernels, an optimisation profile for batches 1..4, engines cached in a
temporary folder; the first session start builds them and is reported separately). A
provider this onnxruntime build lacks, or one that falls back to the CPU, is reported as
such, never silently replaced. Latency is one ``session.run`` from host memory, as the
pipeline calls it (the host-to-device copy of 221 MB per volume included); throughput is
volumes per second at that batch. Parity: each volume's embedding against the CPU FP32
embedding of the same volume (tolerance as for INT8: cosine >= 0.999, max abs diff <= 0.01).

Input: ``--input`` a saved model input (``python -m services.batch IN OUT
--save-model-input DIR`` writes them), ``--study`` a DICOM zip run through the pipeline's
preprocessing, by default the 300-slice benchmark study when the fixtures are beside the
project, else ``--synthetic`` (uniform noise in [-1, 1]: fine for timing, less telling for
parity).

On a GPU machine: onnxruntime-gpu (CUDA provider) and TensorRT's libraries (TensorRT
provider) must be installed, and the full-size repository built there (the encoder ONNX is
725 MB): ``python -m convertation.build_repository --output /tmp/repo --flavour
onnxruntime --demo``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.encoder import agreement  # noqa: E402
from services.core.config import load_settings  # noqa: E402
from services.core.inference.onnxruntime_backend import onnx_paths  # noqa: E402
from services.core.model_metadata import ENCODER_NAME, read_metadata  # noqa: E402

MIN_COSINE = 0.999
MAX_ABS_DIFF = 0.01
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt-fp16": "TensorrtExecutionProvider",
}


@dataclass
class ProviderResult:
    provider: str
    status: str  # "ok" or why it was not measured
    session_start_s: float = 0.0
    by_batch: dict[int, dict[str, float]] = field(default_factory=dict)


def provider_chain(name: str, input_name: str, shape: tuple[int, ...], cache: Path) -> list:
    """The providers list for ``name``, with the options each needs."""
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda":
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    if name == "tensorrt-fp16":
        volume = "x".join(str(n) for n in shape[1:])
        return [
            (
                "TensorrtExecutionProvider",
                {
                    "device_id": 0,
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                    "trt_profile_min_shapes": f"{input_name}:1x{volume}",
                    "trt_profile_opt_shapes": f"{input_name}:2x{volume}",
                    "trt_profile_max_shapes": f"{input_name}:4x{volume}",
                },
            ),
            ("CUDAExecutionProvider", {"device_id": 0}),
            "CPUExecutionProvider",
        ]
    raise ValueError(f"unknown provider {name!r} (choose from {', '.join(PROVIDER_NAMES)})")


def batch_of(volume: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` copies of a ``[1, 1, D, H, W]`` volume, contiguous."""
    return np.ascontiguousarray(np.repeat(volume, batch, axis=0))


def measure_provider(
    name: str,
    encoder: Path,
    input_name: str,
    volume: np.ndarray,
    reference: np.ndarray,
    batches: list[int],
    runs: int,
) -> ProviderResult:
    wanted = PROVIDER_NAMES[name]
    if wanted not in ort.get_available_providers():
        return ProviderResult(
            name,
            f"not available in this onnxruntime build (has {', '.join(ort.get_available_providers())})",
        )
    with tempfile.TemporaryDirectory(prefix="cts-trt-cache-") as cache:
        started = time.perf_counter()
        try:
            session = ort.InferenceSession(
                str(encoder),
                providers=provider_chain(name, input_name, volume.shape, Path(cache)),
            )
        except Exception as error:  # noqa: BLE001 - reported in the table
            return ProviderResult(name, f"session failed: {type(error).__name__}: {error}")
        result = ProviderResult(name, "ok", session_start_s=time.perf_counter() - started)
        if session.get_providers()[0] != wanted:
            return ProviderResult(name, f"fell back to {session.get_providers()[0]}")
        for batch in batches:
            inputs = {input_name: batch_of(volume, batch)}
            started = time.perf_counter()
            embeddings = session.run(None, inputs)[0]  # first run: engine build / allocations
            first_s = time.perf_counter() - started
            seconds = []
            for _ in range(runs):
                started = time.perf_counter()
                session.run(None, inputs)
                seconds.append(time.perf_counter() - started)
            checks = [agreement(name, reference, embedding) for embedding in embeddings]
            worst = min(checks, key=lambda check: check.cosine)
            median = statistics.median(seconds)
            result.by_batch[batch] = {
                "latency_median_s": round(median, 6),
                "latency_min_s": round(min(seconds), 6),
                "first_run_s": round(first_s, 4),
                "volumes_per_s": round(batch / median, 3),
                "cosine_min": round(worst.cosine, 6),
                "max_abs_diff": float(f"{max(c.max_abs_diff for c in checks):.3g}"),
                "within_tolerance": worst.cosine >= MIN_COSINE
                and max(c.max_abs_diff for c in checks) <= MAX_ABS_DIFF,
            }
        del session
    return result


def load_input(arguments: argparse.Namespace, target_shape: tuple[int, int, int]) -> tuple:
    """(model input [1, 1, D, H, W] float32, where it came from)."""
    shape = (1, 1, *target_shape)
    if arguments.input is not None:
        volume = np.load(arguments.input).astype(np.float32).reshape(shape)
        return volume, str(arguments.input)
    study = arguments.study
    if study is None and not arguments.synthetic:
        from benchmarks.studies import STUDY_300, ensure_studies

        try:
            study = ensure_studies((STUDY_300,))[STUDY_300.name]
        except (FileNotFoundError, OSError):
            study = None  # no fixtures beside the project (e.g. on a device machine)
    if study is not None:
        from benchmarks.run import _prepare

        return _prepare(study, load_settings(environ={})), str(study)
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, shape).astype(np.float32), "synthetic uniform [-1, 1]"


def render(results: list[ProviderResult], source: str, encoder: Path) -> str:
    lines = [
        f"encoder {encoder} ({encoder.stat().st_size / 1e6:.0f} MB), input: {source}",
        f"onnxruntime {ort.__version__}, available providers: "
        + ", ".join(ort.get_available_providers()),
        "",
        "| provider | batch | latency (median / fastest) | volumes/s | first run | parity vs CPU FP32 |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        if result.status != "ok":
            lines.append(f"| {result.provider} | - | {result.status} | | | |")
            continue
        for batch, row in result.by_batch.items():
            verdict = "within" if row["within_tolerance"] else "OUTSIDE"
            lines.append(
                f"| {result.provider} | {batch} | {row['latency_median_s']:.3f} / "
                f"{row['latency_min_s']:.3f} s | {row['volumes_per_s']:.2f} | "
                f"{row['first_run_s']:.2f} s (session {result.session_start_s:.1f} s) | "
                f"cosine {row['cosine_min']:.6f}, max abs {row['max_abs_diff']:.2g}: {verdict} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--providers", nargs="+", default=["cpu", "cuda", "tensorrt-fp16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=5)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, help="a saved model input (.npy)")
    source.add_argument("--study", type=Path, help="a DICOM zip or folder")
    source.add_argument("--synthetic", action="store_true", help="uniform noise input")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    arguments = parser.parse_args(argv)
    for name in arguments.providers:
        if name not in PROVIDER_NAMES:
            parser.error(f"unknown provider {name!r} (choose from {', '.join(PROVIDER_NAMES)})")
    repository = (
        arguments.repository or load_settings(environ={}).inference.model_repository
    ).resolve()
    encoder = onnx_paths(repository)[ENCODER_NAME]
    volume, source_name = load_input(arguments, read_metadata(repository).target_shape)
    cpu = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    input_name = cpu.get_inputs()[0].name
    reference = cpu.run(None, {input_name: volume})[0][0]
    del cpu
    results = [
        measure_provider(
            name, encoder, input_name, volume, reference, arguments.batches, arguments.runs
        )
        for name in arguments.providers
    ]
    print(render(results, source_name, encoder))
    if arguments.json is not None:
        arguments.json.write_text(
            json.dumps({"input": source_name, "results": [asdict(r) for r in results]}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
