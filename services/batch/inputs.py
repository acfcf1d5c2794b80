"""What one run of the batch screens: the inputs in a folder (shared with ``training embed``)."""

from __future__ import annotations

from pathlib import Path

# Files that are an input of their own, never slices of a loose series.
SINGLE_INPUT_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".nii", ".nii.gz")


def list_inputs(input_path: Path) -> list[Path]:
    """The inputs of a run: one zip/file, each top-level entry of a folder, or the folder itself."""
    if input_path.is_file():
        return [input_path]
    entries = sorted(entry for entry in input_path.iterdir() if not entry.name.startswith("."))
    loose_series = entries and all(
        entry.is_file() and not entry.name.lower().endswith(SINGLE_INPUT_SUFFIXES)
        for entry in entries
    )
    if loose_series:
        return [input_path]
    return entries
