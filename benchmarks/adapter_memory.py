"""Peak memory of an adapter screening one large study (README: "Adapter memory").

    .venv/bin/python -m benchmarks.adapter_memory [--slices 1000] [--backend triton]
        [--repository model_repository_running]

The chest CT resampled to ``--slices`` slices 0.5 mm apart, screened as an adapter's task
in a fresh process (``benchmarks.embedded --as-adapter``) with the model in a local Triton
(``--backend triton``, the stack's shape) or in the process (``onnxruntime``). Prints JSON;
exits 1 above the 3 GiB target.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from contextlib import nullcontext
from pathlib import Path

from benchmarks import PROJECT_ROOT
from benchmarks.embedded import run_in_fresh_process
from benchmarks.measure import local_triton
from benchmarks.studies import StudySpec, build_study, read_source

TARGET_PEAK_BYTES = 3 * 1024**3
SLICE_MM = 0.5


def write_study(archive: Path, slices: int) -> dict[str, int]:
    """The chest CT resampled to ``slices`` slices at 0.5 mm, zipped; returns its sizes."""
    source = read_source()
    build_study(StudySpec(f"chest_{slices}x{SLICE_MM}mm", slices, SLICE_MM), source, archive)
    with zipfile.ZipFile(archive) as opened:
        dicom_bytes = sum(member.file_size for member in opened.infolist())
    voxels = slices * source.stored.shape[1] * source.stored.shape[2]
    return {
        "slices": slices,
        "zip_bytes": archive.stat().st_size,
        "dicom_bytes": dicom_bytes,
        "pixel_bytes_int16": voxels * 2,
        "volume_bytes_float32": voxels * 4,
    }


def measure(slices: int, backend: str, repository: Path, folder: Path) -> dict[str, object]:
    study = folder / "study.zip"
    sizes = write_study(study, slices)
    server = local_triton(repository, folder / "triton.log") if backend == "triton" else None
    with server or nullcontext():
        options = ["--as-adapter"] + (["--triton-url", server.grpc_url] if server else [])
        measured = run_in_fresh_process(study, 1, repository=repository, options=tuple(options))
    peak = int(measured["peak_rss_bytes"])
    return {
        "backend": backend,
        "repository": str(repository),
        "input": sizes,
        "seconds": round(measured["seconds"][0], 1),
        "stage_seconds": measured["stages"][0],
        "baseline_rss_bytes": measured["baseline_rss_bytes"],
        "peak_rss_bytes": peak,
        "study_increment_bytes": peak - int(measured["baseline_rss_bytes"]),
        "peak_per_float32_volume": round(peak / sizes["volume_bytes_float32"], 2),
        "target_peak_bytes": TARGET_PEAK_BYTES,
        "within_target": peak <= TARGET_PEAK_BYTES,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--backend", choices=("triton", "onnxruntime"), default="triton")
    default_repository = PROJECT_ROOT / "model_repository_running"
    parser.add_argument("--repository", type=Path, default=default_repository)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: the system temp")
    arguments = parser.parse_args(argv)
    repository = arguments.repository.resolve()
    with tempfile.TemporaryDirectory(prefix="cts-adapter-memory-", dir=arguments.work_dir) as d:
        summary = measure(arguments.slices, arguments.backend, repository, Path(d))
    print(json.dumps(summary, indent=2))
    return 0 if summary["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
