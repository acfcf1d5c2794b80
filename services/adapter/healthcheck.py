"""``python -m services.adapter.healthcheck [FILE] [MAX_AGE_S]``: exit 0 while the adapter's
I/O loop is alive (it touches FILE every few seconds), 1 otherwise. For container health checks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

DEFAULT_FILE = Path("/tmp/cts-adapter.alive")
DEFAULT_MAX_AGE_S = 60.0


def is_alive(path: Path, max_age_s: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime <= max_age_s
    except FileNotFoundError:
        return False


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT_FILE
    max_age = float(argv[1]) if len(argv) > 1 else DEFAULT_MAX_AGE_S
    return 0 if is_alive(path, max_age) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
