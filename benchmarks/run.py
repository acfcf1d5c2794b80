"""Benchmark every stage of the pipeline against baselines measured in the same run.

    .venv/bin/python -m benchmarks.run [--quick] [--repetitions N] [--encoder-runs N]
        [--compare-encoder OLD.onnx] [--quantisation] [--no-stack] [--no-readme]

Builds (once, git-ignored under benchmarks/.data/) two studies from the real chest CT
fixture, 300 slices at 1 mm and 600 at 0.5 mm, then measures on each: every pipeline stage
in embedded mode with its peak memory, and the reference implementation (plain pydicom +
torch F.interpolate) on the same files. The encoder is compared alone (onnxruntime's
default session vs the backend's, interleaved), profiled by operator, optionally checked
as INT8, and, where the stack is installed, latency and throughput through RabbitMQ and
Triton are measured against embedded mode. Prints one table and writes it to
benchmarks/README.md (between the result markers).

``--quick``: one repetition, the 300-slice study only, two encoder runs, no stack, and the
README is left alone unless ``--readme`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from loguru import logger

from benchmarks import encoder as encoder_bench
from benchmarks.embedded import ModelSessions, StudyResult, benchmark_study
from benchmarks.end_to_end import run_in_subprocess
from benchmarks.measure import Machine, machine
from benchmarks.studies import CHEST_FIXTURE, STUDY_300, STUDY_600, ensure_studies
from services.core.config import Settings, load_settings
from services.core.dicom import load_volume, read_studies, select_series
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend, onnx_paths
from services.core.intake import collect_dicom_files
from services.core.model_metadata import ENCODER_NAME, read_metadata
from services.core.pipeline import preprocessing_target
from services.core.preprocessing import preprocess_volume, to_model_input
from services.core.process_memory import keep_freed_memory

README = Path(__file__).resolve().parent / "README.md"
RESULTS_START = "<!-- results:start (written by python -m benchmarks.run) -->"
RESULTS_END = "<!-- results:end -->"
# An INT8 encoder is acceptable only if its embedding stays this close to FP32's.
# Tolerance for any reduced-precision variant (INT8 weights, FP16 wire format) against
# FP32, on the L2-normalised embedding.
INT8_MIN_COSINE = 0.999
INT8_MAX_ABS_DIFF = 0.01
WIRE_NOISE = 1e-6  # the input perturbation that shows how sensitive the embedding is
STAGE_LABELS = {
    "intake": "intake (unzip, classify files)",
    "headers": "headers (read_studies + series selection)",
    "volume": "volume (decode + geometry: load_volume)",
    "chest check": "chest check (metadata + lung_air)",
    "preprocessing": "preprocessing (numpy, to 1x1x240x480x480)",
    "encoder": "encoder (ONNX Runtime, backend's session)",
    "heads": "heads (binary + multilabel)",
    "report": "report (findings, xlsx, json, warnings)",
}


@dataclass
class EncoderSection:
    results: list[encoder_bench.CandidateResult]
    operators: list[encoder_bench.OperatorShare]
    runs: int
    int8: list[str] = field(default_factory=list)  # table rows, already formatted


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (see above)")
    parser.add_argument("--repetitions", type=int, default=3, help="timed passes per study")
    parser.add_argument("--encoder-runs", type=int, default=5, help="interleaved runs each")
    parser.add_argument("--repository", type=Path, help="default: the configured repository")
    parser.add_argument(
        "--compare-encoder",
        type=Path,
        help="another encoder ONNX (e.g. an earlier export) to run in the interleaved comparison",
    )
    parser.add_argument(
        "--quantisation", action="store_true", help="also build and check an INT8 encoder"
    )
    parser.add_argument("--no-stack", action="store_true", help="skip the RabbitMQ/Triton part")
    parser.add_argument("--stack-runs", type=int, default=10, help="latency samples per mode")
    parser.add_argument("--stack-burst", type=int, default=8, help="tasks for throughput")
    parser.add_argument(
        "--overhead-runs",
        type=int,
        default=4,
        help="interleaved embedded/stack pairs with the full-size model",
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
    command = "python -m benchmarks.run" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv)
    )
    host = machine()
    memory_kept = keep_freed_memory()
    started = dt.datetime.now().astimezone()
    settings = load_settings(environ={})
    if arguments.repository is not None:
        settings.inference.model_repository = arguments.repository.resolve()
    repository = settings.inference.model_repository
    specs = (STUDY_300,) if arguments.quick else (STUDY_300, STUDY_600)
    studies = ensure_studies(specs)

    print(f"{host.describe()}\nmodel repository: {repository}", flush=True)
    study_results = _pipeline_section(studies, settings, arguments.repetitions)
    model_input = _prepare(studies[STUDY_300.name], settings)
    encoder_section = _encoder_section(arguments, repository, model_input)
    if arguments.quantisation:
        encoder_section.int8 = _quantisation_rows(repository, model_input, settings)
    encoder_section.int8.extend(_wire_format_rows(repository, model_input))
    del model_input
    gc.collect()
    fresh_rows = _fresh_process_rows(arguments, studies, repository)
    stack_rows = _stack_overhead_rows(arguments, studies[STUDY_300.name], repository)
    stack_rows += _stack_rows(arguments, studies[STUDY_300.name])

    table = render(
        host=host,
        started=started,
        command=command,
        repository=repository,
        settings=settings,
        studies=study_results,
        encoder=encoder_section,
        extra_rows=fresh_rows + stack_rows,
        memory_kept=memory_kept,
    )
    print(table)
    if arguments.readme or not (arguments.quick or arguments.no_readme):
        write_readme(table)
        print(f"written to {README}")
    return 0


def _pipeline_section(
    studies: dict[str, Path], settings: Settings, repetitions: int
) -> dict[str, StudyResult]:
    repository = settings.inference.model_repository
    sessions = ModelSessions(repository, settings.inference.onnx_intra_op_threads)
    backend = OnnxRuntimeBackend(repository, settings.inference)
    results = {}
    for name, path in studies.items():
        print(f"pipeline stages: {name} ...", flush=True)
        results[name] = benchmark_study(
            path,
            settings=settings,
            sessions=sessions,
            backend=backend,
            repetitions=repetitions,
            torch_threads=machine().physical_cores,
        )
    del sessions, backend
    gc.collect()
    return results


def _prepare(source: Path, settings: Settings) -> np.ndarray:
    """The model input of one study (zip or folder), as the pipeline makes it."""
    target = preprocessing_target(read_metadata(settings.inference.model_repository))
    with tempfile.TemporaryDirectory(prefix="cts-bench-") as folder:
        intake = collect_dicom_files(source, Path(folder) / "files", settings.intake)
        (study,) = read_studies(intake.dicom_files, intake.summary)
        series = select_series(study, settings.series_selection).selected
        assert series is not None
        volume, _, _ = load_volume(series, settings.quality)
        return to_model_input(preprocess_volume(volume, target))


def _encoder_section(
    arguments: argparse.Namespace, repository: Path, model_input: np.ndarray
) -> EncoderSection:
    path = onnx_paths(repository)[ENCODER_NAME]
    candidates = [
        encoder_bench.Candidate("bare", path, encoder_bench.bare_options),
        encoder_bench.Candidate("configured", path, encoder_bench.configured_options(0)),
    ]
    if arguments.compare_encoder is not None:
        candidates.append(
            encoder_bench.Candidate(
                f"other graph ({arguments.compare_encoder.name})",
                arguments.compare_encoder,
                encoder_bench.configured_options(0),
            )
        )
    print(f"encoder: {len(candidates)} sessions x {arguments.encoder_runs} runs ...", flush=True)
    results = encoder_bench.compare(candidates, model_input, arguments.encoder_runs)
    gc.collect()
    print("encoder: operator profile ...", flush=True)
    operators = encoder_bench.profile_operators(path, model_input, runs=2)
    return EncoderSection(results, operators, arguments.encoder_runs)


def _codebook_matmul_nodes(path: Path, codebook_size: int) -> list[str]:
    """MatMul nodes whose constant operand has a codebook axis (the quantiser's product)."""
    model = onnx.load(str(path), load_external_data=False)
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and any(codebook_size in shapes.get(name, ()) for name in node.input)
    ]


