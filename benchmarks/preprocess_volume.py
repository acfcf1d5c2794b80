"""Speed and peak memory of the preprocessing to the CT-CLIP input on large studies.

    .venv/bin/python benchmarks/preprocess_volume.py [--slices 600] [--spacing 0.625] [--runs 3]

Synthesises a HU volume of ``slices x 512 x 512`` (float32, as load_volume returns it) in
three storage orientations (head-first supine, feet-first, prone) and times
``preprocess_volume`` to the full (240, 480, 480) target. Peak memory is the process's
maximum resident set size beyond the input volume, read from the kernel.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from services.core.preprocessing import PreprocessingTarget, preprocess_volume
from services.core.volume import Volume

ORIENTATIONS = {
    "head-first supine": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "feet-first supine": ((-1, 0, 0), (0, 1, 0), (0, 0, -1)),
    "head-first prone": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
}


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--spacing", type=float, default=0.625, help="slice spacing in mm")
    parser.add_argument("--pixel", type=float, default=0.7, help="pixel spacing in mm")
    parser.add_argument("--runs", type=int, default=3)
    arguments = parser.parse_args()

    rng = np.random.default_rng(0)
    hu = rng.random((arguments.slices, 512, 512), dtype=np.float32)
    hu *= 4000.0
    hu -= 1500.0  # in place: no float64 temporary inflates the baseline
    baseline = _max_rss_mb()
    target = PreprocessingTarget()
    print(
        f"input {hu.shape} float32 ({hu.nbytes / 1e6:.0f} MB) at "
        f"({arguments.spacing}, {arguments.pixel}, {arguments.pixel}) mm -> {target.shape}"
    )
    for name, (row, column, normal) in ORIENTATIONS.items():
        volume = Volume(
            hu=hu,
            row_cosine=np.array(row, float),
            column_cosine=np.array(column, float),
            slice_normal=np.array(normal, float),
            spacing_mm=(arguments.spacing, arguments.pixel, arguments.pixel),
            origin_mm=np.zeros(3),
        )
        timings = []
        for _ in range(arguments.runs):
            started = time.perf_counter()
            output = preprocess_volume(volume, target)
            timings.append(time.perf_counter() - started)
            del output
        print(
            f"{name:18s}: best {min(timings):.2f} s, median {float(np.median(timings)):.2f} s "
            f"over {arguments.runs} runs"
        )
    print(f"peak memory beyond the input: {_max_rss_mb() - baseline:.0f} MB")


if __name__ == "__main__":
    main()
