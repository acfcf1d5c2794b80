"""The encoder alone: session configurations compared, operator profile, INT8 tolerance.

Other processes may share the CPU, so candidates run interleaved (A, B, A, B, ...) on the
same input in one process and the medians are compared; the fastest run is reported too.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.core.inference.onnxruntime_backend import session_options

PROVIDERS = ["CPUExecutionProvider"]


@dataclass(frozen=True)
class Candidate:
    label: str
    path: Path
    options: Callable[[], ort.SessionOptions]


@dataclass
class CandidateResult:
    label: str
    seconds: list[float]
    embedding: np.ndarray
    session_start_s: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min_s(self) -> float:
        return min(self.seconds)


def bare_options() -> ort.SessionOptions:
    """onnxruntime's defaults, as a straightforward script gets them."""
    return ort.SessionOptions()


def configured_options(threads: int = 0) -> Callable[[], ort.SessionOptions]:
    """The backend's session options (services.core.inference.onnxruntime_backend)."""
    return lambda: session_options(threads)


def _run(session: ort.InferenceSession, volume: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: volume})[0]


def compare(candidates: list[Candidate], volume: np.ndarray, runs: int) -> list[CandidateResult]:
    """Every candidate ``runs`` times, interleaved, after one warm-up run each."""
    sessions, results = [], []
    for candidate in candidates:
        started = time.perf_counter()
        session = ort.InferenceSession(
            str(candidate.path), candidate.options(), providers=PROVIDERS
        )
        start_s = time.perf_counter() - started
        embedding = _run(session, volume)  # warm-up: first-run allocations
        sessions.append(session)
        results.append(CandidateResult(candidate.label, [], embedding, start_s))
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


def profile_operators(path: Path, volume: np.ndarray, runs: int = 2) -> list[OperatorShare]:
    """Operator time per run from onnxruntime's profiler, the warm-up run left out."""
    options = session_options(0)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="cts-ort-profile-") as folder:
        options.profile_file_prefix = str(Path(folder) / "encoder")
        session = ort.InferenceSession(str(path), options, providers=PROVIDERS)
        for _ in range(runs + 1):
            _run(session, volume)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted(
        (event for event in events if event.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    warm_up_end = model_runs[0]["ts"] + model_runs[0]["dur"]
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in events:
        if (
            event.get("cat") == "Node"
            and event.get("name", "").endswith("_kernel_time")
            and event["ts"] > warm_up_end
        ):
            op_type = event["args"].get("op_name", "?")
            seconds[op_type] += event["dur"] / 1e6 / runs
            counts[op_type] += 1
    total = sum(seconds.values()) or 1.0
    return sorted(
        (
            OperatorShare(op, value, value / total, counts[op] // runs)
            for op, value in seconds.items()
        ),
        key=lambda share: -share.seconds,
    )


@dataclass(frozen=True)
class Agreement:
    input_name: str
    cosine: float
    max_abs_diff: float


def agreement(name: str, reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    a, b = reference.ravel().astype(np.float64), candidate.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return Agreement(name, cosine, float(np.abs(a - b).max()))


def quantise_dynamic_int8(source: Path, output: Path, exclude: list[str] | None = None) -> Path:
    """INT8 dynamic quantisation of the MatMuls with constant weights (onnxruntime's tool)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The exporter's stale value_info entries fail the quantiser's shape inference.
    model = onnx.load(str(source))
    del model.graph.value_info[:]
    cleaned = output.with_name("fp32_for_quantisation.onnx")
    onnx.save(model, str(cleaned))
    del model
    quantize_dynamic(
        str(cleaned),
        str(output),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=exclude or [],
        extra_options={"MatMulConstBOnly": True},
    )
    cleaned.unlink()
    return output