def _quantisation_rows(repository: Path, model_input: np.ndarray, settings: Settings) -> list[str]:
    """INT8 dynamic quantisation: tolerance on real chest inputs and speed, as table rows."""
    path = onnx_paths(repository)[ENCODER_NAME]
    metadata = read_metadata(repository)
    codebook_size = int(metadata.ctvit_config["ctvit"]["codebook_size"])
    fixture_input = _prepare(CHEST_FIXTURE, settings)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cts-bench-int8-", dir=README.parent) as folder:
        int8_path = Path(folder) / "encoder_int8.onnx"
        print("encoder: INT8 dynamic quantisation ...", flush=True)
        encoder_bench.quantise_dynamic_int8(
            path, int8_path, exclude=_codebook_matmul_nodes(path, codebook_size)
        )
        candidates = [
            encoder_bench.Candidate("fp32", path, encoder_bench.configured_options(0)),
            encoder_bench.Candidate("int8", int8_path, encoder_bench.configured_options(0)),
        ]
        timing = encoder_bench.compare(candidates, model_input, runs=2)
        agreements = [
            encoder_bench.agreement("300-slice study", timing[0].embedding, timing[1].embedding)
        ]
        fp32 = ort.InferenceSession(str(path), providers=encoder_bench.PROVIDERS)
        int8 = ort.InferenceSession(str(int8_path), providers=encoder_bench.PROVIDERS)
        agreements.append(
            encoder_bench.agreement(
                "chest fixture (30 x 8 mm)",
                fp32.run(None, {fp32.get_inputs()[0].name: fixture_input})[0],
                int8.run(None, {int8.get_inputs()[0].name: fixture_input})[0],
            )
        )
        del fp32, int8
    accepted = all(
        a.cosine >= INT8_MIN_COSINE and a.max_abs_diff <= INT8_MAX_ABS_DIFF for a in agreements
    )
    fp32_s, int8_s = timing[0].median_s, timing[1].median_s
    checks = "; ".join(
        f"{a.input_name}: cosine {a.cosine:.4f}, max abs diff {a.max_abs_diff:.3g}"
        for a in agreements
    )
    verdict = "within" if accepted else "outside"
    rows.append(
        _row(
            "encoder INT8 (dynamic, MatMul weights; quantiser product kept FP32)",
            f"{int8_s:.2f} s",
            "",
            f"{fp32_s / int8_s:.2f}x (FP32 {fp32_s:.2f} s / INT8)",
            f"{verdict} the tolerance (cosine >= {INT8_MIN_COSINE}, max abs diff <= "
            f"{INT8_MAX_ABS_DIFF} on the L2-normalised embedding): {checks}; "
            + ("usable" if accepted else "not used"),
        )
    )
    return rows


