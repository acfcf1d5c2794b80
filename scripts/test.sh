#!/usr/bin/env bash
# The test suite, from a fresh machine: set-up, services, lint, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export ORT_DISABLE_TELEMETRY=1  # onnxruntime >= 1.31 sends telemetry otherwise
bash scripts/setup.sh convert,dev,train
bash scripts/ensure_services.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
