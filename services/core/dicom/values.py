"""Reading DICOM values safely: the one place that turns element values into Python types.

pydicom converts values lazily, so a malformed number (a DS of "abc", an odd-length
element) raises only when it is read. Every function here returns a default instead: a
broken tag must make its file or series fail with a reason, never crash the worker.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from services.core.arrays import Float64Array


def tag_value(dataset: Dataset | None, keyword: str, default: object = None) -> object:
    """``dataset.get(keyword)``, or ``default`` when absent or its value cannot be parsed."""
    if dataset is None:
        return default
    try:
        return dataset.get(keyword, default)
    except Exception:  # noqa: BLE001 - any conversion failure means "no usable value"
        return default


def text(value: object) -> str:
    """A value as stripped text; multi-valued elements joined with a backslash."""
    if value is None:
        return ""
    if isinstance(value, pydicom.dataelem.DataElement):
        value = value.value
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(item) for item in value).strip()
    return str(value).strip()


def text_values(value: object, *, upper: bool = True) -> list[str]:
    """The non-empty parts of a multi-valued (or backslash-separated) value."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        parts = [str(item).strip() for item in value]
    else:
        parts = [part.strip() for part in str(value).split("\\")]
    return [part.upper() if upper else part for part in parts if part]


def float_or_none(value: object) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(str(value))
    except (TypeError, ValueError):
        return None


def int_or_none(value: object) -> int | None:
    """An integer value; a decimal string of a whole number ("512.0") counts as one."""
    number = float_or_none(value)
    if number is None or not np.isfinite(number) or not number.is_integer():
        return None
    return int(number)


def vector(value: object, length: int) -> Float64Array | None:
    """A finite float64 vector of exactly ``length`` numbers, or None."""
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return None
    try:
        numbers = np.asarray([float(item) for item in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if numbers.shape != (length,) or not np.all(np.isfinite(numbers)):
        return None
    return numbers


def sop_class_uid(header: Dataset) -> str:
    """SOPClassUID, falling back to the file meta's MediaStorageSOPClassUID."""
    value = text(tag_value(header, "SOPClassUID"))
    if not value:
        value = text(tag_value(getattr(header, "file_meta", None), "MediaStorageSOPClassUID"))
    return value


def transfer_syntax_uid(header: Dataset) -> str:
    """The file meta's TransferSyntaxUID, "" when the file has no meta header."""
    return text(tag_value(getattr(header, "file_meta", None), "TransferSyntaxUID"))


def uid_name(uid: str) -> str:
    """The registered name of a UID ("CT Image Storage"), or the UID itself."""
    return str(pydicom.uid.UID(uid).name) if uid else ""