def _fresh_process_rows(
    arguments: argparse.Namespace, studies: dict[str, Path], repository: Path
) -> list[str]:
    """process_input in fresh processes, memory.keep_freed_memory off and on, alternating."""
    runs = 2 if arguments.quick else 4
    rounds = 1 if arguments.quick else 2
    first: dict[tuple[bool, str], list[float]] = {}
    later: dict[tuple[bool, str], list[float]] = {}
    for spec in (STUDY_300, STUDY_600):
        if spec.name not in studies:
            continue
        for round_number in range(rounds):
            order = (False, True) if round_number % 2 == 0 else (True, False)
            for keep in order:
                print(f"end to end: {spec.name}, keep freed memory {keep} ...", flush=True)
                result = run_in_subprocess(
                    studies[spec.name].resolve(),
                    runs,
                    keep_freed_memory=keep,
                    repository=repository,
                )
                first.setdefault((keep, spec.name), []).append(result["seconds"][0])
                later.setdefault((keep, spec.name), []).extend(result["seconds"][1:])
    rows = []
    for keep in (False, True):
        cells = [
            f"{statistics.median(later[keep, spec.name]):.2f} s "
            f"(first study {statistics.median(first[keep, spec.name]):.2f} s)"
            if (keep, spec.name) in later
            else "-"
            for spec in (STUDY_300, STUDY_600)
        ]
        rows.append(
            _row(
                "end to end, fresh process, memory.keep_freed_memory: "
                + ("true (the default)" if keep else "false (glibc's default malloc)"),
                *cells,
                "",
                f"{rounds} processes each, alternating, x {runs} studies: median of the later "
                "studies (a long-running batch or adapter), and of the first",
            )
        )
    return rows


