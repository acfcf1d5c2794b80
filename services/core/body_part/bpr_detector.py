"""``bpr``: the body-part regression detector, beside ``lung_air``.

Unlike ``lung_air`` it needs a network: the inference backend serves it (ONNX Runtime in
this process, or Triton) and hands it over as a `BodyPartRegressionModel`: the scoring
function and the model's lookup table. A few slices of the series are scored
(`select_slices`), and the scores are read as anatomy (`interpret`).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.body_part.base import ImageAssessment
from services.core.body_part.bpr_input import DEFAULT_MAX_SLICES, DEFAULT_SLICE_SPACING_MM
from services.core.body_part.bpr_scores import SliceScorer, evidence_for_volume, shows_chest
from services.core.body_part.bpr_settings import BprInferenceSettings
from services.core.schemas import BodyPartEvidence
from services.core.volume import Volume

DETECTOR_NAME = "bpr"


@dataclass(frozen=True)
class BodyPartRegressionModel:
    """A served body-part regression network with the lookup table that reads its scores."""

    score_slices: SliceScorer  # float32 [n, 1, 128, 128] -> [n, 1] raw scores
    settings: BprInferenceSettings
    demo: bool  # demo weights or a demo table: its evidence is shown, never decides
    source: str  # where it runs, for logs: "onnxruntime <file>" or "triton <url> <model>"


@dataclass(frozen=True)
class BprDetector:
    """Scores slices at most ``slice_spacing_mm`` apart (``max_slices`` at most) of a volume."""

    model: BodyPartRegressionModel
    slice_spacing_mm: float = DEFAULT_SLICE_SPACING_MM
    max_slices: int = DEFAULT_MAX_SLICES
    name: str = DETECTOR_NAME

    def evidence(self, volume: Volume) -> BodyPartEvidence:
        evidence = evidence_for_volume(
            volume,
            self.model.score_slices,
            self.model.settings,
            spacing_mm=self.slice_spacing_mm,
            max_slices=self.max_slices,
        )
        if self.model.demo and not evidence.demo:
            # Demo weights with a real-looking table still mean nothing.
            evidence = evidence.model_copy(
                update={"demo": True, "warnings": [*evidence.warnings, "DEMO weights"]}
            )
        return evidence

    def assess(self, volume: Volume) -> ImageAssessment:
        """The BodyPartDetector view: chest or not, from the body part the scores name."""
        evidence = self.evidence(volume)
        summary = evidence.summary + (" [DEMO weights]" if evidence.demo else "")
        numbers: dict[str, float | int | str] = {"scored_slices": len(evidence.positions_mm)}
        if evidence.body_part is not None:
            numbers["body_part"] = evidence.body_part
        return ImageAssessment(
            is_chest=shows_chest(evidence.body_part), summary=summary, evidence=numbers
        )
