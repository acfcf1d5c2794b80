"""The repository's body-part regression model as both backends serve it.

The repository holds ``body_part_regression/1/model.onnx`` (``slices`` float32
``[N, 1, 128, 128]`` -> ``scores`` ``[N, 1]``) and, beside it, bpreg's
``inference-settings.json`` (the lookup table that reads the scores); the metadata names
both. A backend supplies a function that scores one batch; this module checks the input,
splits it into batches the served model takes and pairs the result with the table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from services.core.arrays import AnyArray, BprScores, BprSlices
from services.core.body_part.bpr_detector import BodyPartRegressionModel
from services.core.body_part.bpr_input import OUTPUT_SIZE
from services.core.body_part.bpr_scores import SliceScorer
from services.core.body_part.bpr_settings import (
    BprInferenceSettings,
    InterpretationRules,
    missing_landmarks,
)
from services.core.errors import ModelRepositoryError
from services.core.model_metadata import BodyPartRegressionInfo

SLICES_INPUT = "slices"
SCORES_OUTPUT = "scores"
SLICE_SHAPE = (1, OUTPUT_SIZE, OUTPUT_SIZE)


def body_part_onnx_path(repository: Path, info: BodyPartRegressionInfo) -> Path:
    return Path(repository) / info.model / "1" / "model.onnx"


def read_body_part_settings(repository: Path, info: BodyPartRegressionInfo) -> BprInferenceSettings:
    """The lookup table the metadata names; ModelRepositoryError naming what is wrong."""
    path = Path(repository) / info.inference_settings
    try:
        settings = BprInferenceSettings.model_validate_json(path.read_text())
    except OSError as error:
        raise ModelRepositoryError(
            f"the body-part regression settings {path} cannot be read: {error}"
        ) from error
    except ValidationError as error:
        raise ModelRepositoryError(
            f"the body-part regression settings {path} are invalid: "
            + "; ".join(
                f"{'.'.join(map(str, item['loc'])) or 'document'}: {item['msg']}"
                for item in error.errors()
            )
        ) from error
    missing = missing_landmarks(settings, InterpretationRules())
    if missing:
        raise ModelRepositoryError(
            f"the body-part regression settings {path} lack the landmarks " + ", ".join(missing)
        )
    return settings


def checked_slices(slices: AnyArray) -> BprSlices:
    """The network input as a contiguous float32 ``[N, 1, 128, 128]``; ValueError otherwise."""
    if slices.ndim != 4 or tuple(slices.shape[1:]) != SLICE_SHAPE:
        raise ValueError(
            f"body-part regression input must be [N, {', '.join(map(str, SLICE_SHAPE))}], "
            f"got {slices.shape}"
        )
    return np.ascontiguousarray(slices, dtype=np.float32)


def in_batches(score_batch: Callable[[BprSlices], AnyArray], max_batch: int) -> SliceScorer:
    """A scorer for any number of slices from one that takes at most ``max_batch``."""

    def score(slices: BprSlices) -> BprScores:
        slices = checked_slices(slices)
        parts = [
            np.asarray(score_batch(slices[start : start + max_batch]), dtype=np.float32)
            for start in range(0, len(slices), max_batch)
        ]
        scores = np.concatenate(parts).reshape(-1, 1) if parts else np.zeros((0, 1), np.float32)
        if scores.shape[0] != len(slices):
            raise ValueError(f"{scores.shape[0]} body-part scores for {len(slices)} slices")
        return scores

    return score


def body_part_model(
    score_batch: Callable[[BprSlices], AnyArray],
    repository: Path,
    info: BodyPartRegressionInfo,
    *,
    source: str,
) -> BodyPartRegressionModel:
    """The model a backend hands to the pipeline: its scorer and the repository's table."""
    settings = read_body_part_settings(repository, info)
    return BodyPartRegressionModel(
        score_slices=in_batches(score_batch, info.max_batch_size),
        settings=settings,
        demo=info.demo or settings.demo,
        source=source,
    )
