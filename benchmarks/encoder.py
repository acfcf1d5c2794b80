"""The encoder alone: sessions compared, operator profile, reduced precision, providers.

``benchmarks.run`` takes its encoder rows from here; candidates run interleaved on the same
input (the machine may be shared). The command measures the encoder on each execution
provider with parity against FP32 on the CPU (the GPU measurement; README: "GPU"):

    .venv/bin/python -m benchmarks.encoder [--repository DIR] [--encoder ONNX] [--json OUT.json]
        [--providers cpu cuda tensorrt-fp16] [--batches 1 2 4] [--runs 5]
        [--input MODEL_INPUT.npy | --study ZIP | --synthetic]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.embedded import benchmark_settings, model_input_of
from benchmarks.limit import node_gflop
from benchmarks.studies import STUDY_300, ensure_studies
from services.core.arrays import Embedding, ModelInput
from services.core.inference.onnxruntime_backend import onnx_paths, session_options
from services.core.model_metadata import ENCODER_NAME, read_metadata

# An execution provider: its name, or its name with its options.
Provider = str | tuple[str, dict[str, Any]]
CPU: list[Provider] = ["CPUExecutionProvider"]
MIN_COSINE = 0.999
MAX_ABS_DIFF = 0.01
WIRE_NOISE = 1e-6  # the input perturbation that shows how sensitive the embedding is
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt-fp16": "TensorrtExecutionProvider",
}
PROFILE = (("min", 1), ("opt", 2), ("max", 4))  # TensorRT's optimisation profile: batches


@dataclass(frozen=True)
class Agreement:
    input_name: str
    cosine: float
    max_abs_diff: float

    @property
    def within_tolerance(self) -> bool:
        return self.cosine >= MIN_COSINE and self.max_abs_diff <= MAX_ABS_DIFF


def agreement(name: str, reference: Embedding, candidate: Embedding) -> Agreement:
    a, b = reference.ravel().astype(np.float64), candidate.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return Agreement(name, cosine, float(np.abs(a - b).max()))


def _run(session: ort.InferenceSession, volume: ModelInput) -> Embedding:
    return session.run(None, {session.get_inputs()[0].name: volume})[0]


def bare_options() -> ort.SessionOptions:
    """onnxruntime's defaults, as a straightforward script gets them."""
    return ort.SessionOptions()


def configured_options() -> ort.SessionOptions:
    """The backend's session options (services.core.inference.onnxruntime_backend)."""
    return session_options(0)


@dataclass(frozen=True)
class Candidate:
    label: str
    path: Path
    options: Callable[[], ort.SessionOptions] = configured_options
    providers: list[Provider] = field(default_factory=lambda: CPU)


@dataclass
class CandidateResult:
    label: str
    provider: str  # the session's first provider: the one that runs the graph
    session_start_s: float
    first_run_s: float  # the warm-up run: allocations, engine builds
    embedding: Embedding  # of the warm-up run
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min_s(self) -> float:
        return min(self.seconds)


def compare(candidates: list[Candidate], volume: ModelInput, runs: int) -> list[CandidateResult]:
    """Every candidate ``runs`` times, interleaved, after one warm-up run each."""
    sessions, results = [], []
    for candidate in candidates:
        started = time.perf_counter()
        session = ort.InferenceSession(
            str(candidate.path), candidate.options(), providers=candidate.providers
        )
        start_s = time.perf_counter() - started
        embedding = _run(session, volume)
        first_s = time.perf_counter() - started - start_s
        sessions.append(session)
        provider = session.get_providers()[0]
        results.append(CandidateResult(candidate.label, provider, start_s, first_s, embedding))
    for _ in range(runs):
        for session, result in zip(sessions, results, strict=True):
            started = time.perf_counter()
            _run(session, volume)
            result.seconds.append(time.perf_counter() - started)
    return results


@dataclass(frozen=True)
class OperatorShare:
    op_type: str
    seconds: float  # per run
    share: float  # of the summed operator time
    count: int  # nodes of this type run per inference
    gflop: float = 0.0  # per run, where the profiled shapes say (benchmarks.limit.node_gflop)

    @property
    def gflops(self) -> float:
        return self.gflop / self.seconds if self.seconds else 0.0


def _shapes(entries: list[dict[str, list[int]]]) -> list[list[int]]:
    return [next(iter(entry.values())) for entry in entries]