def _wire_format_rows(repository: Path, model_input: np.ndarray) -> list[str]:
    """A half-size wire format (FP16 input, cast back to FP32 inside the graph): does the
    embedding keep parity? Rounding to FP16 and back is exactly what a Cast node computes."""
    print("encoder: FP16 wire format parity ...", flush=True)
    session = ort.InferenceSession(
        str(onnx_paths(repository)[ENCODER_NAME]), providers=encoder_bench.PROVIDERS
    )
    name = session.get_inputs()[0].name
    reference = session.run(None, {name: model_input})[0]
    half = model_input.astype(np.float16).astype(np.float32)
    noise = np.random.default_rng(0).uniform(-WIRE_NOISE, WIRE_NOISE, model_input.shape)
    noisy = (model_input + noise.astype(np.float32)).astype(np.float32)
    del noise
    fp16 = encoder_bench.agreement("fp16", reference, session.run(None, {name: half})[0])
    jitter = encoder_bench.agreement("noise", reference, session.run(None, {name: noisy})[0])
    input_error = float(np.abs(half - model_input).max())
    del session, half, noisy
    gc.collect()
    accepted = fp16.cosine >= INT8_MIN_COSINE and fp16.max_abs_diff <= INT8_MAX_ABS_DIFF
    return [
        _row(
            "half-size wire format (FP16 model input, Cast to FP32 in the graph)",
            f"{model_input.nbytes / 2e6:.1f} MB instead of {model_input.nbytes / 1e6:.1f} MB",
            "",
            "",
            f"300-slice study: cosine {fp16.cosine:.4f}, max abs diff {fp16.max_abs_diff:.3g} "
            f"(input rounded by up to {input_error:.1e}); "
            + ("within the tolerance" if accepted else "outside the tolerance: not used")
            + f". For scale: uniform noise of +-{WIRE_NOISE:g} on the FP32 input gives cosine "
            f"{jitter.cosine:.4f} (the vector quantiser picks other codes)",
        )
    ]


def _stack_overhead_rows(arguments: argparse.Namespace, study: Path, repository: Path) -> list[str]:
    """Per-study latency through the stack against embedded mode with the full-size model,
    interleaved, located by pipeline stage and by Triton's own clock."""
    from benchmarks import stack, stack_latency

    title = "stack overhead, full-size model: embedded / stack per study"
    if arguments.no_stack or not stack.stack_available():
        return []
    print("stack overhead: full-size model, embedded and stack interleaved ...", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="cts-bench-overhead-", dir=study.parent) as folder:
            result = stack_latency.measure(
                study.resolve(), repository, arguments.overhead_runs, Path(folder)
            )
    except Exception as error:  # noqa: BLE001 - the rest of the table is still worth having
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        return [_row(title, "failed", "", "", reason)]
    embedded, through = result["embedded"], result["stack"]
    embedded_s = embedded["median_s"]
    stack_s = through["submit_to_result"]["median_s"]
    adapter_s = through["inside_adapter"]["median_s"]
    differences = ", ".join(
        f"{name} {through['stages'][name] - seconds:+.2f} s"
        for name, seconds in embedded["stages"].items()
        if abs(through["stages"].get(name, 0.0) - seconds) >= 0.01
    )
    encoder = through["triton_per_request_s"].get("ct_clip_encoder", {})
    ensemble = through["triton_per_request_s"].get("chest_screening", {})
    model_bytes = 4 * int(np.prod(read_metadata(repository).target_shape))
    return [
        _row(
            title,
            f"{embedded_s:.2f} / {stack_s:.2f} s",
            "",
            f"{100 * (stack_s - embedded_s) / embedded_s:+.1f}%",
            f"{embedded['runs']} interleaved pairs (ABBA order), medians; embedded = "
            "process_input + write_reports in this process; stack = submit to result on the "
            f"reply queue, 1 adapter, Triton python flavour (inside the adapter {adapter_s:.2f} s, "
            "RabbitMQ the rest); target <= +10%",
        ),
        _row(
            "stack overhead located: stack - embedded by pipeline stage; Triton's clock",
            "",
            "",
            "",
            (differences or "no stage differs by 0.01 s or more")
            + "; Triton per request: encoder queue "
            f"{encoder.get('queue', 0):.3f} s, input copy into the backend stub "
            f"{encoder.get('compute_input', 0):.3f} s, compute {encoder.get('compute_infer', 0):.2f} s; "
            f"ensemble total {sum(ensemble.values()):.2f} s",
        ),
        _row(
            "transport adapter -> Triton per study",
            f"{model_bytes / 1e6:.1f} MB through shared memory",
            "",
            "",
            "same host: a registered region reused from study to study, the request carries "
            "its name (0 tensor bytes in gRPC); another host: the same bytes in the gRPC "
            "request (benchmarks/triton_transport.py compares the two)",
        ),
    ]


