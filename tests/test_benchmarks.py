"""The benchmark tools still run and measure what they say (tiny model; no timings asserted).

Speed is judged in benchmarks/README.md, never here: these tests keep the tools working.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from stack_support import zip_directory

from benchmarks import encoder_providers, stack_latency


def test_encoder_providers_reports_every_provider_and_batch(
    tiny_model_repository: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "providers.json"
    encoder_providers.main(
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
        assert row["within_tolerance"] and row["cosine_min"] > 0.999999
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
    table = capsys.readouterr().out
    assert "| cpu | 3 |" in table and "| cuda |" in table


def test_batch_of_repeats_the_volume() -> None:
    volume = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 2, 2)
    batch = encoder_providers.batch_of(volume, 4)
    assert batch.shape == (4, 1, 2, 2, 2) and batch.flags["C_CONTIGUOUS"]
    assert all(np.array_equal(item[None], volume) for item in batch)


def test_stack_latency_measures_both_modes_and_locates_the_difference(
    tiny_model_repository: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    """Needs the real RabbitMQ and Triton from the nvidia-pytriton wheel, as the stack does."""
    study = zip_directory(fixtures_dir / "chest_ct_lung_dx_a0002", tmp_path / "chest.zip")
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = stack_latency.measure(study, tiny_model_repository, runs=2, workdir=workdir)
    embedded, stack = result["embedded"], result["stack"]
    assert embedded["runs"] == 2 and stack["submit_to_result"]["runs"] == 2
    for stages in (embedded["stages"], stack["stages"]):
        assert {"intake", "headers", "volume", "preprocessing", "inference"} <= set(stages)
    # Submit-to-result includes the adapter's own time.
    assert stack["submit_to_result"]["min_s"] >= stack["inside_adapter"]["min_s"]
    # Triton's clock: the timed requests went through the ensemble and the encoder.
    triton = stack["triton_per_request_s"]
    assert triton["ct_clip_encoder"]["compute_infer"] > 0
    assert triton["chest_screening"]["compute_infer"] >= triton["ct_clip_encoder"]["compute_infer"]
    assert isinstance(result["stack_overhead_percent"], float)
