"""The benchmark tools still run and measure what they say (tiny model; no timings asserted).

Speed is judged in benchmarks/README.md, never here: these tests keep the tools working.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy.engine import URL
from stack_support import zip_directory

from benchmarks import encoder, registry_data, run, stack
from benchmarks import registry as registry_benchmark
from benchmarks.embedded import benchmark_settings, run_in_fresh_process
from benchmarks.stages import ROW_STAGES, TimedBackend, benchmark_study
from benchmarks.studies import STUDY_300
from services.broker.schemas import StudyProgress
from services.registry import Door, Registry, StudyState
from services.registry.database import upgrade

FIXTURE_SLICES = 30  # chest_ct_lung_dx_a0002: 30 slices of 512 x 512
PREPROCESSING_TOLERANCE = 1e-4  # the contract's parity with the reference (docs/ARCHITECTURE.md)


@pytest.mark.slow
def test_stage_benchmark_reads_the_pipeline_clock_and_memory(
    tiny_model_repository: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    study = zip_directory(fixtures_dir / "chest_ct_lung_dx_a0002", tmp_path / "chest.zip")
    settings = benchmark_settings(tiny_model_repository)
    backend = TimedBackend(tiny_model_repository, settings.inference)
    result = benchmark_study(study, settings=settings, backend=backend, repetitions=2)

    assert set(result.stages) == set(ROW_STAGES)
    assert result.n_slices == FIXTURE_SLICES
    for row, samples in result.stages.items():
        # Two timed passes; memory from the warm-up pass too.
        assert len(samples.seconds) == 2, row
        assert len(samples.peak_mib) == 3, row
        assert all(seconds > 0 for seconds in samples.seconds), row
    # The memory readings follow the stage boundaries: load_volume allocates the float32
    # volume, so its stage adds at least that much.
    volume_mib = FIXTURE_SLICES * 512 * 512 * 4 / 2**20
    assert result.stages["volume"].max_peak_mib >= volume_mib
    assert result.reference_max_abs_diff < PREPROCESSING_TOLERANCE
    assert result.end_to_end_s > 0
    assert backend.memory is None

    rows = run._stage_rows({STUDY_300.name: result})
    assert rows[0] == "| measurement | chest_300x1mm (30 slices) | - | ratio | notes |"
    for label in run.STAGE_LABELS.values():
        assert any(row.startswith(f"| {label} | ") for row in rows), label


@pytest.mark.slow
@pytest.mark.parametrize("as_adapter", [False, True], ids=["process_input", "adapter task"])
def test_fresh_process_screens_the_study_and_reads_its_memory(
    tiny_model_repository: Path, fixtures_dir: Path, tmp_path: Path, as_adapter: bool
) -> None:
    """The fresh-process rows of the table and benchmarks.adapter_memory run this child."""
    study = zip_directory(fixtures_dir / "chest_ct_lung_dx_a0002", tmp_path / "chest.zip")
    options = ("--as-adapter",) if as_adapter else ()
    result = run_in_fresh_process(
        study, 2, keep_freed_memory=False, repository=tiny_model_repository, options=options
    )
    assert len(result["seconds"]) == 2
    assert all(seconds > 0 for seconds in result["seconds"])
    for stages in result["stages"]:
        assert {"intake", "headers", "volume", "preprocessing", "inference"} <= set(stages)
    # The study's volume alone (float32) is resident at the peak, beyond the start.
    volume_bytes = FIXTURE_SLICES * 512 * 512 * 4
    assert result["peak_rss_bytes"] - result["baseline_rss_bytes"] >= volume_bytes
    if as_adapter:  # the task's report files were written beside the study
        assert any((tmp_path / "results").rglob("output.xlsx"))


def test_encoder_command_reports_every_provider_and_batch(
    tiny_model_repository: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "providers.json"
    encoder.main(
        [
            "--repository",
            str(tiny_model_repository),
            "--providers",
            "cpu",
            "cuda",
            "--batches",
            "1",
            "3",
            "--runs",
            "2",
            "--synthetic",
            "--json",
            str(output),
        ]
    )
    results = {item["provider"]: item for item in json.loads(output.read_text())["results"]}
    cpu = results["cpu"]
    assert cpu["status"] == "ok"
    assert set(cpu["by_batch"]) == {"1", "3"}
    for row in cpu["by_batch"].values():
        assert row["within_tolerance"]
        assert row["cosine_min"] > 0.999999
        assert row["latency_median_s"] > 0
    # Three copies of the volume per batch: three volumes per run.
    batch3 = cpu["by_batch"]["3"]
    assert (
        abs(batch3["volumes_per_s"] - 3 / batch3["latency_median_s"])
        < 0.01 * batch3["volumes_per_s"]
    )
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert results["cuda"]["status"].startswith("not available")
        assert results["cuda"]["by_batch"] == {}
    # The same document on stdout, for a run where no file is wanted.
    assert json.loads(capsys.readouterr().out) == json.loads(output.read_text())


def test_batch_of_repeats_the_volume() -> None:
    volume = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 2, 2)
    batch = encoder.batch_of(volume, 4)
    assert batch.shape == (4, 1, 2, 2, 2)
    assert batch.flags["C_CONTIGUOUS"]
    assert all(np.array_equal(item[None], volume) for item in batch)


@pytest.mark.rabbitmq
@pytest.mark.triton
@pytest.mark.slow
def test_stack_overhead_measures_both_modes_and_locates_the_difference(
    tiny_model_repository: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    """Needs the real RabbitMQ and Triton from the nvidia-pytriton wheel, as the stack does."""
    study = zip_directory(fixtures_dir / "chest_ct_lung_dx_a0002", tmp_path / "chest.zip")
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = stack.measure_overhead(study, tiny_model_repository, runs=2, workdir=workdir)
    embedded, through = result["embedded"], result["stack"]
    assert embedded["runs"] == 2
    assert through["submit_to_result"]["runs"] == 2
    for stages in (embedded["stages"], through["stages"]):
        assert {"intake", "headers", "volume", "preprocessing", "inference"} <= set(stages)
    # Submit-to-result includes the adapter's own time.
    assert through["submit_to_result"]["min_s"] >= through["inside_adapter"]["min_s"]
    # Triton's clock: the timed requests went through the ensemble and the encoder.
    triton = through["triton_per_request_s"]
    assert triton["ct_clip_encoder"]["compute_infer"] > 0
    assert triton["chest_screening"]["compute_infer"] >= triton["ct_clip_encoder"]["compute_infer"]
    assert isinstance(result["stack_overhead_percent"], float)
    # Core-seconds per study of both shapes, and the cold start of the adapter and Triton.
    assert embedded["cpu_s"]["min_s"] > 0
    assert through["cpu_s"]["min_s"] > 0
    cold = through["cold_start"]
    assert cold["triton_ready_s"] > 0
    assert cold["adapter_first_result_s"] > 0


def test_the_encoder_arithmetic_and_the_peak_shape_of_the_full_model() -> None:
    from benchmarks.limit import encoder_gflop, peak_gemm_shape
    from convertation.vit.ctvit_config import FULL_CTVIT_CONFIG, FULL_DIM_LATENT

    ctvit = FULL_CTVIT_CONFIG.model_dump()
    parts = encoder_gflop(ctvit, FULL_DIM_LATENT)
    # The 790 GFLOP: 13824 tokens; patch embedding 2 x 13824 x 4000 x 512.
    assert 785 < sum(parts.values()) < 795
    assert parts["patch embedding"] == pytest.approx(2 * 13824 * 4000 * 512 / 1e9)
    assert parts["vector quantiser"] == pytest.approx(2 * 13824 * 512 * 8192 / 1e9)
    shape = peak_gemm_shape(ctvit)
    assert (shape.m, shape.k, shape.n) == (13824, 512, 2048)
    assert shape.label == "13824x512 @ 512x2048"


def test_node_arithmetic_from_the_profiled_shapes() -> None:
    from benchmarks.limit import node_gflop

    assert node_gflop("MatMul", [[24, 576, 512]], [24, 576, 1365]) == pytest.approx(
        2 * 24 * 576 * 1365 * 512 / 1e9
    )
    # A batched product whose first input is [.., K, M]-shaped: the contracted dim is the
    # one the output lacks.
    assert node_gflop("FusedMatMul", [[8, 32, 576], [8, 32, 576]], [8, 576, 576]) == pytest.approx(
        2 * 8 * 576 * 576 * 32 / 1e9
    )
    q = [24, 576, 256]
    assert node_gflop("MultiHeadAttention", [q, q, q, [1, 8, 576, 576]], q) == pytest.approx(
        4 * 24 * 576 * 576 * 256 / 1e9
    )
    assert node_gflop("Conv", [[1, 512, 24, 24, 24]], [1, 512, 24, 24, 24]) == 0.0


def test_the_profile_row_states_the_share_s_ceiling_with_the_graph_as_it_is() -> None:
    """GEMM-type operators 74% of the time at 75% of the peak, the rest 26% counting no
    arithmetic: at the peak they would take 0.555 of the time, so the share can reach
    0.555 / (0.555 + 0.26) = 68%, not 85% (issue 24: what proves a target out of reach)."""
    from benchmarks.machine_rows import profile_row

    peak = 100.0
    operators = [
        encoder.OperatorShare("MatMul", seconds=0.74, share=0.74, count=10, gflop=0.75 * 74.0),
        encoder.OperatorShare("Transpose", seconds=0.26, share=0.26, count=18),
    ]
    row = profile_row(operators, peak)
    assert "= 75% of the peak" in row
    assert "Transpose 26.0%" in row
    assert row.rstrip(" |").endswith("(GEMM-type at the peak, the rest as profiled): 68%")


@pytest.mark.slow
def test_the_limit_and_the_profile_on_the_tiny_encoder(tiny_model_repository: Path) -> None:
    from benchmarks.limit import measure_limit
    from benchmarks.machine_rows import profile_row
    from services.core.model_metadata import read_metadata

    metadata = read_metadata(tiny_model_repository)
    path = tiny_model_repository / "ct_clip_encoder" / "1" / "model.onnx"
    volume = np.random.default_rng(0).uniform(-1, 1, (1, 1, *metadata.target_shape))
    volume = volume.astype(np.float32)
    result = measure_limit(
        path,
        volume,
        ctvit=metadata.ctvit_config["ctvit"],
        dim_latent=metadata.ctvit_config["dim_latent"],
        options=encoder.configured_options,
        rounds=2,
    )
    assert len(result.encoder.wall_s) == 2
    assert [len(r.wall_s) for r in result.gemm_rounds] == [3, 3]
    assert result.peak_gflops > 0
    assert result.best_peak_gflops >= result.peak_gflops
    assert result.share > 0
    assert result.cpu_share > 0
    operators = encoder.profile_operators(path, volume, runs=1)
    matmul = next(op for op in operators if op.op_type == "MatMul")
    assert matmul.gflop > 0
    assert matmul.gflops > 0
    assert any(op.op_type == "MultiHeadAttention" and op.gflop > 0 for op in operators)
    row = profile_row(operators, result.peak_gflops)
    assert "GEMM-type (" in row
    assert "the rest: " in row


@pytest.mark.slow
def test_a_new_batch_process_is_timed_with_and_without_the_graph_cache(
    tiny_model_repository: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from benchmarks import cold_start
    from benchmarks.warm_encoder import warm_encoder_in_new_process
    from services.core.inference.onnxruntime_backend import onnx_paths
    from services.core.model_metadata import ENCODER_NAME, read_metadata

    repository = tmp_path / "repository"
    shutil.copytree(tiny_model_repository, repository)
    study = zip_directory(fixtures_dir / "chest_ct_lung_dx_a0002", tmp_path / "chest.zip")
    volume_file = tmp_path / "model_input.npy"
    np.save(volume_file, np.zeros((1, 1, *read_metadata(repository).target_shape), np.float32))
    warm_encoder = warm_encoder_in_new_process(onnx_paths(repository)[ENCODER_NAME], volume_file)
    # A short pause: the test checks the pairs, not the machine's memory.
    result = cold_start.batch_cold_start(
        study, repository, rounds=2, warm_encoder=warm_encoder, settle_s=0.1
    )
    assert len(result.cached) == len(result.uncached) == 2
    # Each cached start has the warm run timed just before it, in its own round.
    assert len(result.warm_encoder) == 2
    assert all(warm.wall_s > 0 and warm.cpu_s > 0 for warm in result.warm_encoder)
    for run_, warm, ratio, overhead, cpu_overhead in zip(
        result.cached,
        result.warm_encoder,
        result.paired_ratios(),
        result.paired_overheads(),
        result.paired_cpu_overheads(),
        strict=True,
    ):
        assert ratio == pytest.approx(run_.wall_s / warm.wall_s)
        assert overhead == pytest.approx(run_.wall_s - warm.wall_s)
        assert cpu_overhead == pytest.approx(run_.cpu_s - warm.cpu_s)
    for run_ in (result.first_start, *result.cached, *result.uncached):
        assert run_.wall_s > 0
        assert run_.cpu_s > 0
        # The child's own use (os.wait4), not this process's: it maps its model and arrays.
        assert run_.minor_faults > 10_000
        assert run_.stages["inference"] > 0
    assert 0 < result.first_touch_s_per_fault < 1e-3
    assert result.resident_mib > 0
    assert result.settle_s == 0.1
    # The first start saved every model's optimised graph; clearing removes them again.
    assert cold_start.clear_graph_caches(repository) >= 3
    assert cold_start.clear_graph_caches(repository) == 0


# -- the study registry (benchmarks/registry.py) ----------------------------------------------

TINY_REGISTRY = 200


def _check_registry_result(result: registry_benchmark.BackendResult) -> None:
    assert result.error is None
    assert result.size == TINY_REGISTRY
    timings = {timing.label: timing for timing in result.reads}
    assert len(timings) == len(result.reads)  # one row per read
    for timing in result.reads:
        assert len(timing.runs_ms) == 3, timing.label
        assert 0 < timing.median_ms <= timing.p95_ms, timing.label
    # The worklist leaves out what its viewer hid: fewer than the registry's rows.
    worklist = timings[f"worklist: first page ({registry_benchmark.WORKLIST_ROWS}, less hidden)"]
    assert 0 < worklist.rows < TINY_REGISTRY
    assert timings[f"worklist: first page ({registry_benchmark.API_PAGE}, less hidden)"].rows == 50
    assert timings["study view: a patient's studies"].rows >= 1
    # The accession number of one study finds that study.
    assert timings[f"REST: q = an accession number ({registry_benchmark.API_PAGE})"].rows == 1
    writes = result.writes
    assert writes is not None
    assert writes.n_tasks == 3
    assert min(writes.submissions, writes.progress, writes.results, writes.tasks) > 0
    # A task is 15 writes: it takes longer than any one of them.
    assert writes.tasks < min(writes.submissions, writes.progress, writes.results)
    assert result.load_s > 0


def test_the_registry_benchmark_runs_end_to_end_on_sqlite() -> None:
    options = registry_benchmark.Options(repetitions=3, write_tasks=3)
    synthetic = registry_data.synthetic_registry(TINY_REGISTRY)
    rows = [registry_data.row_columns(study) for study in synthetic.studies]
    result = registry_benchmark.measure("sqlite", synthetic, rows, options)
    _check_registry_result(result)

    table = registry_benchmark.table([result], options.repetitions)
    assert table[0] == "| study registry: median / p95 of 3 warm runs | SQLite 200 | notes |"
    assert len(table) == 2 + len(result.reads) + 4 + 2  # header, reads, writes, load, machine
    assert table[1] == "|---|---|---|"
    assert all(line.startswith("| ") and line.endswith(" |") for line in table[2:])
    assert any(line.startswith("| writes: whole tasks per second | ") for line in table)


@pytest.mark.postgres
def test_the_registry_benchmark_runs_end_to_end_on_postgresql() -> None:
    import psycopg
    from preconditions import missing_precondition

    try:
        psycopg.connect(registry_benchmark.POSTGRES_ADMIN).close()
    except psycopg.OperationalError as error:
        missing_precondition(f"PostgreSQL at 127.0.0.1:5432 cannot be reached: {error}")
    options = registry_benchmark.Options(repetitions=3, write_tasks=3)
    synthetic = registry_data.synthetic_registry(TINY_REGISTRY)
    rows = [registry_data.row_columns(study) for study in synthetic.studies]
    _check_registry_result(registry_benchmark.measure("postgresql", synthetic, rows, options))


def test_a_bulk_loaded_row_is_the_row_the_registry_writes(tmp_path: Path) -> None:
    """The benchmark's registry looks like the real thing: each drawn study, bulk-loaded, is
    the row the registry itself writes from the door's and the adapter's messages."""
    synthetic = registry_data.synthetic_registry(TINY_REGISTRY)
    bulk = URL.create("sqlite", database=str(tmp_path / "bulk.sqlite3"))
    registry_benchmark.load(
        bulk, synthetic, [registry_data.row_columns(s) for s in synthetic.studies]
    )
    written_url = URL.create("sqlite", database=str(tmp_path / "written.sqlite3"))
    upgrade(written_url)
    written = Registry(written_url)
    tasks: dict[str, list[registry_data.SyntheticStudy]] = {}
    for study in synthetic.studies:
        tasks.setdefault(study.task_id, []).append(study)
    for studies in tasks.values():
        first = studies[0]
        written.record_submission(first.submission())
        if first.state is StudyState.PROCESSING:
            assert first.started_at is not None
            progress = StudyProgress(
                task_id=first.task_id,
                stage="inference",
                fraction=0.6,
                adapter_id=first.adapter_id or "",
                at=first.started_at,
            )
            written.record_progress(progress)
        elif first.state.final:
            written.record_result(registry_data.result_message(studies))
    loaded = Registry(bulk)
    states = set()
    try:
        for study in synthetic.studies:
            ours = loaded.study(study.task_id, study.report_index)
            theirs = written.study(study.task_id, study.report_index)
            assert ours is not None
            assert theirs is not None
            assert ours.model_dump(exclude={"id"}) == theirs.model_dump(exclude={"id"})
            states.add(ours.state)
    finally:
        loaded.close()
        written.close()
    assert states == set(StudyState)  # queued, processing, done and failed rows all compared


def test_the_drawn_registry_looks_like_a_hospitals_year() -> None:
    synthetic = registry_data.synthetic_registry(5000)
    studies = synthetic.studies
    assert len(studies) == 5000
    assert [s.received_at for s in studies] == sorted(s.received_at for s in studies)
    assert (studies[-1].received_at - studies[0].received_at).days >= 360
    doors = {door: sum(s.door is door for s in studies) / len(studies) for door in Door}
    assert 0.35 < doors[Door.DICOM] < 0.45
    assert all(share > 0.02 for share in doors.values())
    per_patient = [
        sum(
            1
            for s in studies
            if s.report and s.report.identity and s.report.identity.patient_id == p.patient_id
        )
        for p in synthetic.patients[:200]
    ]
    assert max(per_patient) <= 4  # 1-3, and a two-study task's second study
    assert 1.4 < len(studies) / len(synthetic.patients) < 2.0
    hidden = synthetic.hidden_positions()
    # 30% of the newest 2,000 rows, 2% of the 3,000 older ones: ~660.
    assert 600 < len(hidden[registry_data.WORKLIST_VIEWER]) < 720
    # The same size is the same registry in every run.
    again = registry_data.synthetic_registry(5000, end=synthetic.end)
    assert [s.task_id for s in again.studies] == [s.task_id for s in studies]


def test_run_adds_the_registry_table_unless_told_not_to(monkeypatch) -> None:
    asked: list[tuple[list[int], int]] = []

    def rows(sizes: list[int], options: registry_benchmark.Options) -> list[str]:
        asked.append((sizes, options.repetitions))
        return ["| study registry | x |"]

    monkeypatch.setattr(registry_benchmark, "registry_rows", rows)
    default = run._parse([])
    assert run._registry_rows(default) == ["", "| study registry | x |"]
    assert asked == [([10_000], registry_benchmark.Options.repetitions)]
    sized = run._parse(["--registry-sizes", "10000", "100000"])
    run._registry_rows(sized)
    assert asked[-1][0] == [10_000, 100_000]
    assert run._registry_rows(run._parse(["--no-registry"])) == []
