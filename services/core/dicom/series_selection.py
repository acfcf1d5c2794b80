"""Choosing the one series of a study that the model should see, with a reason for every series.

Rules, in the order they are applied (the first that fails rejects the series):

1. modality CT;
2. not a localizer / scout (ImageType LOCALIZER, SCOUT or TOPOGRAM);
3. not a derived or secondary-capture image: dose report screens, screenshots, reformats
   (Secondary Capture SOP class, ImageType DERIVED\\SECONDARY, dose keywords);
4. a single-frame CT image SOP class (Enhanced CT multi-frame objects are not supported yet);
5. more than one image (a single image is a localizer or a key image, not a volume);
6. axial: ``|slice normal . z| >= min_axial_cosine``;
7. at least ``min_slices`` images.

Among the series that pass, the preferred one has slices within the configured thickness
range, then is not a bone reconstruction, then has the thinnest slices, then a lung or
soft-tissue kernel rather than an unrecognised one, then the most images. Bone kernels are
set aside before thickness because vendors often add a thin bone reconstruction
(e.g. 0.625 mm BONEPLUS next to 1.25 mm STANDARD and LUNG): its noise texture is far from
what the model saw in training, while the few tenths of a millimetre it gains are lost in
the resampling to 1.5 mm anyway.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from services.core.config import SeriesSelectionSettings
from services.core.dicom import geometry
from services.core.dicom.objects import Series, Study
from services.core.dicom.values import uid_name
from services.core.schemas import SeriesDecision

SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)
MULTI_FRAME_CT_CLASSES = frozenset({EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})
DOSE_IMAGE_TYPES = {"DOSE_INFO", "DOSE", "PATIENT_INFO", "RESULTS", "SCREEN SAVE"}
# Dose-report screens by description. Never plain "dose": "LOW DOSE CHEST" is exactly the
# screening series this service exists for.
DOSE_DESCRIPTION = re.compile(
    r"dose[\s_]*(report|info|summary|record|sheet|screen)|exam summary|patient protocol|screen\s*save",
    re.IGNORECASE,
)
LOCALIZER_DESCRIPTION = re.compile(
    r"\b(scout|topogram|localizer|localiser|surview|scanogram)\b", re.IGNORECASE
)

# Reconstruction kernels, by kind. Matching is on the kernel tag first, then the series
# description. Vendor names: Siemens B/I/Br/Bl + number (lower = softer), GE STANDARD /
# SOFT / LUNG / BONE, Philips letters with words in the description, Canon FCxx.
LUNG_WORDS = re.compile(r"lung|pulm|hrct|легк|лёгк", re.IGNORECASE)
SOFT_WORDS = re.compile(
    r"soft|standard|\bstd\b|mediast|body|abdomen|weich|мягк|средост", re.IGNORECASE
)
BONE_WORDS = re.compile(r"bone|edge|\bsharp|кост", re.IGNORECASE)
SIEMENS_KERNEL = re.compile(r"^(?:B|I|BR|BF|BV|Q)R?(\d{2})", re.IGNORECASE)
SIEMENS_LUNG_KERNEL = re.compile(r"^BL\d{2}", re.IGNORECASE)
CANON_KERNEL = re.compile(r"^FC(\d{2})", re.IGNORECASE)

KERNEL_RANK = {"lung": 0, "soft tissue": 0, "unknown": 1, "bone": 2}
THICKNESS_TOLERANCE_MM = 1e-6  # the configured thickness range includes its ends
NO_SERIES_NUMBER = 1 << 30  # a series without a number sorts after every numbered one


class Rejection(str, Enum):
    """Why a series cannot be analysed, by kind (the study's failure reason groups them)."""

    NOT_CT = "not_ct"
    LOCALIZER = "localizer"
    DOSE = "dose"
    SECONDARY = "secondary"
    MULTIFRAME = "multiframe"
    SINGLE = "single"
    GEOMETRY = "geometry"
    NOT_AXIAL = "not_axial"
    TOO_FEW = "too_few"


@dataclass
class SeriesSelection:
    selected: Series | None
    decisions: list[SeriesDecision] = field(default_factory=list)
    failure_reason: str | None = None
    usable: int = 0  # series that passed every rule: more than one means one was chosen


@dataclass(frozen=True)
class _Rejection:
    category: Rejection
    reason: str


def select_series(study: Study, settings: SeriesSelectionSettings) -> SeriesSelection:
    """Apply the rules to every series of the study and pick the preferred usable one."""
    rejections: dict[str, _Rejection] = {}
    eligible: list[Series] = []
    for series in study.series:
        rejection = reject_reason(series, settings)
        if rejection is None:
            eligible.append(series)
        else:
            rejections[series.series_uid] = rejection

    if not eligible:
        decisions = [
            _decision(series, False, rejections[series.series_uid].reason)
            for series in study.series
        ]
        return SeriesSelection(
            selected=None,
            decisions=decisions,
            failure_reason=_failure_reason(study, rejections),
        )

    chosen = min(eligible, key=lambda s: preference_key(s, settings))
    decisions = []
    for series in study.series:
        if series is chosen:
            decisions.append(_decision(series, True, "selected: " + _describe(series, settings)))
        elif series.series_uid in rejections:
            decisions.append(_decision(series, False, rejections[series.series_uid].reason))
        else:
            decisions.append(_decision(series, False, why_not_preferred(series, chosen, settings)))
    return SeriesSelection(
        selected=chosen, decisions=decisions, failure_reason=None, usable=len(eligible)
    )


# --- the rules, in order: the first that fails rejects the series --------------------------

RejectionRule = Callable[[Series, SeriesSelectionSettings], "_Rejection | None"]


def _not_ct(series: Series, _settings: SeriesSelectionSettings) -> _Rejection | None:
    if series.modality != "CT":
        return _Rejection(Rejection.NOT_CT, f"modality {series.modality or 'missing'}, not CT")
    return None


def _localizer(series: Series, _settings: SeriesSelectionSettings) -> _Rejection | None:
    if series.is_localizer or LOCALIZER_DESCRIPTION.search(series.description):
        return _Rejection(
            Rejection.LOCALIZER, f"localizer (scout) image: ImageType {_image_type_text(series)}"
        )
    return None


def _dose_screens(series: Series, _settings: SeriesSelectionSettings) -> _Rejection | None:
    if set(series.image_type) & DOSE_IMAGE_TYPES or DOSE_DESCRIPTION.search(series.description):
        return _Rejection(
            Rejection.DOSE,
            f"dose report screens ({_sop_text(series)}, ImageType {_image_type_text(series)})",
        )
    return None


def _secondary(series: Series, _settings: SeriesSelectionSettings) -> _Rejection | None:
    image_type = set(series.image_type)
    derived_secondary = "DERIVED" in image_type and "SECONDARY" in image_type
    if series.sop_class_uid in SECONDARY_CAPTURE_CLASSES or derived_secondary:
        return _Rejection(
            Rejection.SECONDARY,
            f"derived or secondary-capture images ({_sop_text(series)}, "
            f"ImageType {_image_type_text(series)})",
        )
    return None


def _multiframe(series: Series, _settings: SeriesSelectionSettings) -> _Rejection | None:
    if series.sop_class_uid in MULTI_FRAME_CT_CLASSES or any(
        inst.n_frames > 1 for inst in series.instances
    ):
        return _Rejection(
            Rejection.MULTIFRAME, "multi-frame (Enhanced CT) images are not supported yet"
        )
    return None


def _not_ct_image(series: Series, _settings: SeriesSelectionSettings) -> _Rejection | None:
    if series.sop_class_uid and series.sop_class_uid != CTImageStorage:
        return _Rejection(Rejection.SECONDARY, f"not a CT image ({_sop_text(series)})")
    return None


def _single_image(series: Series, _settings: SeriesSelectionSettings) -> _Rejection | None:
    if series.n_images == 1:
        return _Rejection(Rejection.SINGLE, "a single image (localizer or key image), not a volume")
    return None


def _geometry(series: Series, settings: SeriesSelectionSettings) -> _Rejection | None:
    orientation = series.orientation()
    if orientation is None:
        return _Rejection(
            Rejection.GEOMETRY, "no ImageOrientationPatient: the slice geometry is unknown"
        )
    if any(inst.position is None for inst in series.instances):
        return _Rejection(
            Rejection.GEOMETRY, "images without ImagePositionPatient: cannot order the slices"
        )
    try:
        normal = geometry.slice_normal(orientation)
    except ValueError:
        return _Rejection(
            Rejection.GEOMETRY, "invalid ImageOrientationPatient (parallel row and column)"
        )
    axial_cosine = abs(float(normal[2]))
    if axial_cosine < settings.min_axial_cosine:
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        return _Rejection(
            Rejection.NOT_AXIAL,
            f"not axial ({plane}-like): |slice normal . z| = {axial_cosine:.2f} < "
            f"{settings.min_axial_cosine:.2f}",
        )
    return None


def _too_few(series: Series, settings: SeriesSelectionSettings) -> _Rejection | None:
    if series.n_images < settings.min_slices:
        return _Rejection(
            Rejection.TOO_FEW,
            f"series has {series.n_images} images, fewer than the {settings.min_slices} required",
        )
    return None


REJECTION_RULES: tuple[RejectionRule, ...] = (
    _not_ct,
    _localizer,
    _dose_screens,
    _secondary,
    _multiframe,
    _not_ct_image,
    _single_image,
    _geometry,
    _too_few,
)


def reject_reason(series: Series, settings: SeriesSelectionSettings) -> _Rejection | None:
    """The first rule this series fails, or None when it can be analysed."""
    for rule in REJECTION_RULES:
        rejection = rule(series, settings)
        if rejection is not None:
            return rejection
    return None


def kernel_kind(series: Series) -> str:
    """'lung', 'soft tissue', 'bone' or 'unknown' from the kernel tag and the description."""
    for kernel in [k for k in series.convolution_kernel.split("\\") if k]:
        kind = _kind_from_kernel(kernel.strip())
        if kind != "unknown":
            return kind
    text = f"{series.description} {series.convolution_kernel}"
    if BONE_WORDS.search(text):
        return "bone"
    if LUNG_WORDS.search(text):
        return "lung"
    if SOFT_WORDS.search(text):
        return "soft tissue"
    return "unknown"


def _kind_from_kernel(kernel: str) -> str:
    if BONE_WORDS.search(kernel):
        return "bone"
    if LUNG_WORDS.search(kernel) or SIEMENS_LUNG_KERNEL.match(kernel):
        return "lung"
    if SOFT_WORDS.search(kernel):
        return "soft tissue"
    match = SIEMENS_KERNEL.match(kernel)
    if match:
        number = int(match.group(1))
        # Siemens: 10-49 smooth to medium (soft tissue), 50-79 sharp (lung), 80+ ultra sharp.
        return "soft tissue" if number < 50 else ("lung" if number < 80 else "bone")
    match = CANON_KERNEL.match(kernel)
    if match:
        number = int(match.group(1))
        # Canon/Toshiba: FC01-FC29 body, FC30-FC49 bone, FC50-FC59 lung, FC80+ head/sharp.
        if number < 30:
            return "soft tissue"
        if 50 <= number < 60:
            return "lung"
        return "bone"
    return "unknown"


# --- preference among the usable series: one list for the order and its explanation -------


def _in_thickness_range(series: Series, settings: SeriesSelectionSettings) -> bool:
    thickness = series.effective_thickness()
    return thickness is not None and (
        settings.min_slice_thickness_mm - THICKNESS_TOLERANCE_MM
        <= thickness
        <= settings.max_slice_thickness_mm + THICKNESS_TOLERANCE_MM
    )


def _rounded_thickness(series: Series) -> float:
    thickness = series.effective_thickness()
    return round(thickness, 2) if thickness is not None else math.inf


@dataclass(frozen=True)
class PreferenceCriterion:
    """One step of the preference order: a sort key (lower is preferred) and what a reader is
    told ("usable, <explanation>") when a usable series lost to the chosen one on this step."""

    name: str
    key: Callable[[Series, SeriesSelectionSettings], float | int | str]
    explain: Callable[[Series, Series, SeriesSelectionSettings], str]  # (series, chosen, ...)


PREFERENCE: tuple[PreferenceCriterion, ...] = (
    PreferenceCriterion(
        "slice thickness in range",
        lambda s, settings: 0 if _in_thickness_range(s, settings) else 1,
        lambda s, chosen, settings: (
            f"but {_label(chosen)} has slices within {settings.min_slice_thickness_mm:g}-"
            f"{settings.max_slice_thickness_mm:g} mm and this one has "
            f"{_mm(s.effective_thickness())}"
        ),
    ),
    PreferenceCriterion(
        "not a bone reconstruction",
        lambda s, _settings: 1 if kernel_kind(s) == "bone" else 0,
        lambda _s, chosen, _settings: (
            f"but bone reconstructions are de-preferred and {_label(chosen)} is not one"
        ),
    ),
    PreferenceCriterion(
        "thinnest slices",
        lambda s, _settings: _rounded_thickness(s),
        lambda s, chosen, _settings: (
            f"but {_label(chosen)} has thinner slices ({_mm(chosen.effective_thickness())} "
            f"vs {_mm(s.effective_thickness())})"
        ),
    ),
    PreferenceCriterion(
        "lung or soft-tissue kernel",
        lambda s, _settings: KERNEL_RANK[kernel_kind(s)],
        lambda s, chosen, _settings: (
            f"but {_label(chosen)} has a preferred reconstruction kernel "
            f"({kernel_kind(chosen)} vs {kernel_kind(s)})"
        ),
    ),
    PreferenceCriterion(
        "most images",
        lambda s, _settings: -s.n_images,
        lambda s, chosen, _settings: (
            f"but {_label(chosen)} has more images ({chosen.n_images} vs {s.n_images})"
        ),
    ),
    PreferenceCriterion(
        "lowest series number",
        lambda s, _settings: s.series_number if s.series_number is not None else NO_SERIES_NUMBER,
        lambda _s, chosen, _settings: (
            f"equivalent to {_label(chosen)} (lower series number preferred)"
        ),
    ),
    PreferenceCriterion(
        "series UID",  # a last, arbitrary but stable tie-break
        lambda s, _settings: s.series_uid,
        lambda _s, chosen, _settings: f"equivalent to {_label(chosen)}",
    ),
)


def preference_key(series: Series, settings: SeriesSelectionSettings) -> tuple[object, ...]:
    """The series' place in the preference order (lower is preferred)."""
    return tuple(criterion.key(series, settings) for criterion in PREFERENCE)


def why_not_preferred(series: Series, chosen: Series, settings: SeriesSelectionSettings) -> str:
    """Why a usable series was not chosen: the first criterion on which it lost."""
    for criterion in PREFERENCE:
        if criterion.key(series, settings) != criterion.key(chosen, settings):
            return "usable, " + criterion.explain(series, chosen, settings)
    return f"usable, equivalent to {_label(chosen)}"


def _describe(series: Series, settings: SeriesSelectionSettings) -> str:
    thickness = series.effective_thickness()
    parts = [f"axial CT, {series.n_images} images, {_mm(thickness)} slices"]
    if thickness is not None and not _in_thickness_range(series, settings):
        parts.append(
            f"outside the preferred {settings.min_slice_thickness_mm:g}-"
            f"{settings.max_slice_thickness_mm:g} mm but the best available"
        )
    kernel = series.convolution_kernel or "no kernel tag"
    parts.append(f"kernel {kernel} ({kernel_kind(series)})")
    return ", ".join(parts)


# Rejections that mean "this is not a volume at all", in the order a failure reason lists them.
NOT_IMAGE_VOLUMES = {
    Rejection.LOCALIZER: "a localizer",
    Rejection.SINGLE: "single images",
    Rejection.DOSE: "dose report screens",
    Rejection.SECONDARY: "derived or secondary-capture images",
}


def _failure_reason(study: Study, rejections: dict[str, _Rejection]) -> str:
    if not study.series:
        return "the study has no image series"
    categories = [rejections[s.series_uid].category for s in study.series]
    if all(category is Rejection.NOT_CT for category in categories):
        modalities = sorted({s.modality or "missing" for s in study.series})
        return f"no CT series: modality {', '.join(modalities)}"
    ct_series = [s for s in study.series if rejections[s.series_uid].category != Rejection.NOT_CT]
    ct_categories = {rejections[s.series_uid].category for s in ct_series}
    if ct_categories <= NOT_IMAGE_VOLUMES.keys():
        kinds = [
            words for category, words in NOT_IMAGE_VOLUMES.items() if category in ct_categories
        ]
        joined = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
        return f"no usable CT series: only {joined}"
    if len(ct_series) == 1:
        return rejections[ct_series[0].series_uid].reason
    details = "; ".join(f"{_label(s)}: {rejections[s.series_uid].reason}" for s in ct_series)
    return f"no usable CT series ({details})"


def _decision(series: Series, selected: bool, reason: str) -> SeriesDecision:
    return SeriesDecision(
        series_uid=series.series_uid,
        series_number=series.series_number,
        description=series.description,
        modality=series.modality,
        n_images=series.n_images,
        selected=selected,
        reason=reason,
    )


def _label(series: Series) -> str:
    number = f"series {series.series_number}" if series.series_number is not None else "series"
    return f"{number} '{series.description}'" if series.description else number


def _image_type_text(series: Series) -> str:
    return "\\".join(series.image_type) if series.image_type else "missing"


def _sop_text(series: Series) -> str:
    if not series.sop_class_uid:
        return "no SOP class"
    return uid_name(series.sop_class_uid)


def _mm(value: float | None) -> str:
    return "unknown thickness" if value is None else f"{value:g} mm"
