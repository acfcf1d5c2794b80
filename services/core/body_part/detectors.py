"""The image-based body-part detectors, registered by name (``chest_check.detector`` in the
config).

Another detector is added by implementing BodyPartDetector (onnxruntime, no torch),
registering its factory here, and adding its name to ``ChestCheckSettings.detector``.
"""

from __future__ import annotations

from collections.abc import Callable

from services.core.body_part.base import BodyPartDetector
from services.core.body_part.lung_air import LungAirDetector
from services.core.config import ChestCheckSettings

DetectorFactory = Callable[[ChestCheckSettings], BodyPartDetector]

_REGISTRY: dict[str, DetectorFactory] = {"lung_air": LungAirDetector.from_settings}


def register_detector(name: str, factory: DetectorFactory) -> None:
    """Make a detector available under ``name`` (replacing any earlier one of that name)."""
    _REGISTRY[name] = factory


def available_detectors() -> list[str]:
    return sorted(_REGISTRY)


def create_detector(settings: ChestCheckSettings) -> BodyPartDetector:
    try:
        factory = _REGISTRY[settings.detector]
    except KeyError:
        raise ValueError(
            f"unknown body-part detector {settings.detector!r}; available: "
            + ", ".join(available_detectors())
        ) from None
    return factory(settings)


__all__ = ["DetectorFactory", "available_detectors", "create_detector", "register_detector"]
