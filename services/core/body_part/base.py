"""The contract of an image-based body-part detector: a volume in, an assessment out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from services.core.volume import Volume


@dataclass(frozen=True)
class ImageAssessment:
    """What a detector concluded from the pixels alone, with the numbers behind it."""

    is_chest: bool
    summary: str  # one human-readable sentence with the decisive numbers
    evidence: dict[str, float | int | str] = field(default_factory=dict)


@runtime_checkable
class BodyPartDetector(Protocol):
    """Decides from the image whether a volume shows the chest.

    Implementations must be cheap (well under a second on a 300x512x512 volume) and must
    not import torch; a learned body-part regression model would run through onnxruntime.
    """

    name: str

    def assess(self, volume: Volume) -> ImageAssessment: ...
