"""Speed and peak memory of reading a large CT series and of the lung_air chest check.

    .venv/bin/python benchmarks/dicom_load_volume.py [--slices 1000] [--size 512]

Writes a ``slices x size x size`` chest-like series (uncompressed CT Image Storage) to a
temporary folder, then times read_studies (headers), load_volume (pixels to the float32 HU
volume) and the lung_air detector, and reports the process's peak resident memory beyond
what it held before load_volume. The folder is removed at the end.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from services.batch.sample_studies import write_ct_series
from services.core.body_part import create_detector
from services.core.config import ChestCheckSettings, QualitySettings
from services.core.dicom import load_volume, read_studies
from services.core.schemas import IntakeSummary


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write_series(folder: Path, slices: int, size: int) -> list[Path]:
    """A torso ellipse with two lung-density regions, written slice block by slice block."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2.0
    plane = np.full((size, size), -1000.0, dtype=np.float32)
    plane[(x / (0.4 * size)) ** 2 + (y / (0.3 * size)) ** 2 < 1] = 40.0
    plane[((np.abs(x) - 0.17 * size) / (0.12 * size)) ** 2 + (y / (0.2 * size)) ** 2 < 1] = -850.0
    hu = np.broadcast_to(plane, (slices, size, size))
    return write_ct_series(hu, folder, spacing=(0.625, 0.7, 0.7))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_load_volume_") as scratch:
        started = time.perf_counter()
        files = _write_series(Path(scratch), args.slices, args.size)
        print(f"wrote {len(files)} files in {time.perf_counter() - started:.1f} s")

        started = time.perf_counter()
        (study,) = read_studies(files, IntakeSummary())
        headers_s = time.perf_counter() - started
        before = _max_rss_mb()

        started = time.perf_counter()
        volume, report, warnings = load_volume(study.series[0], QualitySettings())
        volume_s = time.perf_counter() - started
        peak = _max_rss_mb()

        detector = create_detector(ChestCheckSettings())
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            assessment = detector.assess(volume)
            timings.append(time.perf_counter() - started)

    print(f"read_studies: {len(files)} headers in {headers_s:.2f} s")
    print(
        f"load_volume: {volume.shape} float32 ({volume.hu.nbytes / 2**20:.0f} MiB) in "
        f"{volume_s:.2f} s; peak RSS {peak:.0f} MB, +{peak - before:.0f} MB over the "
        f"{before:.0f} MB held before; warnings: {warnings or 'none'}"
    )
    print(f"lung_air: best of 3 {min(timings):.3f} s ({assessment.summary})")
    print(f"coverage {report.coverage_mm:.0f} mm, spacing {report.slice_spacing_mm} mm")


if __name__ == "__main__":
    main()
