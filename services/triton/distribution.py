"""The tritonserver of the ``nvidia-pytriton`` wheel: where its pieces are, and the
environment and arguments it needs to serve the python-flavour model repository
(the reasons are in services/triton/local_server.py's docstring).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import ConfigurationError


class TritonServerError(ConfigurationError):
    """The server could not be found, did not start, or a model did not become ready."""


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the wheel's server live."""

    server_binary: Path
    libraries: Path
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for one Python version


def find_distribution(python_version: str | None = None) -> TritonDistribution:
    """Locate the tritonserver of the installed nvidia-pytriton wheel."""
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        import pytriton  # only to find the files of the wheel
    except ImportError as error:
        raise TritonServerError(
            "nvidia-pytriton is not installed: `pip install nvidia-pytriton` "
            "(it ships the tritonserver binary)"
        ) from error
    package = Path(pytriton.__file__).resolve().parent
    dist = package / "tritonserver"
    # Wheel installs keep the bundled libraries beside the package; editable installs inside.
    libraries = package.parent / "nvidia_pytriton.libs"
    if not libraries.is_dir():
        libraries = dist / "external_libs"
    found = TritonDistribution(
        server_binary=dist / "bin" / "tritonserver",
        libraries=libraries,
        python_backend=dist / "backends" / "python",
        stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    for path in (found.server_binary, found.python_backend, found.stub):
        if not path.exists():
            raise TritonServerError(f"incomplete nvidia-pytriton install: {path} is missing")
    return found


def make_backend_directory(distribution: TritonDistribution, parent: Path) -> Path:
    """A backend directory whose python backend has the stub for this interpreter."""
    backends = parent / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True)
    for item in distribution.python_backend.iterdir():
        if item.is_file():
            (python_dir / item.name).symlink_to(item)
    (python_dir / "triton_python_backend_stub").symlink_to(distribution.stub)
    return backends


def server_environment(distribution: TritonDistribution, python_prefix: Path) -> dict[str, str]:
    env = dict(os.environ)
    library_paths = [str(distribution.libraries)]
    if env.get("LD_LIBRARY_PATH"):
        library_paths.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(library_paths)
    # The stub finds its sys.prefix through `python3` on PATH (see the module docstring).
    env["PATH"] = os.pathsep.join([str(python_prefix / "bin"), env.get("PATH", "")])
    # A PYTHONHOME or PYTHONPATH from the caller would override that lookup.
    env.pop("PYTHONHOME", None)
    return env


def server_arguments(
    *,
    model_repository: Path,
    backend_directory: Path,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    log_verbose: int,
    extra: list[str],
) -> list[str]:
    return [
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_directory}",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--log-verbose={log_verbose}",
        *extra,
    ]
