"""The encoder against the machine's own limit (README: "Encoder against the machine's limit").

The limit is ONNX Runtime's FP32 GEMM on this machine, measured in the same run with the
same session options: one MatMul shaped like the encoder's largest products (tokens x dim
@ dim x 4 dim; 13824x512 @ 512x2048 for CT-CLIP). The encoder's achieved rate is its
arithmetic (counted from the architecture, `encoder_gflop`) over its time. Both are timed
interleaved, round by round, so that a shared machine slows both alike: each round times
the GEMM ``GEMM_RUNS_PER_ROUND`` times (its fastest is the round's peak) and the encoder
once. Wall time gives the share a user sees; process CPU time (all threads) gives the
share per core-second, which time slicing by other processes does not inflate.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from services.core.arrays import ModelInput

GEMM_RUNS_PER_ROUND = 3
CPU = ["CPUExecutionProvider"]


@dataclass(frozen=True)
class GemmShape:
    m: int
    k: int
    n: int

    @property
    def gflop(self) -> float:
        return 2.0 * self.m * self.k * self.n / 1e9

    @property
    def label(self) -> str:
        return f"{self.m}x{self.k} @ {self.k}x{self.n}"


def _grid(ctvit: dict[str, Any]) -> tuple[int, int, int]:
    """(t, h, w) tokens of the encoder's input."""
    side = ctvit["image_size"] // ctvit["patch_size"]
    depth = ctvit.get("input_depth") or side * ctvit["temporal_patch_size"]
    return depth // ctvit["temporal_patch_size"], side, side


def peak_gemm_shape(ctvit: dict[str, Any]) -> GemmShape:
    """tokens x dim @ dim x 4 dim: the shape of the encoder's largest products."""
    t, h, w = _grid(ctvit)
    return GemmShape(t * h * w, ctvit["dim"], 4 * ctvit["dim"])


def encoder_gflop(ctvit: dict[str, Any], dim_latent: int) -> dict[str, float]:
    """The encoder's arithmetic per volume (multiply-adds x 2), by part.

    Patch embedding, per layer q/k/v/out projections, attention scores and weighted sums,
    the GEGLU feed-forward, the depthwise position convolution; the vector quantiser's
    codebook product and the latent projection. Elementwise work (norms, GELU, softmax)
    is not counted: it is what the limit leaves no time for.
    """
    t, h, w = _grid(ctvit)
    tokens, dim = t * h * w, ctvit["dim"]
    inner = ctvit["heads"] * ctvit["dim_head"]
    ff_inner = int(4 * (2 / 3) * dim)
    patch = ctvit["temporal_patch_size"] * ctvit["patch_size"] ** 2
    projections = 2 * tokens * dim * inner * 4  # q, k, v, out
    feed_forward = 2 * tokens * dim * 2 * ff_inner + 2 * tokens * ff_inner * dim
    position = 2 * tokens * dim * 27
    spatial_attention = 2 * 2 * tokens * (h * w) * inner  # scores and weighted sum
    temporal_attention = 2 * 2 * tokens * t * inner
    layer = projections + feed_forward + position
    parts = {
        "patch embedding": 2 * tokens * patch * dim,
        "spatial layers": ctvit["spatial_depth"] * (layer + spatial_attention),
        "temporal layers": ctvit["temporal_depth"] * (layer + temporal_attention),
        "vector quantiser": 2 * tokens * dim * ctvit["codebook_size"],
        "latent projection": 2 * h * w * dim * dim_latent,
    }
    return {name: flop / 1e9 for name, flop in parts.items()}


