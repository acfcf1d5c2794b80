"""Benchmark every stage of the pipeline against baselines measured in the same run.

    .venv/bin/python -m benchmarks.run [--quick] [--repetitions N] [--encoder-runs N]
        [--compare-encoder OLD.onnx] [--no-precision] [--no-cold-start] [--no-stack]
        [--limit-rounds N] [--cold-rounds N] [--no-registry] [--registry-sizes N [N ...]]
        [--no-readme]

Prints one table and writes it to benchmarks/README.md (between the result markers); the
README says what each row measures and which module measures it. ``--quick``: one
repetition, the 300-slice study only, two encoder runs, two limit rounds, one cold-start
round, no INT8 gate, no stack, and the README is left alone unless ``--readme`` is given.
A second table measures the study registry (benchmarks/registry.py) at 10k studies on SQLite
and PostgreSQL (about half a minute; ``--registry-sizes 10000 100000`` adds 100k, about a
minute more; five runs per read with ``--quick``; ``--no-registry`` skips it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from loguru import logger

from benchmarks import encoder as enc
from benchmarks import machine_rows as rows_of
from benchmarks import precision_rows as precision
from benchmarks import queueing, registry, stack
from benchmarks.embedded import benchmark_settings, fresh_process_rows, model_input_of
from benchmarks.measure import machine, table_row
from benchmarks.stages import StudyResult, TimedBackend, benchmark_study
from benchmarks.studies import STUDY_300, STUDY_600, ensure_studies
from benchmarks.warm_encoder import warm_encoder_in_new_process
from services.core.arrays import ModelInput
from services.core.inference.onnxruntime_backend import onnx_paths
from services.core.model_metadata import ENCODER_NAME, read_metadata
from services.core.process_memory import keep_freed_memory

README = Path(__file__).resolve().parent / "README.md"
RESULTS_START = "<!-- results:start (written by python -m benchmarks.run) -->"
RESULTS_END = "<!-- results:end -->"
TARGET_SHARE = "target <= 20% for the 300-slice study"
BPR_TARGET_SHARE = 0.15  # issue 10: the body-part regression stage vs the encoder
PIPELINE_CLOCK = "the pipeline's own stage clock, memory from the start of the study"
PLAIN_READ = "baseline: plain pydicom read (dcmread all, sort, stack)"
TORCH_PREPROCESSING = "baseline: torch F.interpolate preprocessing (CT-CLIP style)"
OVERHEAD_TITLE = "stack overhead, full-size model: embedded / stack per study"
LOCATED_TITLE = "stack overhead located: stack - embedded by pipeline stage; Triton's clock"
TRANSPORT_NOTES = (
    "same host: a registered region reused from study to study, the request carries its name "
    "(0 tensor bytes in gRPC); another host: the same bytes in the gRPC request"
)
STAGE_LABELS = {
    "intake": "intake (unzip, classify files)",
    "headers": "headers (read_studies + series selection)",
    "volume": "volume (decode + geometry: load_volume)",
    "chest check": "chest check (metadata + lung_air + body-part regression)",
    "preprocessing": "preprocessing (numpy, to 1x1x240x480x480)",
    "encoder": "encoder (ONNX Runtime, backend's session)",
    "heads": "heads (binary + multilabel)",
    "report": "report (findings, xlsx, json, warnings)",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a fast smoke run (see above)")
    add("--repetitions", type=int, default=3, help="timed passes per study")
    add("--encoder-runs", type=int, default=5, help="interleaved runs each")
    add("--repository", type=Path, help="default: the configured repository")
    add("--compare-encoder", type=Path, help="another encoder ONNX for the interleaved runs")
    add("--no-precision", action="store_true", help="skip the INT8 gate on the encoder")
    add("--no-cold-start", action="store_true", help="skip the new-process and Triton loads")
    add("--limit-rounds", type=int, default=5, help="GEMM peak / encoder rounds")
    add("--cold-rounds", type=int, default=2, help="batch processes with and without cache")
    add("--no-stack", action="store_true", help="skip the RabbitMQ/Triton part")
    add("--stack-runs", type=int, default=10, help="latency samples per mode")
    add("--stack-burst", type=int, default=8, help="tasks for throughput")
    add("--overhead-runs", type=int, default=4, help="embedded/stack pairs, full-size model")
    add("--no-registry", action="store_true", help="skip the study registry's table")
    add(
        "--registry-sizes",
        type=int,
        nargs="+",
        default=list(registry.DEFAULT_SIZES),
        help="studies in each registry measured",
    )
    add(
        "--registry-repetitions",
        type=int,
        default=registry.Options.repetitions,
        help="timed runs per registry read",
    )
    readme = parser.add_mutually_exclusive_group()
    readme.add_argument("--readme", action="store_true", help="write README.md even if --quick")
    readme.add_argument("--no-readme", action="store_true", help="do not write README.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = _parse(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if arguments.quick:
        arguments.repetitions, arguments.encoder_runs, arguments.no_stack = 1, 2, True
        arguments.limit_rounds, arguments.cold_rounds, arguments.no_precision = 2, 1, True
        arguments.registry_repetitions = 5
    command = "python -m benchmarks.run" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv)
    )
    host, memory_kept = machine(), keep_freed_memory()
    started = dt.datetime.now().astimezone()
    settings = benchmark_settings(arguments.repository)
    repository = settings.inference.model_repository
    studies = ensure_studies((STUDY_300,) if arguments.quick else (STUDY_300, STUDY_600))
    print(f"{host.description}\nmodel repository: {repository}", flush=True)

    backend = TimedBackend(repository, settings.inference)
    results = {}
    for name, path in studies.items():
        print(f"pipeline stages: {name} ...", flush=True)
        results[name] = benchmark_study(
            path, settings=settings, backend=backend, repetitions=arguments.repetitions
        )
    backend.close()
    del backend
    gc.collect()
    encoder_path = onnx_paths(repository)[ENCODER_NAME]
    metadata = read_metadata(repository)
    model_input = model_input_of(studies[STUDY_300.name], settings)
    limit, rows = rows_of.limit_rows(encoder_path, model_input, metadata, arguments.limit_rounds)
    rows += _encoder_rows(arguments, encoder_path, model_input, limit.peak_gflops)
    if not arguments.no_precision:
        rows += precision.int8_rows(encoder_path, model_input, settings, arguments.encoder_runs)
    rows += precision.bf16_row() + precision.wire_format_rows(encoder_path, model_input)
    study = studies[STUDY_300.name]
    if not arguments.no_cold_start:
        # The study's warm preparation, from the pipeline table's rows ("headers" holds the
        # series selection too).
        stages = results[STUDY_300.name].stages
        before_the_model = ("intake", "headers", "volume", "chest check", "preprocessing")
        warm_preparation = sum(stages[row].median_s for row in before_the_model)
        # The warm runs happen in processes of their own (benchmarks/warm_encoder.py), which
        # read the model input from a file: nothing here holds a session or the 221 MB input
        # while a new batch starts.
        with tempfile.TemporaryDirectory(prefix="cts-bench-warm-") as folder:
            volume_file = Path(folder) / "model_input.npy"
            np.save(volume_file, model_input)
            del model_input
            gc.collect()
            rows += rows_of.batch_cold_start_rows(
                study,
                repository,
                warm_encoder_in_new_process(encoder_path, volume_file),
                warm_preparation,
                arguments.cold_rounds,
            )
    else:
        del model_input
        gc.collect()
    rows += fresh_process_rows(studies, repository, quick=arguments.quick)
    rows += _stack_overhead_rows(arguments, study, repository)
    if not (arguments.no_stack or arguments.no_cold_start):
        rows += rows_of.triton_load_rows(repository)
    rows += _stack_rows(arguments, study, host.logical_cores)
    if not arguments.no_stack:
        print("queueing: refusals, STAT and wait estimates under a backlog ...", flush=True)
        rows += queueing.queueing_rows()

    header = [
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- command: `{command}`",
        f"- machine: {host.description}",
        f"- onnxruntime {ort.__version__}, numpy {np.__version__}; model: "
        f"{'DEMO weights' if metadata.demo else 'real weights'}, {metadata.model_version}, "
        f"intra-op threads {settings.inference.onnx_intra_op_threads or 'auto'}",
        "- times: medians of the timed passes after a warm-up pass; memory: peak a stage adds "
        "(max of kernel VmHWM delta and tracemalloc peak, warm-up pass); "
        + (
            "this process keeps freed memory (glibc mallopt), so baselines and pipeline do not "
            "pay for each other's page faults; the fresh-process rows compare glibc's default"
            if memory_kept
            else "glibc's default malloc"
        ),
        "",
    ]
    table = "\n".join(header + _stage_rows(results) + rows + _registry_rows(arguments)) + "\n"
    print(table)
    if arguments.readme or not (arguments.quick or arguments.no_readme):
        write_readme(table)
        print(f"written to {README}")
    return 0


def _cell(seconds: float, peak_mib: float | None = None) -> str:
    return f"{seconds:.2f} s" + ("" if peak_mib is None else f", {peak_mib:,.0f} MiB")


def _stage_rows(studies: dict[str, StudyResult]) -> list[str]:
    """The header and the rows of the pipeline stages, their totals and baselines (a)."""
    names = (STUDY_300.name, STUDY_600.name)
    columns = [studies.get(name) for name in names]
    titles = [f"{n} ({studies[n].n_slices} slices)" if n in studies else "-" for n in names]
    measured = [r for r in columns if r is not None]

    def cells(value: Callable[[StudyResult], str]) -> list[str]:
        return [value(r) if r is not None else "-" for r in columns]

    def stage(name: str) -> list[str]:
        return cells(lambda r: _cell(r.stages[name].median_s, r.stages[name].max_peak_mib))

    def median(r: StudyResult, *stages: str) -> float:
        return sum(r.stages[part].median_s for part in stages)

    def share(r: StudyResult) -> str:
        others = median(r, *STAGE_LABELS) - median(r, "encoder")
        return f"{others:.2f} s = {100 * others / median(r, 'encoder'):.0f}%"

    def ratio(reference: str, *ours: str) -> str:
        return " / ".join(f"{median(r, reference) / median(r, *ours):.1f}x" for r in measured)

    def bpr_share(r: StudyResult) -> str:
        return f"{100 * median(r, 'body-part regression') / median(r, 'encoder'):.1f}%"

    total = cells(lambda r: f"{median(r, *STAGE_LABELS):.2f} s")
    end_to_end = cells(lambda r: _cell(r.end_to_end_s, r.end_to_end_peak_mib))
    diffs = ", ".join(f"{r.reference_max_abs_diff:.1e}" for r in measured)
    agree = f"reference / ours; outputs agree within {diffs} (max abs)"
    return [
        table_row("measurement", *titles, "ratio", "notes"),
        "|---|---|---|---|---|",
        *(table_row(label, *stage(name), "", "") for name, label in STAGE_LABELS.items()),
        table_row(
            "of the chest check: body-part regression network",
            *stage("body-part regression"),
            "",
            f"share of the encoder: {' / '.join(bpr_share(r) for r in measured)}; target <= "
            f"{100 * BPR_TARGET_SHARE:.0f}% (0 s: the repository has no such model)",
        ),
        table_row("**all stages**", *total, "", "sum of the medians above"),
        table_row(
            "everything but the encoder, share of the encoder", *cells(share), "", TARGET_SHARE
        ),
        table_row(
            "end to end (process_input + write_reports, one run)", *end_to_end, "", PIPELINE_CLOCK
        ),
        table_row(
            PLAIN_READ,
            *stage("reference read"),
            f"{ratio('reference read', 'headers', 'volume')} vs headers + volume",
            "reference / ours",
        ),
        table_row(
            TORCH_PREPROCESSING,
            *stage("reference preprocessing"),
            f"{ratio('reference preprocessing', 'preprocessing')} vs preprocessing",
            agree,
        ),
    ]


def _runs_cell(result: enc.CandidateResult) -> str:
    return f"{result.median_s:.2f} s (fastest {result.min_s:.2f} s)"


def _encoder_rows(
    arguments: argparse.Namespace, path: Path, model_input: ModelInput, peak_gflops: float
) -> list[str]:
    """Baseline (b): the backend's session against a bare one, other graphs, the profile."""
    candidates = [enc.Candidate("bare", path, enc.bare_options), enc.Candidate("configured", path)]
    if arguments.compare_encoder is not None:
        label = f"other graph ({arguments.compare_encoder.name})"
        candidates.append(enc.Candidate(label, arguments.compare_encoder))
    print(f"encoder: {len(candidates)} sessions x {arguments.encoder_runs} runs ...", flush=True)
    bare, configured, *others = enc.compare(candidates, model_input, arguments.encoder_runs)
    gc.collect()
    print("encoder: operator profile ...", flush=True)
    operators = enc.profile_operators(path, model_input, runs=2)
    runs = f"{arguments.encoder_runs} runs; session start {configured.session_start_s:.1f} s"
    equal = np.array_equal(bare.embedding, configured.embedding)
    rows = [
        table_row(
            "encoder alone, backend's session (interleaved)",
            _runs_cell(configured),
            "same input shape",
            "",
            runs,
        ),
        table_row(
            "baseline: encoder, bare onnxruntime session (defaults)",
            _runs_cell(bare),
            "",
            f"{bare.median_s / configured.median_s:.2f}x",
            f"bare / configured, medians; embeddings equal: {equal}",
        ),
    ]
    for other in others:
        check = enc.agreement("", configured.embedding, other.embedding)
        notes = f"other / this graph, medians; cosine {check.cosine:.6f}, max abs diff {check.max_abs_diff:.1e}"
        speed = f"{other.median_s / configured.median_s:.2f}x"
        rows.append(table_row(f"encoder, {other.label}", _runs_cell(other), "", speed, notes))
    return [*rows, rows_of.profile_row(operators, peak_gflops)]


