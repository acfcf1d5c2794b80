"""Peak memory of an adapter screening one large study: 1000 slices of 512 x 512.

    .venv/bin/python benchmarks/adapter_memory.py [--slices 1000] [--backend triton]
        [--repository model_repository_running] [--keep-model-input]

The study is a synthetic chest phantom (services.batch.sample_studies: chest_phantom and
write_ct_series, 0.5 mm slices) zipped as customers send it, into a temporary folder that is
removed at the end. A child process then does what an adapter does with one task --
``services.adapter.processing.run_task`` with the adapter's RetryingBackend around the
backend: unpack, read the headers, load the volume, check, preprocess to the full
(240, 480, 480) model input, send it to the model, write the report files -- and reports
its peak resident set size (VmHWM, read from the kernel) and its resident size before the
study (after imports and the backend's start).

Backends (``--backend``):

* ``triton`` (default, what the stack's adapters use): a local Triton from the
  nvidia-pytriton wheel serves ``--repository`` (python flavour); the model lives in
  Triton's process, so the figure is the adapter's own memory. The input goes through
  shared memory, whose pages the adapter touches and which count in its RSS.
* ``onnxruntime``: the model runs in the measured process (the embedded shape, which is
  not the adapter's): the figure includes the encoder's weights and activations.

Prints one JSON document: the input sizes (zip, DICOM files, int16 pixels, the float32
volume), the peak, the baseline, the increment, and the stage times of the study.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from services.core.config import load_settings  # noqa: E402
from services.triton.local_server import free_local_ports  # noqa: E402

TARGET_PEAK_BYTES = 3 * 1024**3
MIB = 1024**2


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssShmem...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# -- the study ---------------------------------------------------------------------------------


def thin_slice_phantom(slices: int, slice_mm: float) -> tuple[object, tuple[float, ...]]:
    """The chest phantom at ``slice_mm``, int16 HU: computed at 5x the slice distance and
    interpolated linearly along the body axis one slice at a time, because the phantom's
    float temporaries at full resolution would need ~10 GB in this (unmeasured) process."""
    import numpy as np

    from services.batch.sample_studies import chest_phantom

    coarse_mm = slice_mm * 5
    coarse, spacing = chest_phantom(size=512, slice_mm=coarse_mm, length_mm=slices * slice_mm)
    hu = np.empty((slices, 512, 512), dtype=np.int16)
    for index in range(slices):
        # Slice centres: (index + 0.5) * slice_mm, coarse ones at (k + 0.5) * coarse_mm.
        position = np.clip(((index + 0.5) * slice_mm) / coarse_mm - 0.5, 0, len(coarse) - 1)
        below = int(np.floor(position))
        above = min(below + 1, len(coarse) - 1)
        weight = position - below
        hu[index] = np.rint((1 - weight) * coarse[below] + weight * coarse[above])
    return hu, (slice_mm, spacing[1], spacing[2])


def write_study(folder: Path, slices: int) -> dict[str, int]:
    """A chest phantom of ``slices`` x 512 x 512 at 0.5 mm, zipped; returns its sizes."""
    import numpy as np

    from services.batch.sample_studies import write_ct_series

    slice_mm = 0.5
    hu, spacing = thin_slice_phantom(slices, slice_mm)
    series = folder / "series"
    paths = write_ct_series(
        hu,
        series,
        spacing=spacing,
        series_description=f"Chest {slice_mm:g} B40f",
        seed_text="adapter-memory",
    )
    voxels = int(np.prod(hu.shape))
    del hu
    dicom_bytes = sum(path.stat().st_size for path in paths)
    archive = folder / "storage" / "uploads" / "study.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for path in sorted(paths):
            out.write(path, arcname=f"study/{path.name}")
    shutil.rmtree(series)
    return {
        "slices": slices,
        "zip_bytes": archive.stat().st_size,
        "dicom_bytes": dicom_bytes,
        "pixel_bytes_int16": voxels * 2,
        "volume_bytes_float32": voxels * 4,
    }


# -- the measured process ------------------------------------------------------------------------


def run_child(arguments: argparse.Namespace) -> None:
    """One task through the adapter's code path; prints a JSON line with the memory."""
    from services.adapter.model_server_wait import RetryingBackend
    from services.adapter.task_runner import run_task
    from services.broker.schemas import StudyTask
    from services.core.inference import create_backend

    settings = load_settings(environ={})
    settings.storage.root = arguments.storage
    settings.inference.backend = arguments.backend
    settings.inference.model_repository = arguments.repository
    settings.inference.triton_url = arguments.triton_url
    settings.inference.triton_timeout_s = 1800  # a CPU Triton is slow on the full model
    backend = create_backend(settings)
    baseline_rss = status_bytes("VmRSS")
    baseline_peak = status_bytes("VmHWM")
    task = StudyTask(
        task_id=uuid.uuid4().hex, study_path="uploads/study.zip", original_filename="study.zip"
    )
    started = time.perf_counter()
    result = run_task(
        task,
        backend=RetryingBackend(backend, threading.Event()),
        settings=settings,
        adapter_id="memory-benchmark",
        attempt=1,
    )
    seconds = time.perf_counter() - started
    report = result.reports[0]
    print(
        json.dumps(
            {
                "status": result.status.value,
                "study_status": report.processing_status.value,
                "failure_reason": report.failure_reason,
                "seconds": round(seconds, 1),
                "stage_seconds": report.stage_seconds,
                "baseline_rss_bytes": baseline_rss,
                "baseline_peak_bytes": baseline_peak,
                # VmHWM, not getrusage: Linux carries ru_maxrss over exec, so a child's
                # figure would include its parent's memory at fork time.
                "peak_rss_bytes": status_bytes("VmHWM"),
            }
        )
    )
    backend.close()


