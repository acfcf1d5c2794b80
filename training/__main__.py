"""Entry point: ``python -m training {embed,train,evaluate} ...`` (see `training.cli`)."""

from __future__ import annotations

import os
import sys

from training.cli import main
from training.logs import configure_console

if __name__ == "__main__":
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    configure_console()
    sys.exit(main())
