"""Benchmarks of the screening pipeline: ``python -m benchmarks.run`` (see README.md here).

Every module runs as ``python -m benchmarks.<module>`` from the project root."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