def _failed_row(title: str, error: Exception) -> list[str]:
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    return [table_row(title, "failed", "", "", reason)]


def _stack_overhead_rows(arguments: argparse.Namespace, study: Path, repository: Path) -> list[str]:
    """Per-study latency through the stack against embedded mode with the full-size model."""
    if arguments.no_stack:
        return []
    print("stack overhead: full-size model, embedded and stack interleaved ...", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="cts-bench-overhead-", dir=study.parent) as folder:
            runs = arguments.overhead_runs
            result = stack.measure_overhead(study.resolve(), repository, runs, Path(folder))
    except Exception as error:  # noqa: BLE001 - the rest of the table is still worth having
        return _failed_row(OVERHEAD_TITLE, error)
    embedded, through = result["embedded"], result["stack"]
    embedded_s, stack_s = embedded["median_s"], through["submit_to_result"]["median_s"]
    differences = ", ".join(
        f"{name} {through['stages'][name] - seconds:+.2f} s"
        for name, seconds in embedded["stages"].items()
        if abs(through["stages"].get(name, 0.0) - seconds) >= 0.01
    )
    encoder = through["triton_per_request_s"].get("ct_clip_encoder", {})
    ensemble = through["triton_per_request_s"].get("chest_screening", {})
    model_bytes = 4 * int(np.prod(read_metadata(repository).target_shape))
    overhead = (
        f"{embedded['runs']} interleaved pairs (ABBA order), medians; embedded = "
        "process_input + write_reports in this process; stack = submit to result on the "
        "reply queue, 1 adapter, Triton python flavour (inside the adapter "
        f"{through['inside_adapter']['median_s']:.2f} s, RabbitMQ the rest); target <= +10%"
    )
    located = (
        (differences or "no stage differs by 0.01 s or more")
        + f"; Triton per request: encoder queue {encoder.get('queue', 0):.3f} s, input copy "
        f"into the backend stub {encoder.get('compute_input', 0):.3f} s, compute "
        f"{encoder.get('compute_infer', 0):.2f} s; ensemble total {sum(ensemble.values()):.2f} s"
    )
    percent = f"{100 * (stack_s - embedded_s) / embedded_s:+.1f}%"
    shared_memory = f"{model_bytes / 1e6:.1f} MB through shared memory"
    return [
        table_row(OVERHEAD_TITLE, f"{embedded_s:.2f} / {stack_s:.2f} s", "", percent, overhead),
        table_row(LOCATED_TITLE, "", "", "", located),
        table_row("transport adapter -> Triton per study", shared_memory, "", "", TRANSPORT_NOTES),
        *rows_of.stack_cold_and_cpu_rows(result),
    ]