def _stack_rows(arguments: argparse.Namespace, study: Path) -> list[str]:
    from benchmarks import stack

    if arguments.no_stack:
        return [
            _row("stack (RabbitMQ -> adapters -> Triton)", "not measured", "", "", "--no-stack")
        ]
    if not stack.stack_available():
        return [_row("stack (RabbitMQ -> adapters -> Triton)", "pending", "", "", "not installed")]
    print("stack: embedded vs 1 and 2 adapters ...", flush=True)
    try:
        label, results = stack.measure_stack(
            study.resolve(), None, arguments.stack_runs, arguments.stack_burst, (1, 2)
        )
    except Exception as error:  # noqa: BLE001 - the rest of the table is still worth having
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        return [_row("stack (RabbitMQ -> adapters -> Triton)", "failed", "", "", reason)]
    embedded = results[0]
    one_adapter = results[1] if len(results) > 1 else None
    rows = []
    for result in results:
        ratio = (
            ""
            if result is embedded
            else f"{result.studies_per_minute / embedded.studies_per_minute:.2f}x throughput"
        )
        if one_adapter is not None and result not in (embedded, one_adapter):
            ratio += (
                f" of embedded, {result.studies_per_minute / one_adapter.studies_per_minute:.2f}x"
                " of 1 adapter (target >= 1.8x)"
            )
            result_note = ""
        else:
            result_note = " of embedded" if ratio else ""
        rows.append(
            _row(
                f"{result.mode}: latency p50 / p95, throughput",
                f"{result.p50_s:.2f} / {result.p95_s:.2f} s, "
                f"{result.studies_per_minute:.0f} studies/min",
                "",
                ratio + result_note,
                f"{label}; {len(result.latencies_s)} sequential studies, "
                f"{result.burst} submitted at once; CPU busy during the burst "
                f"{100 * result.cpu_busy:.0f}% of {machine().logical_cores} cores",
            )
        )
    return rows


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(seconds: float, peak_mib: float | None = None) -> str:
    text = f"{seconds:.2f} s"
    return text if peak_mib is None else f"{text}, {peak_mib:,.0f} MiB"


