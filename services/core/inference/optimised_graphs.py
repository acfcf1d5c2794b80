"""ONNX Runtime sessions that start from a cached optimised graph.

Creating the encoder's session from the 725 MB ONNX file costs seconds: parsing one
protobuf, then ONNX Runtime's graph optimisations (constant folding, fusions, layouts).
The first session on a machine saves the optimised graph beside the model (its weights in
a separate file ONNX Runtime can map); later sessions load that instead, without
optimising again (benchmarks/README.md, "Cold start": 3.7 s -> 0.8 s on the demo encoder).

The saved graph belongs to this ONNX Runtime version, these optimisation settings and
this CPU (ONNX Runtime picks layouts and kernels by instruction set), so the cache key
holds all three, with the model file's identity (path, size, mtime): a rebuilt or
replaced model gets a new entry and the old ones are removed. The entry lives in
``<model folder>/.optimised/`` (rebuilding the repository empties that folder; Triton
reads only ``model.py`` from a model version folder), or in the user's cache folder when the
repository is read-only. A cache that cannot be written is not an error: the session is
then created from the model file, as before.

This module needs only the standard library and onnxruntime: the repository builder copies
it beside the python flavour's ``model.py`` so that Triton's model load uses it too.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from pathlib import Path

# As in onnxruntime_backend: no telemetry, set before onnxruntime initialises.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort

CACHE_FOLDER = ".optimised"
USER_CACHE = Path("chest-ct-screening") / "onnxruntime"
OPTIMISED_NAME = "model.onnx"
WEIGHTS_NAME = "model.onnx.data"
# Initializers at least this large go to the weights file (all weight matrices; small
# constants stay in the graph).
EXTERNAL_MIN_BYTES = 1024


def _cpu_identity() -> str:
    """The CPU's model name and instruction-set flags (what ONNX Runtime's kernels see)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in wanted]
    return "\n".join(sorted(set(lines)))


def cache_key(model: Path, options: ort.SessionOptions, providers: list[str]) -> str:
    """What the optimised graph depends on: the model file, the runtime, the CPU, the
    optimisation level and the providers."""
    stat = model.stat()
    parts = [
        str(model.resolve()),
        str(stat.st_size),
        str(stat.st_mtime_ns),
        ort.__version__,
        str(options.graph_optimization_level),
        ",".join(providers),
        _cpu_identity(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def cache_folders(model: Path) -> list[Path]:
    """Where entries for ``model`` may live, in the order they are tried."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:12]
    return [model.parent / CACHE_FOLDER, home / USER_CACHE / digest]


def _load_saved(entry: Path, options: ort.SessionOptions, providers: list[str]):
    """A session from a saved optimised graph: optimisations already applied."""
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(entry / OPTIMISED_NAME), options, providers=providers)


def _save_while_creating(
    model: Path, folder: Path, key: str, options: ort.SessionOptions, providers: list[str]
):
    """Create the session from ``model`` and save its optimised graph as ``folder/key``.

    The files are written into a temporary folder that is renamed into place, so that a
    concurrent process never reads half an entry; other entries in ``folder`` (older
    versions of the model) are removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=folder))
    try:
        options.optimized_model_filepath = str(staging / OPTIMISED_NAME)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", WEIGHTS_NAME
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(EXTERNAL_MIN_BYTES),
        )
        session = ort.InferenceSession(str(model), options, providers=providers)
        try:
            staging.rename(folder / key)
        except OSError:  # another process saved the same entry first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for other in folder.iterdir():
        if other.name != key and not other.name.startswith(f"{key}.tmp-"):
            shutil.rmtree(other, ignore_errors=True)
    return session


def _writable(folder: Path) -> bool:
    probe = folder if folder.exists() else folder.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK)


def create_session(
    model: Path, options_factory, providers: list[str], *, use_cache: bool = True
) -> tuple[ort.InferenceSession, str]:
    """A session for ``model`` and how it started: "cached" (from a saved optimised graph),
    "saved" (optimised now and saved for the next start) or "uncached".

    ``options_factory()`` returns fresh session options each time (an options object that
    saved a graph must not be reused).
    """
    model = Path(model)
    if not use_cache:
        return ort.InferenceSession(str(model), options_factory(), providers=providers), "uncached"
    key = cache_key(model, options_factory(), providers)
    folders = cache_folders(model)
    for folder in folders:
        entry = folder / key
        if (entry / OPTIMISED_NAME).is_file() and (entry / WEIGHTS_NAME).is_file():
            try:
                return _load_saved(entry, options_factory(), providers), "cached"
            except Exception:  # noqa: BLE001 - a damaged entry: drop it, optimise again
                shutil.rmtree(entry, ignore_errors=True)
    for folder in folders:
        if _writable(folder):
            try:
                return _save_while_creating(model, folder, key, options_factory(), providers), (
                    "saved"
                )
            except Exception:  # noqa: BLE001 - cannot save here (space, rights): try the next
                continue
    return ort.InferenceSession(str(model), options_factory(), providers=providers), "uncached"
