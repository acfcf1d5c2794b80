"""Benchmarks of the screening pipeline: ``python -m benchmarks.run`` (see README.md here)."""
