"""Is this a chest CT? DICOM metadata and image detectors, all recorded as evidence.

Two image detectors: ``lung_air`` (hand-made, always runs) and ``bpr``, the body-part
regression network of the model repository (when it has one). BPR *decides* only with real
weights and usable scores; with demo weights its evidence is shown, labelled DEMO, and the
verdict comes from the tags and ``lung_air`` as if it had not run.

Verdict rules (first match wins):

1. not CT                                    -> refused;
2. coverage along the body axis < min        -> refused (a chest needs ``min_coverage_mm``);
3. BPR decides and names another body part   -> refused, naming what it saw ("the images show
   HEAD/NECK (landmarks C2..eyes_end), not a chest"), whatever the tags and lung_air say;
4. BPR decides and names the chest           -> accepted, even when lung_air finds too little
   aerated lung (consolidated or effused lungs, a narrow field of view: the vertebrae and
   ribs BPR reads are still there); tag conflicts are noted;
5. the images show no lungs                  -> refused, whatever the tags say: the model
   would be asked about lungs that are not in the volume;
6. lungs, and the tags say chest or nothing  -> accepted;
7. lungs, but the tags name another part     -> accepted, with the conflict in the evidence.

Why rule 7 accepts: tags are typed or inherited from a protocol by people and scanners
(an "ABDOMEN" protocol extended to the chest, a "HEAD" default left on a chest scan), while
the image check measures what is actually in the volume: lungs across a chest-sized part of
the series. Refusing such a study would silently skip screening a real chest, which is the
costlier error for a screening service; accepting it with the conflict written in the report
lets a person see and correct the label. Rule 5 is the safe side of the same argument:
without lungs in the images, no tag can make the model's answer meaningful. Rules 3 and 4
put the learned model above both: it reads the whole anatomy, not only the air in it.

A chest accepted by BPR whose lung base or apex lies outside the scan gets a warning; so do
slice orders and spacings the scores contradict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loguru import logger
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from services.core.body_part.base import BodyPartDetector, ImageAssessment
from services.core.body_part.bpr_detector import BodyPartRegressionModel, BprDetector
from services.core.body_part.bpr_scores import body_part_label, shows_chest
from services.core.body_part.detectors import create_detector
from services.core.config import ChestCheckSettings
from services.core.dicom.objects import Series, Study
from services.core.dicom.values import tag_value, text, uid_name
from services.core.errors import ErrorPolicy, policy_of
from services.core.schemas import BodyPartEvidence, ChestCheckEvidence
from services.core.volume import Volume

__all__ = [
    "BodyPartDetector",
    "BodyPartRegressionModel",
    "ImageAssessment",
    "MetadataAssessment",
    "assess_metadata",
    "check_chest",
    "decide",
    "regression_decides",
]

# BodyPartExamined values are compared with everything but letters removed, upper case.
CHEST_BODY_PART = re.compile(r"CHEST|THORA|LUNG|TORSO|WHOLEBODY|RIBS?$|STERNUM|MEDIASTIN|PLEURA")
NON_CHEST_BODY_PARTS = {
    "HEAD", "BRAIN", "SKULL", "HEADNECK", "NECK", "FACE", "SINUS", "ORBIT", "EAR", "IAC",
    "ABDOMEN", "ABD", "PELVIS", "ABDOMENPELVIS", "ABDPELVIS", "KIDNEY", "LIVER", "PANCREAS",
    "PROSTATE", "BLADDER", "COLON", "HIP", "KNEE", "LEG", "ARM", "HAND", "FOOT", "ANKLE",
    "WRIST", "ELBOW", "SHOULDER", "EXTREMITY", "LOWEREXTREMITY", "UPPEREXTREMITY",
    "CSPINE", "LSPINE", "SSPINE", "TMJ", "JAW",
}  # fmt: skip
CHEST_WORDS = re.compile(
    # Russian words too (Cyrillic on purpose): studies from Russian-speaking sites.
    r"chest|thora|lung|pulmo|\bctpa\b|brust|t[oó]rax|грудн|легк|лёгк|\bогк\b|торак",  # noqa: RUF001
    re.IGNORECASE,
)
NON_CHEST_WORDS = re.compile(
    r"\bhead\b|brain|skull|cran|neuro|sinus|orbit|\babd|abdom|pelvi|\bhip\b|knee|ankle|wrist"
    r"|головн|мозг|череп|брюшн|живот|\bтаз|почк",  # noqa: RUF001 - Russian, as above
    re.IGNORECASE,
)
DESCRIPTION_TAGS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)


@dataclass(frozen=True)
class MetadataAssessment:
    verdict: bool | None  # True: the tags say chest; False: another part; None: nothing either way
    evidence: list[str] = field(default_factory=list)
    non_chest_terms: list[str] = field(default_factory=list)


def check_chest(
    study: Study,
    series: Series,
    volume: Volume,
    settings: ChestCheckSettings,
    detector: BodyPartDetector | None = None,
    body_part_model: BodyPartRegressionModel | None = None,
) -> ChestCheckEvidence:
    """The chest check on the selected series: tags, lung_air, BPR when given, the verdict."""
    detector = detector if detector is not None else create_detector(settings)
    metadata = assess_metadata(study, series)
    image = detector.assess(volume)
    regression, regression_warnings = body_part_regression_evidence(
        volume, settings, body_part_model
    )
    coverage_mm = float(volume.extent_mm[0])
    is_chest, reason = decide(series.modality, metadata, image, coverage_mm, settings, regression)
    image_evidence: dict[str, float | int | str] = {"summary": image.summary, **image.evidence}
    return ChestCheckEvidence(
        is_chest=is_chest,
        reason=reason,
        metadata_verdict=metadata.verdict,
        metadata_evidence=metadata.evidence,
        image_verdict=image.is_chest,
        image_detector=detector.name,
        image_evidence=image_evidence,
        coverage_mm=round(coverage_mm, 1),
        body_part_regression=regression,
        body_part_regression_decides=regression_decides(regression),
        warnings=regression_warnings,
    )


def regression_decides(regression: BodyPartEvidence | None) -> bool:
    """BPR takes part in the verdict only with real weights and a body part it could name."""
    return regression is not None and not regression.demo and regression.body_part is not None


def body_part_regression_evidence(
    volume: Volume, settings: ChestCheckSettings, model: BodyPartRegressionModel | None
) -> tuple[BodyPartEvidence | None, list[str]]:
    """BPR's evidence and the report lines about it; None when there is no model to ask.

    A failing BPR call does not fail the study: the verdict falls back to the tags and
    lung_air, and the report says so. Errors the caller must act on (the model server is
    unavailable: wait and retry; a broken deployment: stop) propagate.
    """
    if model is None or not settings.body_part_regression:
        return None, []
    detector = BprDetector(
        model, slice_spacing_mm=settings.bpr_slice_spacing_mm, max_slices=settings.bpr_max_slices
    )
    try:
        evidence = detector.evidence(volume)
    except Exception as error:
        if policy_of(error) is not ErrorPolicy.FAILURE_ROW:
            raise
        logger.exception("body-part regression failed; the chest check goes on without it")
        return None, [
            f"body-part regression failed ({type(error).__name__}: {error}); "
            "the verdict uses the tags and lung_air"
        ]
    if evidence.demo:
        # Information, not a data-quality problem: the report keeps the evidence (labelled
        # DEMO in the study view) and the warnings stay about the data.
        return evidence, []
    lines = [f"body-part regression: {evidence.summary}"]
    if not regression_decides(evidence):
        lines[0] += "; the verdict uses the tags and lung_air"
    return evidence, lines + list(evidence.warnings)


def decide(
    modality: str,
    metadata: MetadataAssessment,
    image: ImageAssessment,
    coverage_mm: float,
    settings: ChestCheckSettings,
    regression: BodyPartEvidence | None = None,
) -> tuple[bool, str]:
    """The verdict rules of the module docstring, as (is_chest, reason)."""
    if modality != "CT":
        return False, f"not a CT series (modality {modality or 'missing'})"
    if coverage_mm < settings.min_coverage_mm:
        return False, (
            f"not a chest CT: the series covers {coverage_mm:.0f} mm along the body axis, "
            f"less than the {settings.min_coverage_mm:.0f} mm a chest needs; images: {image.summary}"
        )
    if regression is not None and regression_decides(regression):
        return decide_by_regression(metadata, image, regression)
    if not image.is_chest:
        if metadata.verdict is True:
            return False, (
                "not a chest CT: the tags say chest but the images do not show lungs across "
                f"the series ({image.summary})"
            )
        return False, (
            f"not a chest CT: the images do not show lungs across the series ({image.summary})"
        )
    if metadata.verdict is True:
        return True, f"chest CT: the tags say chest and the images show lungs ({image.summary})"
    if metadata.verdict is None:
        return True, (f"chest CT by image: {image.summary}; the tags name no body part either way")
    terms = ", ".join(metadata.non_chest_terms)
    return True, (
        f"chest CT by image: {image.summary}; conflict: the tags say {terms}. Accepted because "
        "the images show lungs across the series; please check the study's labels"
    )


def decide_by_regression(
    metadata: MetadataAssessment, image: ImageAssessment, regression: BodyPartEvidence
) -> tuple[bool, str]:
    """Rules 3 and 4: a body part named by a real BPR model settles the question."""
    assert regression.body_part is not None  # regression_decides checked it
    seen = _what_bpr_saw(regression)
    if not shows_chest(regression.body_part):
        tags = " (the tags say chest)" if metadata.verdict is True else ""
        return False, (
            f"not a chest CT: the images show {seen}, not a chest{tags}; lung check: "
            f"{image.summary}"
        )
    if metadata.verdict is True:
        tags = "the tags say chest"
    elif metadata.verdict is None:
        tags = "the tags name no body part either way"
    else:
        tags = (
            f"conflict: the tags say {', '.join(metadata.non_chest_terms)}; please check the "
            "study's labels"
        )
    if image.is_chest:
        return True, f"chest CT: body-part regression sees {seen}, the images show lungs; {tags}"
    return True, (
        f"chest CT: body-part regression sees {seen}; {tags}. The lung check found too little "
        f"aerated lung ({image.summary}): accepted because the anatomy is a chest"
    )


def _what_bpr_saw(regression: BodyPartEvidence) -> str:
    """``HEAD/NECK (landmarks C2..eyes_end)``: the part and its first and last landmark."""
    assert regression.body_part is not None
    label = body_part_label(regression.body_part)
    if regression.first_landmark is None:
        return f"{label} (no landmark inside the scan)"
    return f"{label} (landmarks {regression.first_landmark}..{regression.last_landmark})"


def assess_metadata(study: Study, series: Series) -> MetadataAssessment:
    """Read what the tags say about the body part; every tag consulted goes into evidence."""
    header = series.first_header
    evidence: list[str] = [f"Modality {series.modality or 'missing'}"]
    if series.sop_class_uid:
        evidence.append(f"SOP class {uid_name(series.sop_class_uid)}")
    chest_terms: list[str] = []
    non_chest_terms: list[str] = []

    body_part = series.body_part_examined
    if body_part:
        normalised = re.sub(r"[^A-Z]", "", body_part.upper())
        if CHEST_BODY_PART.search(normalised):
            chest_terms.append(f"BodyPartExamined {body_part}")
        elif normalised in NON_CHEST_BODY_PARTS:
            non_chest_terms.append(f"BodyPartExamined {body_part}")
        else:
            evidence.append(f"BodyPartExamined {body_part} (names no specific part)")
    else:
        evidence.append("BodyPartExamined absent")

    for keyword, description in _descriptions(study, header):
        if CHEST_WORDS.search(description):
            chest_terms.append(f"{keyword} '{description}'")
        elif NON_CHEST_WORDS.search(description):
            non_chest_terms.append(f"{keyword} '{description}'")

    # A description naming the chest wins over another part elsewhere: chest-abdomen-pelvis
    # protocols name both, and they do contain the chest.
    if chest_terms:
        verdict: bool | None = True
    elif non_chest_terms:
        verdict = False
    else:
        verdict = None
    evidence.extend(f"chest: {term}" for term in chest_terms)
    evidence.extend(f"not chest: {term}" for term in non_chest_terms)
    return MetadataAssessment(verdict=verdict, evidence=evidence, non_chest_terms=non_chest_terms)


def _descriptions(study: Study, header: Dataset) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for keyword in DESCRIPTION_TAGS:
        value = text(tag_value(header, keyword))
        if keyword == "StudyDescription" and not value:
            value = study.study_description
        if value:
            found.append((keyword, value))
    codes = tag_value(header, "ProcedureCodeSequence")
    for item in codes if isinstance(codes, Sequence) else []:
        meaning = text(tag_value(item, "CodeMeaning"))
        if meaning:
            found.append(("ProcedureCodeSequence", meaning))
    return found