# -- the parent ------------------------------------------------------------------------------------


def measure(arguments: argparse.Namespace, folder: Path) -> dict[str, object]:
    import subprocess

    from services.triton.local_server import LocalTritonServer

    sizes = write_study(folder, arguments.slices)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--storage",
        str(folder / "storage"),
        "--backend",
        arguments.backend,
        "--repository",
        str(arguments.repository),
    ]
    server = None
    if arguments.backend == "triton":
        http, grpc, metrics = free_local_ports(3)
        server = LocalTritonServer(
            arguments.repository,
            http_port=http,
            grpc_port=grpc,
            metrics_port=metrics,
            log_file=folder / "tritonserver.log",
        )
        server.start()
        command += ["--triton-url", server.grpc_url]
    try:
        child = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT)
    finally:
        if server is not None:
            server.stop()
    if child.returncode != 0:
        raise SystemExit(f"the measured process failed:\n{child.stderr[-4000:]}")
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    peak = int(measured["peak_rss_bytes"])
    return {
        "backend": arguments.backend,
        "repository": str(arguments.repository),
        "input": sizes,
        **measured,
        "study_increment_bytes": peak - int(measured["baseline_rss_bytes"]),
        "peak_per_float32_volume": round(peak / sizes["volume_bytes_float32"], 2),
        "target_peak_bytes": TARGET_PEAK_BYTES,
        "within_target": peak <= TARGET_PEAK_BYTES,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--backend", choices=("triton", "onnxruntime"), default="triton")
    parser.add_argument(
        "--repository", type=Path, default=PROJECT_ROOT / "model_repository_running"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="default: the system temp")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--storage", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--triton-url", default="127.0.0.1:8001", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    arguments.repository = arguments.repository.resolve()
    if arguments.child:
        run_child(arguments)
        return 0
    folder = Path(tempfile.mkdtemp(prefix="cts-adapter-memory-", dir=arguments.work_dir))
    try:
        summary = measure(arguments, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sizes = summary["input"]
    print(json.dumps(summary, indent=2))
    print(
        f"peak RSS {summary['peak_rss_bytes'] / MIB:.0f} MiB (target {TARGET_PEAK_BYTES / MIB:.0f}"
        f" MiB) for {sizes['slices']} x 512 x 512: zip {sizes['zip_bytes'] / MIB:.0f} MiB, DICOM "
        f"{sizes['dicom_bytes'] / MIB:.0f} MiB, int16 pixels {sizes['pixel_bytes_int16'] / MIB:.0f}"
        f" MiB, float32 volume {sizes['volume_bytes_float32'] / MIB:.0f} MiB; before the study "
        f"{summary['baseline_rss_bytes'] / MIB:.0f} MiB ({summary['backend']} backend)"
    )
    return 0 if summary["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
