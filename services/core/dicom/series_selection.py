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
from dataclasses import dataclass, field

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


@dataclass
class SeriesSelection:
    selected: Series | None
    decisions: list[SeriesDecision] = field(default_factory=list)
    failure_reason: str | None = None


@dataclass(frozen=True)
class _Rejection:
    category: (
        str  # not_ct | localizer | secondary | multiframe | single | geometry | not_axial | too_few
    )
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

    ranked = sorted(eligible, key=lambda s: _preference_key(s, settings))
    chosen = ranked[0]
    decisions = []
    for series in study.series:
        if series is chosen:
            decisions.append(_decision(series, True, "selected: " + _describe(series, settings)))
        elif series.series_uid in rejections:
            decisions.append(_decision(series, False, rejections[series.series_uid].reason))
        else:
            decisions.append(_decision(series, False, _why_not_preferred(series, chosen, settings)))
    return SeriesSelection(selected=chosen, decisions=decisions, failure_reason=None)


def reject_reason(series: Series, settings: SeriesSelectionSettings) -> _Rejection | None:
    """The first rule this series fails, or None when it can be analysed."""
    if series.modality != "CT":
        return _Rejection("not_ct", f"modality {series.modality or 'missing'}, not CT")
    image_type = set(series.image_type)
    if series.is_localizer or LOCALIZER_DESCRIPTION.search(series.description):
        return _Rejection(
            "localizer",
            f"localizer (scout) image: ImageType {_image_type_text(series)}",
        )
    is_secondary_capture = series.sop_class_uid in SECONDARY_CAPTURE_CLASSES
    is_derived_secondary = "DERIVED" in image_type and "SECONDARY" in image_type
    is_dose = bool(image_type & DOSE_IMAGE_TYPES) or bool(
        DOSE_DESCRIPTION.search(series.description)
    )
    if is_dose:
        return _Rejection(
            "dose",
            f"dose report screens ({_sop_text(series)}, ImageType {_image_type_text(series)})",
        )
    if is_secondary_capture or is_derived_secondary:
        return _Rejection(
            "secondary",
            f"derived or secondary-capture images ({_sop_text(series)}, "
            f"ImageType {_image_type_text(series)})",
        )
    if series.sop_class_uid in MULTI_FRAME_CT_CLASSES or any(
        inst.n_frames > 1 for inst in series.instances
    ):
        return _Rejection("multiframe", "multi-frame (Enhanced CT) images are not supported yet")
    if series.sop_class_uid and series.sop_class_uid != CTImageStorage:
        return _Rejection("secondary", f"not a CT image ({_sop_text(series)})")
    if series.n_images == 1:
        return _Rejection("single", "a single image (localizer or key image), not a volume")
    orientation = series.orientation()
    if orientation is None:
        return _Rejection("geometry", "no ImageOrientationPatient: the slice geometry is unknown")
    if any(inst.position is None for inst in series.instances):
        return _Rejection(
            "geometry", "images without ImagePositionPatient: cannot order the slices"
        )
    try:
        normal = geometry.slice_normal(orientation)
    except ValueError:
        return _Rejection("geometry", "invalid ImageOrientationPatient (parallel row and column)")
    axial_cosine = abs(float(normal[2]))
    if axial_cosine < settings.min_axial_cosine:
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        return _Rejection(
            "not_axial",
            f"not axial ({plane}-like): |slice normal . z| = {axial_cosine:.2f} < "
            f"{settings.min_axial_cosine:.2f}",
        )
    if series.n_images < settings.min_slices:
        return _Rejection(
            "too_few",
            f"series has {series.n_images} images, fewer than the {settings.min_slices} required",
        )
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


def _preference_key(series: Series, settings: SeriesSelectionSettings) -> tuple:
    thickness = series.effective_thickness()
    in_range = thickness is not None and (
        settings.min_slice_thickness_mm - 1e-6
        <= thickness
        <= settings.max_slice_thickness_mm + 1e-6
    )
    kind = kernel_kind(series)
    return (
        0 if in_range else 1,
        1 if kind == "bone" else 0,
        round(thickness, 2) if thickness is not None else math.inf,
        KERNEL_RANK[kind],
        -series.n_images,
        series.series_number if series.series_number is not None else 1 << 30,
        series.series_uid,
    )


def _why_not_preferred(series: Series, chosen: Series, settings: SeriesSelectionSettings) -> str:
    mine = _preference_key(series, settings)
    best = _preference_key(chosen, settings)
    label = _label(chosen)
    if mine[0] != best[0]:
        return (
            f"usable, but {label} has slices within {settings.min_slice_thickness_mm:g}-"
            f"{settings.max_slice_thickness_mm:g} mm and this one has {_mm(series.effective_thickness())}"
        )
    if mine[1] != best[1]:
        return f"usable, but bone reconstructions are de-preferred and {label} is not one"
    if mine[2] != best[2]:
        return (
            f"usable, but {label} has thinner slices ({_mm(chosen.effective_thickness())} "
            f"vs {_mm(series.effective_thickness())})"
        )
    if mine[3] != best[3]:
        return (
            f"usable, but {label} has a preferred reconstruction kernel "
            f"({kernel_kind(chosen)} vs {kernel_kind(series)})"
        )
    if mine[4] != best[4]:
        return f"usable, but {label} has more images ({chosen.n_images} vs {series.n_images})"
    return f"usable, equivalent to {label} (lower series number preferred)"


def _describe(series: Series, settings: SeriesSelectionSettings) -> str:
    thickness = series.effective_thickness()
    parts = [f"axial CT, {series.n_images} images, {_mm(thickness)} slices"]
    if thickness is not None and not (
        settings.min_slice_thickness_mm - 1e-6
        <= thickness
        <= settings.max_slice_thickness_mm + 1e-6
    ):
        parts.append(
            f"outside the preferred {settings.min_slice_thickness_mm:g}-"
            f"{settings.max_slice_thickness_mm:g} mm but the best available"
        )
    kernel = series.convolution_kernel or "no kernel tag"
    parts.append(f"kernel {kernel} ({kernel_kind(series)})")
    return ", ".join(parts)


def _failure_reason(study: Study, rejections: dict[str, _Rejection]) -> str:
    if not study.series:
        return "the study has no image series"
    categories = [rejections[s.series_uid].category for s in study.series]
    if all(category == "not_ct" for category in categories):
        modalities = sorted({s.modality or "missing" for s in study.series})
        return f"no CT series: modality {', '.join(modalities)}"
    ct_series = [s for s in study.series if rejections[s.series_uid].category != "not_ct"]
    ct_categories = {rejections[s.series_uid].category for s in ct_series}
    if ct_categories <= {"localizer", "dose", "secondary", "single"}:
        kinds = []
        if "localizer" in ct_categories:
            kinds.append("a localizer")
        if "single" in ct_categories:
            kinds.append("single images")
        if "dose" in ct_categories:
            kinds.append("dose report screens")
        if "secondary" in ct_categories:
            kinds.append("derived or secondary-capture images")
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