def gemm_model(shape: GemmShape, seed: int = 0) -> bytes:
    """One MatMul with a constant weight (pre-packed by ONNX Runtime, as the encoder's are)."""
    weight = np.random.default_rng(seed).standard_normal((shape.k, shape.n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "peak_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [shape.m, shape.k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape.m, shape.n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model.SerializeToString()


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float  # this process, all threads


def timed_once(call: Callable[[], object]) -> Timing:
    cpu, started = process_cpu_seconds(), time.perf_counter()
    call()
    return Timing(wall_s=time.perf_counter() - started, cpu_s=process_cpu_seconds() - cpu)


@dataclass
class Timings:
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def timed(self, call: Callable[[], object]) -> None:
        timing = timed_once(call)
        self.wall_s.append(timing.wall_s)
        self.cpu_s.append(timing.cpu_s)


@dataclass(frozen=True)
class LimitResult:
    shape: GemmShape
    encoder_gflop: float
    gemm_rounds: list[Timings]  # per round, GEMM_RUNS_PER_ROUND runs
    encoder: Timings  # one run per round
    threads: int

    def _gemm(self, kind: str) -> list[float]:
        """Per round: the fastest GEMM run (wall or CPU seconds)."""
        return [min(getattr(t, f"{kind}_s")) for t in self.gemm_rounds]

    @property
    def peak_gflops(self) -> float:
        """The GEMM's rate: median over the rounds of each round's fastest run."""
        return self.shape.gflop / statistics.median(self._gemm("wall"))

    @property
    def best_peak_gflops(self) -> float:
        return self.shape.gflop / min(self._gemm("wall"))

    @property
    def encoder_gflops(self) -> float:
        return self.encoder_gflop / statistics.median(self.encoder.wall_s)

    @property
    def share(self) -> float:
        """Median over the rounds of (encoder rate / that round's GEMM rate), wall time."""
        return statistics.median(
            (self.encoder_gflop / enc) / (self.shape.gflop / gemm)
            for enc, gemm in zip(self.encoder.wall_s, self._gemm("wall"), strict=True)
        )

    @property
    def best_share(self) -> float:
        """Fastest encoder run against the fastest GEMM run: the quietest moments."""
        return (self.encoder_gflop / min(self.encoder.wall_s)) / self.best_peak_gflops

    @property
    def cpu_share(self) -> float:
        """The same median share per core-second (process CPU time, all threads)."""
        return statistics.median(
            (self.encoder_gflop / enc) / (self.shape.gflop / gemm)
            for enc, gemm in zip(self.encoder.cpu_s, self._gemm("cpu"), strict=True)
        )


def measure_limit(
    encoder: Path,
    volume: ModelInput,
    *,
    ctvit: dict[str, Any],
    dim_latent: int,
    options: Callable[[], ort.SessionOptions],
    rounds: int,
) -> LimitResult:
    """The GEMM peak and the encoder, interleaved for ``rounds`` rounds after a warm-up."""
    shape = peak_gemm_shape(ctvit)
    gemm = ort.InferenceSession(gemm_model(shape), options(), providers=CPU)
    session = ort.InferenceSession(str(encoder), options(), providers=CPU)
    matrix = np.random.default_rng(1).standard_normal((shape.m, shape.k)).astype(np.float32)
    feed = {session.get_inputs()[0].name: volume}

    def run_gemm() -> None:
        gemm.run(None, {"x": matrix})

    def run_encoder() -> None:
        session.run(None, feed)

    run_gemm()  # warm-up
    run_encoder()
    gemm_rounds, encoder_runs = [], Timings()
    for _ in range(rounds):
        round_timings = Timings()
        for _ in range(GEMM_RUNS_PER_ROUND):
            round_timings.timed(run_gemm)
        gemm_rounds.append(round_timings)
        encoder_runs.timed(run_encoder)
    threads = options().intra_op_num_threads
    return LimitResult(
        shape=shape,
        encoder_gflop=sum(encoder_gflop(ctvit, dim_latent).values()),
        gemm_rounds=gemm_rounds,
        encoder=encoder_runs,
        threads=threads,
    )


def node_gflop(op_type: str, inputs: Sequence[Sequence[int]], output: Sequence[int]) -> float:
    """Arithmetic of one profiled node from the shapes ONNX Runtime's profiler records (its
    activation inputs and first output); 0 where the shapes do not say (Conv, elementwise).
    """
    if not inputs or not output:
        return 0.0
    first = list(inputs[0])
    if op_type in ("MatMul", "FusedMatMul", "Gemm"):
        # The contraction is the dimension of the first input that the output lacks.
        contracted = first[-1] if len(first) < 2 or first[-2] == output[-2] else first[-2]
        return 2.0 * float(np.prod(output)) * contracted / 1e9
    if op_type == "MultiHeadAttention" and len(inputs) >= 2:
        batch, queries, hidden = first
        keys = list(inputs[1])[-2]
        return 4.0 * batch * queries * keys * hidden / 1e9
    return 0.0
