"""Which 2-D map of the embeddings to compute: UMAP when umap-learn is installed and there
are enough studies for a neighbourhood graph, PCA otherwise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from visualisation.errors import VisualisationSetupError

METHODS = ("umap", "pca")
# UMAP builds a graph of each point's nearest neighbours: with a handful of points there is
# no neighbourhood to speak of (and its spectral start fails), so small sets get PCA.
UMAP_MIN_POINTS = 10
UMAP_NEIGHBOURS = 15  # umap-learn's default, lowered to n - 1 for smaller sets
PCA_MIN_POINTS = 2  # two components need two points
RANDOM_SEED = 51  # the same studies give the same map


@dataclass(frozen=True)
class MapChoice:
    method: str | None  # None: too few embeddings for any map
    note: str  # why, in words (logged)
    parameters: dict[str, int]

    @property
    def brain_key(self) -> str | None:
        return None if self.method is None else f"embeddings_{self.method}"


def umap_installed() -> bool:
    return importlib.util.find_spec("umap") is not None


def choose_map(requested: str | None, n_points: int, *, umap_available: bool) -> MapChoice:
    """The method for ``n_points`` embeddings; ``requested`` None means UMAP if installed."""
    if requested is not None and requested not in METHODS:
        raise VisualisationSetupError(f"unknown method {requested!r}: use one of {METHODS}")
    if requested == "umap" and not umap_available:
        raise VisualisationSetupError(
            "--method umap needs umap-learn (the visualisation extra: pip install -e .[visualisation])"
        )
    if n_points < PCA_MIN_POINTS:
        return MapChoice(None, f"{n_points} embedding(s): no map (it needs two)", {})
    wanted = requested or ("umap" if umap_available else "pca")
    if wanted == "umap" and n_points < UMAP_MIN_POINTS:
        return MapChoice(
            "pca",
            f"PCA: {n_points} embeddings are too few for UMAP (it needs {UMAP_MIN_POINTS})",
            {"seed": RANDOM_SEED},
        )
    if wanted == "umap":
        neighbours = min(UMAP_NEIGHBOURS, n_points - 1)
        return MapChoice(
            "umap",
            f"UMAP of {n_points} embeddings ({neighbours} neighbours)",
            {"num_neighbors": neighbours, "seed": RANDOM_SEED},
        )
    reason = "" if requested == "pca" else " (umap-learn is not installed)"
    return MapChoice("pca", f"PCA of {n_points} embeddings{reason}", {"seed": RANDOM_SEED})