def render(
    *,
    host: Machine,
    started: dt.datetime,
    command: str,
    repository: Path,
    settings: Settings,
    studies: dict[str, StudyResult],
    encoder: EncoderSection,
    extra_rows: list[str],
    memory_kept: bool,
) -> str:
    names = [name for name in (STUDY_300.name, STUDY_600.name) if name in studies]
    columns = [studies.get(STUDY_300.name), studies.get(STUDY_600.name)]
    metadata = read_metadata(repository)
    lines = [
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- command: `{command}`",
        f"- machine: {host.describe()}",
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
        _row("measurement", *(_study_title(name, studies) for name in names), "ratio", "notes")
        if len(names) == 2
        else _row("measurement", _study_title(names[0], studies), "-", "ratio", "notes"),
        "|---|---|---|---|---|",
    ]

    def cells(stage: str) -> list[str]:
        out = []
        for result in columns:
            if result is None:
                out.append("-")
            else:
                samples = result.recorder.stages[stage]
                out.append(_cell(samples.median_s, samples.max_peak_mib))
        return out

    for stage, label in STAGE_LABELS.items():
        lines.append(_row(label, *cells(stage), "", ""))
    totals, shares = [], []
    for result in columns:
        if result is None:
            totals.append("-")
            shares.append("-")
            continue
        stages = result.recorder.stages
        total = sum(stages[s].median_s for s in STAGE_LABELS)
        others = total - stages["encoder"].median_s
        totals.append(f"{total:.2f} s")
        shares.append(f"{others:.2f} s = {100 * others / stages['encoder'].median_s:.0f}%")
    lines.append(_row("**all stages**", *totals, "", "sum of the medians above"))
    lines.append(
        _row(
            "everything but the encoder, share of the encoder",
            *shares,
            "",
            "target <= 20% for the 300-slice study",
        )
    )
    lines.append(
        _row(
            "end to end (process_input + write_reports, one run)",
            *["-" if r is None else _cell(r.end_to_end_s, r.end_to_end_peak_mib) for r in columns],
            "",
            "the pipeline's own stage clock, memory from the start of the study",
        )
    )
    # Baselines (a): reference read and torch preprocessing, same files, same run.
    read_cells, read_ratio, prep_cells, prep_ratio = [], [], [], []
    for result in columns:
        if result is None:
            read_cells.append("-")
            prep_cells.append("-")
            continue
        stages = result.recorder.stages
        reference_read = stages["reference read"]
        ours_read = stages["headers"].median_s + stages["volume"].median_s
        read_cells.append(_cell(reference_read.median_s, reference_read.max_peak_mib))
        read_ratio.append(f"{reference_read.median_s / ours_read:.1f}x")
        reference_prep = stages["reference preprocessing"]
        prep_cells.append(_cell(reference_prep.median_s, reference_prep.max_peak_mib))
        prep_ratio.append(f"{reference_prep.median_s / stages['preprocessing'].median_s:.1f}x")
    diffs = ", ".join(f"{r.reference_max_abs_diff:.1e}" for r in columns if r is not None)
    lines.append(
        _row(
            "baseline: plain pydicom read (dcmread all, sort, stack)",
            *read_cells,
            " / ".join(read_ratio) + " vs headers + volume",
            "reference / ours",
        )
    )
    lines.append(
        _row(
            "baseline: torch F.interpolate preprocessing (CT-CLIP style)",
            *prep_cells,
            " / ".join(prep_ratio) + " vs preprocessing",
            f"reference / ours; outputs agree within {diffs} (max abs)",
        )
    )
    # Baseline (b): the encoder alone.
    by_label = {result.label: result for result in encoder.results}
    configured, bare = by_label["configured"], by_label["bare"]
    lines.append(
        _row(
            "encoder alone, backend's session (interleaved)",
            _runs_cell(configured),
            "same input shape",
            "",
            f"{encoder.runs} runs; session start {configured.session_start_s:.1f} s",
        )
    )
    lines.append(
        _row(
            "baseline: encoder, bare onnxruntime session (defaults)",
            _runs_cell(bare),
            "",
            f"{bare.median_s / configured.median_s:.2f}x",
            "bare / configured, medians; "
            f"embeddings equal: {np.array_equal(bare.embedding, configured.embedding)}",
        )
    )
    for result in encoder.results:
        if result.label in ("bare", "configured"):
            continue
        agreement = encoder_bench.agreement("", configured.embedding, result.embedding)
        lines.append(
            _row(
                f"encoder, {result.label}",
                _runs_cell(result),
                "",
                f"{result.median_s / configured.median_s:.2f}x",
                f"other / this graph, medians; cosine {agreement.cosine:.6f}, "
                f"max abs diff {agreement.max_abs_diff:.1e}",
            )
        )
    top = ", ".join(
        f"{op.op_type} {100 * op.share:.0f}% ({op.seconds:.2f} s, {op.count} nodes)"
        for op in encoder.operators[:6]
    )
    lines.append(_row("encoder profile (onnxruntime profiler)", "", "", "", top))
    lines.extend(encoder.int8)
    lines.extend(extra_rows)
    return "\n".join(lines) + "\n"


def _study_title(name: str, studies: dict[str, StudyResult]) -> str:
    result = studies[name]
    slices = result.volume_shape[0] if result.volume_shape else "?"
    return f"{name} ({slices} slices)"


def _runs_cell(result: encoder_bench.CandidateResult) -> str:
    return f"{result.median_s:.2f} s (fastest {result.min_s:.2f} s)"


def write_readme(table: str) -> None:
    text = README.read_text() if README.exists() else f"{RESULTS_START}\n{RESULTS_END}\n"
    if RESULTS_START not in text or RESULTS_END not in text:
        text = text.rstrip() + f"\n\n{RESULTS_START}\n{RESULTS_END}\n"
    before, rest = text.split(RESULTS_START, 1)
    _, after = rest.split(RESULTS_END, 1)
    README.write_text(f"{before}{RESULTS_START}\n{table}{RESULTS_END}{after}")


if __name__ == "__main__":
    sys.exit(main())