def _stack_rows(arguments: argparse.Namespace, study: Path, cores: int) -> list[str]:
    title = "stack (RabbitMQ -> adapters -> Triton)"
    if arguments.no_stack:
        return [table_row(title, "not measured", "", "", "--no-stack")]
    print("stack: embedded vs 1 and 2 adapters ...", flush=True)
    try:
        runs, burst = arguments.stack_runs, arguments.stack_burst
        label, results = stack.measure_stack(study.resolve(), runs, burst, (1, 2))
    except Exception as error:  # noqa: BLE001 - the rest of the table is still worth having
        return _failed_row(title, error)
    embedded, one_adapter, *_ = results
    rows = []
    for result in results:
        ratio = ""
        if result is not embedded:
            ratio = f"{result.studies_per_minute / embedded.studies_per_minute:.2f}x throughput"
            ratio += " of embedded"
        if result not in (embedded, one_adapter):
            ratio += f", {result.studies_per_minute / one_adapter.studies_per_minute:.2f}x"
            ratio += " of 1 adapter (target >= 1.8x)"
        latency = f"{result.p50_s:.2f} / {result.p95_s:.2f} s, "
        latency += f"{result.studies_per_minute:.0f} studies/min"
        notes = (
            f"{label}; {len(result.latencies_s)} sequential studies, {result.burst} submitted "
            f"at once; CPU busy during the burst {100 * result.cpu_busy:.0f}% of {cores} cores"
        )
        rows.append(
            table_row(f"{result.mode}: latency p50 / p95, throughput", latency, "", ratio, notes)
        )
    return rows


def _registry_rows(arguments: argparse.Namespace) -> list[str]:
    """The study registry's own table, after a blank line (its columns are registries)."""
    if arguments.no_registry:
        return []
    options = registry.Options(repetitions=arguments.registry_repetitions)
    return ["", *registry.registry_rows(arguments.registry_sizes, options)]


def write_readme(table: str) -> None:
    text = README.read_text() if README.exists() else f"{RESULTS_START}\n{RESULTS_END}\n"
    if RESULTS_START not in text or RESULTS_END not in text:
        text = text.rstrip() + f"\n\n{RESULTS_START}\n{RESULTS_END}\n"
    before, rest = text.split(RESULTS_START, 1)
    _, after = rest.split(RESULTS_END, 1)
    README.write_text(f"{before}{RESULTS_START}\n{table}{RESULTS_END}{after}")


if __name__ == "__main__":
    sys.exit(main())
