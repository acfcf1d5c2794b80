"""Precision rows (README: "Precision chosen by measured parity"): the repository builder's
INT8 gate on the deployed weights, its speed, BF16 on this CPU, and the FP16 wire format."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

from benchmarks import encoder as enc
from benchmarks.embedded import model_input_of
from benchmarks.measure import table_row
from benchmarks.studies import CHEST_FIXTURE, DATA_DIR
from convertation.precision import ParityTolerance, int8_verdict, quantise_int8
from services.core.arrays import ModelInput
from services.core.config import Settings
from services.core.model_metadata import read_metadata

INT8_TITLE = "encoder INT8 through the builder's gate (dynamic, MatMul weights; codebook FP32)"
BF16_TITLE = "encoder BF16 (OpenVINO's CPU plugin)"
WIRE_TITLE = "half-size wire format (FP16 model input, Cast to FP32 in the graph)"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def int8_rows(path: Path, model_input: ModelInput, settings: Settings, runs: int) -> list[str]:
    """The gate's verdict on the deployed weights (300-slice study and the chest fixture)
    and FP32 against INT8, interleaved."""
    print("encoder: INT8 through the precision gate ...", flush=True)
    metadata = read_metadata(settings.inference.model_repository)
    volumes = {
        "300-slice study": model_input,
        "chest fixture (30 x 8 mm)": model_input_of(CHEST_FIXTURE, settings),
    }
    codebook_size = int(metadata.ctvit_config["ctvit"]["codebook_size"])
    DATA_DIR.mkdir(parents=True, exist_ok=True)  # 1 GB of graphs: not for a small /tmp
    with tempfile.TemporaryDirectory(prefix="cts-bench-int8-", dir=DATA_DIR) as folder:
        candidate = quantise_int8(path, Path(folder) / "int8.onnx", codebook_size)
        verdict = int8_verdict(path, candidate, volumes, ParityTolerance())
        fp32, int8 = enc.compare(
            [enc.Candidate("fp32", path), enc.Candidate("int8", candidate)], model_input, runs
        )
    gc.collect()
    weights = "DEMO weights" if metadata.demo else "real weights"
    speed = f"{fp32.median_s / int8.median_s:.2f}x (FP32 {fp32.median_s:.2f} s / INT8)"
    notes = f"{weights}: {verdict.describe()}"
    return [table_row(INT8_TITLE, f"{int8.median_s:.2f} s", "", speed, notes)]


def bf16_row() -> list[str]:
    """BF16 needs AVX512_BF16 or AMX on the CPU; said, not guessed."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    present = [flag for flag in BF16_FLAGS if flag in flags]
    if present:
        notes = (
            f"this CPU has {', '.join(present)}: measure it with OpenVINO "
            "(INFERENCE_PRECISION_HINT=bf16); no runtime of this stack runs BF16 yet"
        )
    else:
        notes = (
            f"not measurable here: this CPU has none of {', '.join(BF16_FLAGS)} (OpenVINO "
            "2026.4 lists FP32 and INT8 only); on such hosts the issue measured 1.6 s against "
            "2.5 s FP32 and cosine 0.97 for the demo weights, which the gate would refuse"
        )
    return [table_row(BF16_TITLE, "-", "", "", notes)]


def wire_format_rows(path: Path, model_input: ModelInput) -> list[str]:
    print("encoder: FP16 wire format parity ...", flush=True)
    fp16, noise, input_error = enc.wire_format_check(path, model_input)
    gc.collect()
    size = f"{model_input.nbytes / 2e6:.1f} MB instead of {model_input.nbytes / 1e6:.1f} MB"
    notes = (
        f"300-slice study: cosine {fp16.cosine:.4f}, max abs diff {fp16.max_abs_diff:.3g} "
        f"(input rounded by up to {input_error:.1e}); "
        + ("within the tolerance" if fp16.within_tolerance else "outside the tolerance: not used")
        + f". For scale: uniform noise of +-{enc.WIRE_NOISE:g} on the FP32 input gives cosine "
        f"{noise.cosine:.4f} (the vector quantiser picks other codes)"
    )
    return [table_row(WIRE_TITLE, size, "", "", notes)]
