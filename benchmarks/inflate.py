"""Inflating a study zip's deflate members: zlib (the baseline) against ISA-L, on 1 and 2
threads, interleaved in one run, the way intake reads them (zipfile, 1 MiB reads).

    .venv/bin/python benchmarks/inflate.py [--study ZIP] [--runs N]

Default study: the 300-slice benchmark study (built on first use). Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from isal import isal_zlib

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.studies import STUDY_300, ensure_studies  # noqa: E402

READ_BYTES = 1024 * 1024  # intake's CHUNK_BYTES


def inflate_all(archive: zipfile.ZipFile, inflater: str, threads: int) -> tuple[float, int]:
    """Seconds to inflate every member, and the bytes produced."""
    lock = threading.Lock()  # opening and closing members is not thread-safe in zipfile
    members = [info for info in archive.infolist() if not info.is_dir()]

    def one(info: zipfile.ZipInfo) -> int:
        with lock:
            source = archive.open(info)
        if inflater == "isal":
            source._decompressor = isal_zlib.decompressobj(-15)  # as intake does
        produced = 0
        while chunk := source.read(READ_BYTES):
            produced += len(chunk)
        with lock:
            source.close()
        return produced

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        produced = sum(pool.map(one, members))
    return time.perf_counter() - started, produced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args(argv)
    study = arguments.study or ensure_studies((STUDY_300,))[STUDY_300.name]
    variants = [(inflater, threads) for inflater in ("zlib", "isal") for threads in (1, 2)]
    seconds: dict[tuple[str, int], list[float]] = {variant: [] for variant in variants}
    with zipfile.ZipFile(study) as archive:
        sizes = {inflate_all(archive, *variant)[1] for variant in variants}  # warm-up
        assert len(sizes) == 1, "the inflaters disagree on the content size"
        for _ in range(arguments.runs):
            for variant in variants:
                seconds[variant].append(inflate_all(archive, *variant)[0])
    produced = sizes.pop()
    baseline = statistics.median(seconds[("zlib", 2)])
    print(f"{study.name}: {produced / 1e6:.0f} MB inflated, {arguments.runs} interleaved runs")
    print("| inflater | threads | median | fastest | vs zlib, 2 threads |")
    print("|---|---|---|---|---|")
    for (inflater, threads), values in seconds.items():
        median = statistics.median(values)
        print(
            f"| {inflater} | {threads} | {median:.3f} s | {min(values):.3f} s | "
            f"{baseline / median:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
