"""Table rows measured against this machine: the GEMM limit, the operator profile in GFLOP/s,
cold start and CPU cost per study (README: "Encoder against the machine's limit",
"Cold start", "CPU cost per study"). `benchmarks.run` calls these; each returns rows."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import cold_start
from benchmarks import encoder as enc
from benchmarks.limit import (
    GEMM_RUNS_PER_ROUND,
    LimitResult,
    Timing,
    encoder_gflop,
    measure_limit,
)
from benchmarks.measure import table_row
from services.core.arrays import ModelInput
from services.core.model_metadata import ModelMetadata

LIMIT_TARGET = 0.85  # issue 17: the encoder's achieved rate as a share of the GEMM peak
COLD_START_TARGET = 1.5  # issue 17: a new process's study within 1.5x the warm encoder
GEMM_OPS = ("MatMul", "FusedMatMul", "Gemm", "MultiHeadAttention")
BEFORE_THE_MODEL = ("intake", "headers", "selection", "volume", "chest_check", "preprocessing")


def limit_rows(
    path: Path, model_input: ModelInput, metadata: ModelMetadata, rounds: int
) -> tuple[LimitResult, list[str]]:
    """The GEMM peak and the encoder interleaved; the share with its target."""
    print(f"encoder against the GEMM peak: {rounds} rounds ...", flush=True)
    ctvit, dim_latent = metadata.ctvit_config["ctvit"], int(metadata.ctvit_config["dim_latent"])
    result = measure_limit(
        path,
        model_input,
        ctvit=ctvit,
        dim_latent=dim_latent,
        options=enc.configured_options,
        rounds=rounds,
    )
    parts = encoder_gflop(ctvit, dim_latent)
    status = "met" if result.share >= LIMIT_TARGET else "not met: profile below"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return result, [
        table_row(
            "limit: ONNX Runtime FP32 GEMM peak (same session options)",
            f"{result.peak_gflops:.0f} GFLOP/s (best {result.best_peak_gflops:.0f})",
            f"MatMul {result.shape.label}",
            "",
            f"{rounds} rounds of {GEMM_RUNS_PER_ROUND} GEMM runs (fastest per round; median over rounds) "
            f"interleaved with one encoder run each; threads "
            f"{result.threads or 'auto'}; load average after: {load}",
        ),
        table_row(
            "encoder's achieved rate, share of the GEMM peak",
            f"{result.encoder_gflops:.0f} GFLOP/s, {100 * result.share:.0f}%",
            "same input shape",
            f"{100 * result.share:.0f}% (target >= {100 * LIMIT_TARGET:.0f}%: {status})",
            f"{result.encoder_gflop:.0f} GFLOP per volume ("
            + ", ".join(f"{name} {gflop:.0f}" for name, gflop in parts.items())
            + f"); encoder median {_median(result.encoder.wall_s):.2f} s; per round, "
            f"median; the quietest moment (fastest encoder / fastest GEMM) "
            f"{100 * result.best_share:.0f}%; per core-second (CPU time) "
            f"{100 * result.cpu_share:.0f}%",
        ),
    ]


def _median(values: list[float]) -> float:
    return float(np.median(values))


def profile_row(operators: list[enc.OperatorShare], peak_gflops: float) -> str:
    """Where the time goes: the GEMM-type operators at their rate, the rest by share."""
    total = sum(op.seconds for op in operators) or 1.0
    gemm = [op for op in operators if op.op_type in GEMM_OPS]
    gemm_seconds = sum(op.seconds for op in gemm)
    gemm_gflop = sum(op.gflop for op in gemm)
    rate = gemm_gflop / gemm_seconds if gemm_seconds else 0.0
    head = (
        f"GEMM-type ({', '.join(op.op_type for op in gemm)}) {100 * gemm_seconds / total:.0f}% "
        f"of the operator time, {gemm_gflop:.0f} GFLOP at {rate:.0f} GFLOP/s = "
        f"{100 * rate / peak_gflops:.0f}% of the peak ("
        + ", ".join(f"{op.op_type} {op.gflops:.0f} GFLOP/s" for op in gemm)
        + "); the rest: "
    )
    rest = ", ".join(
        f"{op.op_type} {100 * op.share:.1f}% ({op.seconds:.2f} s, {op.count} nodes)"
        for op in operators
        if op.op_type not in GEMM_OPS and op.share >= 0.005
    )
    # The most the share could be with this graph: every GEMM-type operator at the peak and
    # the operators that count no arithmetic as they are.
    at_peak = gemm_gflop / peak_gflops if peak_gflops else 0.0
    bound = at_peak / (at_peak + total - gemm_seconds) if at_peak else 0.0
    ceiling = (
        f"; the share's ceiling with this graph (GEMM-type at the peak, the rest as profiled): "
        f"{100 * bound:.0f}%"
    )
    return table_row("encoder profile (onnxruntime profiler)", "", "", "", head + rest + ceiling)


def batch_cold_start_rows(
    study: Path,
    repository: Path,
    warm_encoder: Callable[[], Timing],
    warm_preparation_s: float,
    rounds: int,
) -> list[str]:
    """``warm_encoder``: one run of a warm encoder session (timed before each cached start:
    the ratio is the median of the pairs); ``warm_preparation_s``: the study's stages before
    the model in a warm process (the pipeline rows' medians), which no cold-start work can
    shorten."""
    print("cold start: the batch over one study in new processes ...", flush=True)
    result = cold_start.batch_cold_start(study, repository, rounds, warm_encoder)
    cached = result.median_wall(result.cached)
    uncached = result.median_wall(result.uncached)
    warm_walls = [run.wall_s for run in result.warm_encoder]
    warm_encoder_s = statistics.median(warm_walls)
    warm_cpu = statistics.median(run.cpu_s for run in result.warm_encoder)
    ratio = statistics.median(result.paired_ratios())
    overheads = result.paired_overheads()
    status = "met" if ratio <= COLD_START_TARGET else "not met: located in the notes"
    cpu = result.median_cpu(result.cached)
    cores = len(os.sched_getaffinity(0))  # the logical CPUs this process may run on
    inference = result.median_stage(result.cached, "inference")
    prepared = sum(result.median_stage(result.cached, stage) for stage in BEFORE_THE_MODEL)
    # No start-up, no first-run cost, nothing written: the study's warm preparation and the
    # warm encoder, one after the other (the model needs the prepared input).
    floor = (warm_preparation_s + warm_encoder_s) / warm_encoder_s
    # A new process also touches its memory once: its minor faults at the probe's cost per
    # fault (an estimate: the probe's pages are 4 KiB; numpy's large arrays may be 2 MB).
    faults = result.median_of(result.cached, "minor_faults")
    first_touch = faults * result.first_touch_s_per_fault
    floor_touched = (warm_preparation_s + warm_encoder_s + first_touch) / warm_encoder_s
    # The target's wall time on every CPU, less the warm encoder run's own work: what it
    # leaves for everything else, were every CPU busy from start to exit.
    budget = COLD_START_TARGET * warm_encoder_s * cores - warm_cpu
    # The target's wall time with this run's work: how busy the CPUs would have to be.
    busy_needed = cpu / (COLD_START_TARGET * warm_encoder_s * cores)
    paired = (
        f"each cached start paired with a warm encoder run just before it (warm "
        f"{min(warm_walls):.2f}-{max(warm_walls):.2f} s, {warm_cpu:.1f} core-s): overhead "
        f"(cold - warm) median {statistics.median(overheads):.2f} s, range "
        f"{min(overheads):.2f}-{max(overheads):.2f} s, ratios "
        + ", ".join(f"{r:.2f}x" for r in result.paired_ratios())
        + f"; its {cpu:.1f} core-s on {cores} logical CPUs take >= {cpu / cores:.2f} s "
        f"({cpu / cores / warm_encoder_s:.2f}x), the CPUs busy {cpu / cached / cores:.0%} of "
        f"the run ({COLD_START_TARGET}x with this work needs {busy_needed:.0%}); all but the "
        f"warm encoder's work {statistics.median(result.paired_cpu_overheads()):.1f} core-s, "
        f"where {COLD_START_TARGET}x leaves {budget:.1f} core-s with every CPU busy "
        f"throughout; "
    )
    located = paired + (
        f"the floor on this machine (warm preparation {warm_preparation_s:.2f} s + warm "
        f"encoder, nothing else): {floor:.2f}x; with the first touch of the process's "
        f"memory ({faults:,.0f} minor page faults x "
        f"{1e6 * result.first_touch_s_per_fault:.2f} us, what a new process pays here per "
        f"4 KiB page = {first_touch:.2f} s): {floor_touched:.2f}x; "
        f"of the cached runs: before the model (intake .. preprocessing) {prepared:.2f} s, "
        f"inference (waits for the background load, first run) {inference:.2f} s, outside "
        f"the pipeline (imports, start-up, xlsx/SR/previews) "
        f"{result.median_outside(result.cached):.2f} s"
    )
    return [
        table_row(
            "cold start: batch over one study, process start to its row",
            f"{cached:.2f} s ({cpu:.1f} core-s)",
            "",
            f"{ratio:.2f}x the warm encoder (median of {len(overheads)} pairs; warm "
            f"{warm_encoder_s:.2f} s); target <= {COLD_START_TARGET}x: {status}",
            f"python -m services.batch in a new process, start to exit; cached optimised "
            f"graph, sessions loading while the study is prepared; each start after "
            f"{result.settle_s:g} s with nothing running, each warm run in a process "
            f"of its own that has exited, this process holding {result.resident_mib:.0f} MiB; "
            f"{rounds} runs each, "
            f"alternating with inference.onnx_graph_cache: false: {uncached:.2f} s "
            f"({result.median_cpu(result.uncached):.1f} core-s); the first start after the "
            f"cache was cleared (optimises and saves): {result.first_start.wall_s:.2f} s; "
            + located,
        )
    ]


def triton_load_rows(repository: Path) -> list[str]:
    print("cold start: Triton's model load, first start and cached ...", flush=True)
    seconds = cold_start.triton_load_seconds(repository)
    return [
        table_row(
            "cold start: Triton (python flavour) model load, start to ready",
            f"{seconds['cached']:.2f} s",
            "",
            f"{seconds['saved'] / seconds['cached']:.2f}x faster than the first start",
            f"from the saved optimised graphs; the first start on this machine (cache "
            f"cleared: optimises and saves every model) {seconds['saved']:.2f} s",
        )
    ]


def stack_cold_and_cpu_rows(result: dict[str, Any]) -> list[str]:
    """From benchmarks.stack.measure_overhead: the adapter's first study, Triton's ready time
    inside that start, and the core-seconds per study of both shapes."""
    embedded, through = result["embedded"], result["stack"]
    cold = through["cold_start"]
    warm = through["submit_to_result"]["median_s"]
    embedded_cpu, stack_cpu = embedded["cpu_s"]["median_s"], through["cpu_s"]["median_s"]
    return [
        table_row(
            "cold start: an adapter's first study, process start to result",
            f"{cold['adapter_first_result_s']:.2f} s",
            "",
            f"{cold['adapter_first_result_s'] / warm:.2f}x its later studies ({warm:.2f} s)",
            f"full-size model; Triton already serving (its start to ready in this run: "
            f"{cold['triton_ready_s']:.1f} s); target <= {COLD_START_TARGET}x",
        ),
        table_row(
            "CPU cost per study: embedded / stack (core-seconds; wall)",
            f"{embedded_cpu:.1f} / {stack_cpu:.1f} core-s",
            "",
            f"{stack_cpu / embedded_cpu:.2f}x",
            f"full-size model, the interleaved pairs above; wall {embedded['median_s']:.2f} / "
            f"{warm:.2f} s; embedded: this process's CPU time; stack: the adapter, "
            f"tritonserver and its python-backend stubs (RabbitMQ not counted: shared)",
        ),
    ]
