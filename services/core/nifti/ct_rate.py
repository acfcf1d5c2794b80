"""The CT-RATE convention (docs/ARCHITECTURE.md, "Contracts: NIfTI and CT-RATE").

CT-RATE, the data set CT-CLIP was trained on, stores raw values in NIfTI and keeps the
rescale and spacing of every volume in a metadata CSV (``VolumeName``, ``RescaleSlope``,
``RescaleIntercept``, ``XYSpacing`` as text like ``"[0.75, 0.75]"``, ``ZSpacing``).
CT-CLIP's own loader ignores the affine: it takes the array ``x[i, j, k]`` as nibabel's
``get_fdata()`` gives it, applies the CSV's slope and intercept, and moves the last axis
first: ``x.transpose(2, 0, 1)`` is its model volume, read as (superior, left, posterior)
with spacing (ZSpacing, XY, XY). It parses XYSpacing by taking the first number, used for
both in-plane axes; so does this module.

`ct_rate_volume` gives the `Volume` whose standard preprocessing is exactly that loader's
output: the geometry is the one the loader assumes, not the file's affine.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from services.core.arrays import FloatArray
from services.core.errors import ConfigurationError
from services.core.volume import Volume

VOLUME_NAME_COLUMN = "VolumeName"
REQUIRED_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
NIFTI_NAME_SUFFIXES = (".nii.gz", ".nii")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# The directions CT-CLIP's loader assumes for x.transpose(2, 0, 1): superior, left, posterior.
_SUPERIOR = np.array([0.0, 0.0, 1.0])
_LEFT = np.array([1.0, 0.0, 0.0])
_POSTERIOR = np.array([0.0, 1.0, 0.0])


class CtRateMetadataError(ConfigurationError):
    """The CT-RATE metadata CSV cannot be used (a deployment problem, not a study's)."""


class CtRateVolumeInfo(BaseModel):
    """One row of the metadata CSV: how CT-CLIP reads that volume."""

    model_config = ConfigDict(frozen=True)

    volume_name: str
    slope: float
    intercept: float
    xy_spacing_mm: float
    z_spacing_mm: float


def volume_key(name: str) -> str:
    """The name a file and a CSV row are matched by: without a .nii/.nii.gz suffix."""
    for suffix in NIFTI_NAME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _number(text: str, column: str, row: int, path: Path) -> float:
    match = _NUMBER.search(text or "")
    value = float(match.group()) if match else math.nan
    if not math.isfinite(value):
        raise CtRateMetadataError(f"{path.name} row {row}: {column} {text!r} is not a number")
    return value


def read_ct_rate_metadata(path: Path) -> dict[str, CtRateVolumeInfo]:
    """The CSV's rows by `volume_key` of VolumeName; CtRateMetadataError when unusable."""
    path = Path(path)
    stat = _stat(path)
    return dict(_read_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as error:
        raise CtRateMetadataError(f"CT-RATE metadata {path} cannot be read: {error}") from error


@functools.lru_cache(maxsize=4)
def _read_cached(path_text: str, _mtime_ns: int, _size: int) -> dict[str, CtRateVolumeInfo]:
    """Parsed once per file version: a data set's CSV has tens of thousands of rows."""
    path = Path(path_text)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [column for column in REQUIRED_COLUMNS if column not in columns]
            if missing:
                raise CtRateMetadataError(
                    f"{path.name} lacks column(s) {missing} (CT-RATE metadata needs "
                    f"{list(REQUIRED_COLUMNS)})"
                )
            rows: dict[str, CtRateVolumeInfo] = {}
            for number, row in enumerate(reader, start=2):
                name = (row[VOLUME_NAME_COLUMN] or "").strip()
                if not name:
                    continue
                xy = _number(row["XYSpacing"], "XYSpacing", number, path)
                z = _number(row["ZSpacing"], "ZSpacing", number, path)
                if xy <= 0 or z <= 0:
                    raise CtRateMetadataError(f"{path.name} row {number}: spacing must be > 0")
                rows[volume_key(name)] = CtRateVolumeInfo(
                    volume_name=name,
                    slope=_number(row["RescaleSlope"], "RescaleSlope", number, path),
                    intercept=_number(row["RescaleIntercept"], "RescaleIntercept", number, path),
                    xy_spacing_mm=xy,
                    z_spacing_mm=z,
                )
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CtRateMetadataError(f"CT-RATE metadata {path} cannot be read: {error}") from error
    return rows


def ct_rate_volume(values: FloatArray, info: CtRateVolumeInfo) -> Volume:
    """The Volume CT-CLIP's loader sees: ``slope * x + intercept`` transposed (2, 0, 1).

    ``values`` is ``x[i, j, k]`` as nibabel's ``get_fdata()`` gives it (the header's own
    scl_slope/scl_inter applied, as get_fdata applies them).
    """
    hu = np.ascontiguousarray(values.transpose(2, 0, 1), dtype=np.float32)
    hu *= np.float32(info.slope)
    hu += np.float32(info.intercept)
    return Volume(
        hu=hu,
        row_cosine=_POSTERIOR.copy(),  # axis 2 (columns): posterior
        column_cosine=_LEFT.copy(),  # axis 1 (rows): left
        slice_normal=_SUPERIOR.copy(),  # axis 0: superior
        spacing_mm=(info.z_spacing_mm, info.xy_spacing_mm, info.xy_spacing_mm),
        origin_mm=np.zeros(3),
    )
