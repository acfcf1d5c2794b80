"""services/triton/local_server.py: a tritonserver killed after ignoring SIGTERM cannot remove
its python backend's shared-memory regions; the launcher finds them in /proc (the server's
and its model stubs' mappings) to remove them itself."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.triton.local_server import PYTHON_BACKEND_REGION, python_backend_regions

# A "server" whose child (a "stub") maps a region named as Triton's, then waits.
SERVER = """
import subprocess, sys
stub = (
    "import mmap, sys, time\\n"
    "f = open(sys.argv[1], 'r+b')\\n"
    "m = mmap.mmap(f.fileno(), 4096)\\n"
    "print('mapped', flush=True)\\n"
    "time.sleep(60)\\n"
)
child = subprocess.Popen([sys.executable, "-c", stub, sys.argv[1]], stdout=sys.stdout)
child.wait()
"""


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs Linux /dev/shm and /proc")
def test_the_regions_of_the_server_and_its_stubs_are_found() -> None:
    region = Path(f"{PYTHON_BACKEND_REGION}test-{uuid.uuid4()}")
    region.write_bytes(b"\0" * 4096)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(region)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "mapped"
        found = python_backend_regions(server.pid)
        assert region in found
        assert python_backend_regions(1 << 30) == set()  # no such process
    finally:
        server.kill()
        server.wait()
        time.sleep(0.1)
        subprocess.run(["pkill", "-f", str(region)], check=False)
        region.unlink(missing_ok=True)
