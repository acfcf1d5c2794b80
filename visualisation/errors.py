"""The errors of the visualisation tool: each stops it with its reason (exit code 2).

They derive from the project's one hierarchy (services/core/errors.py) with the STOP policy:
a missing results folder or a file of the wrong kind would fail every study the same way.
"""

from __future__ import annotations

from services.core.errors import ErrorPolicy, ScreeningError


class VisualisationError(ScreeningError):
    """Base of the visualisation tool's errors."""

    policy = ErrorPolicy.STOP


class VisualisationInputError(VisualisationError):
    """An input the tool cannot use (a missing folder, a parquet without the columns of
    `python -m training embed`, a malformed labels CSV, embeddings of different sizes)."""


class VisualisationSetupError(VisualisationError):
    """The tool itself cannot run here (FiftyOne missing, UMAP asked for but not installed)."""
