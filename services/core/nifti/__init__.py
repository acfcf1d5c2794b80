"""NIfTI volumes (``.nii``, ``.nii.gz``): reading (reader.py), the CT-RATE convention
(ct_rate.py) and one file as one study (study.py)."""

from services.core.nifti.reader import (
    NIFTI_SUFFIXES,
    NiftiVolume,
    has_nifti_suffix,
    load_nifti_volume,
    nifti_version,
    volume_from_affine,
)

__all__ = [
    "NIFTI_SUFFIXES",
    "NiftiVolume",
    "has_nifti_suffix",
    "load_nifti_volume",
    "nifti_version",
    "volume_from_affine",
]
