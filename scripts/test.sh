#!/usr/bin/env bash
# The test suite, from a fresh machine: set-up, services, lint, types, pytest.
#   bash scripts/test.sh           everything: what CI runs (.ci/run)
#   bash scripts/test.sh --fast    the everyday loop: every test that needs no RabbitMQ, Triton
#                                  or browser and is not marked slow (docs/ARCHITECTURE.md, Tests)
# Further arguments go to pytest (bash scripts/test.sh --fast -k preprocessing).
set -euo pipefail
cd "$(dirname "$0")/.."
export ORT_DISABLE_TELEMETRY=1  # onnxruntime >= 1.31 sends telemetry otherwise
fast=0
if [ "${1:-}" = "--fast" ]; then
  fast=1
  shift
fi
bash scripts/setup.sh convert,dev,train,visualisation
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy services convertation training visualisation benchmarks synthetic
if [ "$fast" = 1 ]; then
  exec .venv/bin/python -m pytest -m "not slow and not rabbitmq and not postgres and not triton and not browser" "$@"
fi
bash scripts/ensure_services.sh
exec .venv/bin/python -m pytest "$@"