def profile_operators(
    path: Path,
    volume: ModelInput,
    runs: int = 2,
    options_factory: Callable[[], ort.SessionOptions] | None = None,
) -> list[OperatorShare]:
    """Operator time per run from onnxruntime's profiler, the warm-up run left out."""
    options = (options_factory or configured_options)()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="cts-ort-profile-") as folder:
        options.profile_file_prefix = str(Path(folder) / "encoder")
        session = ort.InferenceSession(str(path), options, providers=CPU)
        for _ in range(runs + 1):
            _run(session, volume)
        events = json.loads(Path(session.end_profiling()).read_text())
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    gflop: dict[str, float] = defaultdict(float)
    for event in events:
        if (
            event.get("cat") == "Node"
            and event.get("name", "").endswith("_kernel_time")
            and event["ts"] > first["ts"] + first["dur"]
        ):
            arguments = event["args"]
            op_type = arguments.get("op_name", "?")
            seconds[op_type] += event["dur"] / 1e6 / runs
            counts[op_type] += 1
            outputs = _shapes(arguments.get("output_type_shape", []))
            inputs = _shapes(arguments.get("input_type_shape", []))
            gflop[op_type] += node_gflop(op_type, inputs, outputs[0] if outputs else []) / runs
    total = sum(seconds.values()) or 1.0
    shares = [
        OperatorShare(op, s, s / total, counts[op] // runs, gflop[op]) for op, s in seconds.items()
    ]
    return sorted(shares, key=lambda share: -share.seconds)


def wire_format_check(path: Path, model_input: ModelInput) -> tuple[Agreement, Agreement, float]:
    """A half-size wire format (FP16 input, cast back to FP32 inside the graph; rounding to
    FP16 and back is exactly what a Cast node computes) against FP32, and for scale uniform
    noise of +-WIRE_NOISE: both agreements and the largest input rounding."""
    session = ort.InferenceSession(str(path), providers=CPU)
    reference = _run(session, model_input)
    half = model_input.astype(np.float16).astype(np.float32)
    input_error = float(np.abs(half - model_input).max())
    fp16 = agreement("fp16", reference, _run(session, half))
    del half
    noise = np.random.default_rng(0).uniform(-WIRE_NOISE, WIRE_NOISE, model_input.shape)
    noisy = (model_input + noise.astype(np.float32)).astype(np.float32)
    del noise
    return fp16, agreement("noise", reference, _run(session, noisy)), input_error


# -- execution providers (the command) ------------------------------------------------------


def provider_chain(
    name: str, input_name: str, shape: tuple[int, ...], cache: Path
) -> list[Provider]:
    """The providers list for ``name``, with the options each needs."""
    cuda = ("CUDAExecutionProvider", {"device_id": 0})
    if name == "cpu":
        return CPU
    if name == "cuda":
        return [cuda, *CPU]
    volume = "x".join(str(n) for n in shape[1:])
    profiles = {f"trt_profile_{k}_shapes": f"{input_name}:{b}x{volume}" for k, b in PROFILE}
    tensorrt = {"device_id": 0, "trt_fp16_enable": True, **profiles}
    tensorrt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    return [("TensorrtExecutionProvider", tensorrt), cuda, *CPU]


def batch_of(volume: ModelInput, batch: int) -> ModelInput:
    """``batch`` copies of a ``[1, 1, D, H, W]`` volume, contiguous."""
    return np.ascontiguousarray(np.repeat(volume, batch, axis=0))


def measure_providers(
    encoder: Path, names: list[str], volume: ModelInput, batches: list[int], runs: int
) -> list[dict[str, Any]]:
    """Per provider: a status ("ok" or why not measured) and per batch the latency, the
    volumes per second, the first run and the parity of every volume against CPU FP32."""
    cpu = ort.InferenceSession(str(encoder), providers=CPU)
    input_name, reference = cpu.get_inputs()[0].name, _run(cpu, volume)[0]
    del cpu
    available, results = ort.get_available_providers(), []
    with tempfile.TemporaryDirectory(prefix="cts-trt-cache-") as cache:
        for name in names:
            result: dict[str, Any] = {"provider": name, "status": "ok", "by_batch": {}}
            results.append(result)
            if PROVIDER_NAMES[name] not in available:
                result["status"] = f"not available in this build (has {', '.join(available)})"
                continue
            chain = provider_chain(name, input_name, volume.shape, Path(cache))
            candidate = Candidate(name, encoder, bare_options, chain)
            for batch in batches:
                try:
                    (timed,) = compare([candidate], batch_of(volume, batch), runs)
                except Exception as error:  # noqa: BLE001 - reported in the table
                    result["status"] = f"session failed: {type(error).__name__}: {error}"
                    break
                if timed.provider != PROVIDER_NAMES[name]:
                    result["status"] = f"fell back to {timed.provider}"
                    break
                checks = [agreement(name, reference, embedding) for embedding in timed.embedding]
                result["by_batch"][batch] = {
                    "latency_median_s": round(timed.median_s, 6),
                    "latency_min_s": round(timed.min_s, 6),
                    "first_run_s": round(timed.first_run_s, 4),
                    "session_start_s": round(timed.session_start_s, 2),
                    "volumes_per_s": round(batch / timed.median_s, 3),
                    "cosine_min": round(min(check.cosine for check in checks), 6),
                    "max_abs_diff": float(f"{max(c.max_abs_diff for c in checks):.3g}"),
                    "within_tolerance": all(check.within_tolerance for check in checks),
                }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument(
        "--encoder",
        type=Path,
        help="this ONNX graph instead of the repository's (e.g. the portable one of a "
        "--flavour tensorrt repository for TensorRT: the default graph's attention is "
        "ONNX Runtime's com.microsoft.MultiHeadAttention, which TensorRT leaves to CUDA)",
    )
    parser.add_argument(
        "--providers", nargs="+", default=list(PROVIDER_NAMES), choices=PROVIDER_NAMES
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=5)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, help="a saved model input (.npy)")
    source.add_argument("--study", type=Path, help="a DICOM zip or folder")
    source.add_argument("--synthetic", action="store_true", help="uniform noise input")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    arguments = parser.parse_args(argv)
    settings = benchmark_settings(arguments.repository)
    repository = settings.inference.model_repository
    shape = (1, 1, *read_metadata(repository).target_shape)
    if arguments.input is not None:
        volume, name = np.load(arguments.input).astype(np.float32).reshape(shape), arguments.input
    elif arguments.synthetic:
        volume = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
        name = "synthetic uniform [-1, 1]"
    else:
        name = arguments.study or ensure_studies((STUDY_300,))[STUDY_300.name]
        volume = model_input_of(name, settings)
    encoder = arguments.encoder or onnx_paths(repository)[ENCODER_NAME]
    results = measure_providers(
        encoder, arguments.providers, volume, arguments.batches, arguments.runs
    )
    document = {
        "encoder": f"{encoder} ({encoder.stat().st_size / 1e6:.0f} MB)",
        "input": str(name),
        "onnxruntime": f"{ort.__version__}, providers {', '.join(ort.get_available_providers())}",
        "results": results,
    }
    print(json.dumps(document, indent=2))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
