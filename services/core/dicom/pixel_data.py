"""Pixel data of CT images as Hounsfield units, one slice at a time.

Uncompressed little-endian slices are read straight from the end of the file into a
reused buffer (``read_native_pixels``: no pydicom data set per slice); every other
transfer syntax goes through pydicom and its pylibjpeg plugins. A slice that cannot be
decoded makes the series fail with a SeriesDataError naming the file and the syntax.
"""

from __future__ import annotations

import os

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from services.core.arrays import Float32Array, HuVolume, IntegerArray
from services.core.dicom import geometry
from services.core.dicom.objects import Instance
from services.core.dicom.values import (
    float_or_none,
    int_or_none,
    tag_value,
    transfer_syntax_uid,
    uid_name,
)
from services.core.errors import SeriesDataError

# Uncompressed little-endian transfer syntaxes (UID -> implicit VR), read without pydicom.
NATIVE_LITTLE_ENDIAN_SYNTAXES: dict[str, bool] = {
    ImplicitVRLittleEndian: True,
    ExplicitVRLittleEndian: False,
}
PIXEL_DATA_TAG_BYTES = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


def read_hu(
    kept: list[Instance], stack: geometry.StackAnalysis, rows: int, columns: int
) -> tuple[HuVolume, int]:
    """Decode the slices into one preallocated float32 array, resampling only if needed.

    Returns the HU array and how many images lacked RescaleSlope/RescaleIntercept.
    """
    if stack.regular:
        sources = np.arange(len(kept), dtype=np.int64)
        weights = np.zeros(len(kept))
    else:
        sources, weights = geometry.regular_grid(stack.positions_mm, stack.spacing_mm)
    hu = np.empty((sources.size, rows, columns), dtype=np.float32)
    # One raw buffer for the whole series: a fresh 0.5 MB allocation per slice costs more
    # in page faults than reading the slice.
    raw_buffer = bytearray()
    rescale_missing = 0
    if stack.regular:
        # Every slice is decoded straight into its place in the volume.
        for index, instance in enumerate(kept):
            rescale_missing += 0 if decode_hu(instance, rows, columns, hu[index], raw_buffer) else 1
        return hu, rescale_missing

    cache: dict[int, Float32Array] = {}

    def slice_hu(index: int) -> Float32Array:
        nonlocal rescale_missing
        if index not in cache:
            for old in [key for key in cache if key < index - 1]:
                del cache[old]  # the plan only moves forward: older slices are done
            values = np.empty((rows, columns), dtype=np.float32)
            had_rescale = decode_hu(kept[index], rows, columns, values, raw_buffer)
            rescale_missing += 0 if had_rescale else 1
            cache[index] = values
        return cache[index]

    for target, (source, weight) in enumerate(zip(sources, weights, strict=True)):
        lower = slice_hu(int(source))
        if weight == 0.0:
            hu[target] = lower
        else:
            upper = slice_hu(int(source) + 1)
            np.multiply(lower, np.float32(1.0 - weight), out=hu[target])
            hu[target] += np.float32(weight) * upper
    return hu, rescale_missing


def decode_hu(
    instance: Instance, rows: int, columns: int, out: Float32Array, raw_buffer: bytearray
) -> bool:
    """HU of one image into ``out``: stored value x RescaleSlope + RescaleIntercept (float32).

    Returns whether the image had both rescale tags.
    """
    name = instance.path.name
    dataset: Dataset = instance.header  # read_studies read every tag before the pixel data
    try:
        pixels = read_native_pixels(instance, rows, columns, raw_buffer)
    except OSError:
        pixels = None  # the general path below reports the problem
    if pixels is None:
        try:
            dataset = pydicom.dcmread(instance.path, force=True)
            _ensure_transfer_syntax(dataset)
            pixels = dataset.pixel_array
        except Exception as error:  # any decoder failure is a data error
            syntax = transfer_syntax_name(instance.header) or "unknown transfer syntax"
            detail = " ".join(str(error).split())  # decoder messages span lines
            raise SeriesDataError(
                f"cannot decode the pixel data of {name} ({syntax}): "
                f"{type(error).__name__}: {detail}"
            ) from error
    if pixels.shape != (rows, columns):
        raise SeriesDataError(
            f"{name}: pixel data of shape {pixels.shape}, expected one "
            f"{rows}x{columns} grayscale image"
        )
    slope = float_or_none(tag_value(dataset, "RescaleSlope"))
    intercept = float_or_none(tag_value(dataset, "RescaleIntercept"))
    had_rescale = slope is not None and intercept is not None
    np.copyto(out, pixels, casting="unsafe")
    if slope is not None and slope != 1.0:
        out *= np.float32(slope)
    if intercept:
        out += np.float32(intercept)
    return had_rescale


def read_native_pixels(
    instance: Instance, rows: int, columns: int, buffer: bytearray | None = None
) -> IntegerArray | None:
    """The stored values of an uncompressed little-endian image, read straight from its file.

    Parsing a whole file again with pydicom for its pixels took most of load_volume's time
    (read_studies has already parsed every header). Scanners write the pixel data as the
    last element, so it is read from the end of the file, but only after checking that the
    bytes before it are the PixelData tag with exactly the expected length. Anything else
    (compressed or big-endian data, multi-frame or colour images, trailing elements,
    odd headers) returns None and takes pydicom's general path. The values are what
    pydicom's ``pixel_array`` returns, unused high bits corrected as it does.

    With ``buffer`` the bytes are read into it (grown as needed) and the result is a view
    of it, valid until the buffer is used again.
    """
    header = instance.header
    implicit_vr = NATIVE_LITTLE_ENDIAN_SYNTAXES.get(transfer_syntax_uid(header))
    if implicit_vr is None or instance.n_frames != 1:
        return None
    bits_allocated = int_or_none(tag_value(header, "BitsAllocated"))
    representation = int_or_none(tag_value(header, "PixelRepresentation")) or 0
    samples = int_or_none(tag_value(header, "SamplesPerPixel")) or 1
    if bits_allocated not in (8, 16, 32) or samples != 1 or representation not in (0, 1):
        return None
    assert bits_allocated is not None  # one of 8, 16, 32
    bits_stored = int_or_none(tag_value(header, "BitsStored")) or bits_allocated
    if not 0 < bits_stored <= bits_allocated:
        return None
    signed = representation == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    n_bytes = rows * columns * dtype.itemsize
    value_length = n_bytes + n_bytes % 2  # element values have even lengths
    element_header = 8 if implicit_vr else 12
    size = element_header + value_length
    raw = bytearray(size) if buffer is None else buffer
    if len(raw) < size:
        raw.extend(bytes(size - len(raw)))
    view = memoryview(raw)[:size]
    with open(instance.path, "rb") as handle:
        start = os.fstat(handle.fileno()).st_size - size
        if start < 0:
            return None
        handle.seek(start)
        if handle.readinto(view) != size:
            return None
    if not _is_pixel_data_element(bytes(view[:element_header]), value_length, implicit_vr):
        return None
    pixels = np.frombuffer(raw, dtype=dtype, count=rows * columns, offset=element_header)
    pixels = pixels.reshape(rows, columns)
    if bits_stored < bits_allocated:
        # Ignore the unused high bits, sign-extending signed values (PS3.5 8.1.1).
        shift = bits_allocated - bits_stored
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)
    return pixels


def _is_pixel_data_element(head: bytes, value_length: int, implicit_vr: bool) -> bool:
    """True when ``head`` is the PixelData element's tag (and VR) with ``value_length``."""
    if head[:4] != PIXEL_DATA_TAG_BYTES:
        return False
    if implicit_vr:
        return int.from_bytes(head[4:8], "little") == value_length
    if head[4:6] not in (b"OW", b"OB") or head[6:8] != b"\x00\x00":
        return False
    return int.from_bytes(head[8:12], "little") == value_length


def _ensure_transfer_syntax(dataset: Dataset) -> None:
    """Files written without a file meta header (no preamble) lack the transfer syntax."""
    meta = dataset.file_meta
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(dataset, "original_encoding", (True, True))
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif little:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRBigEndian


def transfer_syntax_name(header: Dataset) -> str | None:
    """The transfer syntax's registered name (its UID when unregistered), None if absent."""
    return uid_name(transfer_syntax_uid(header)) or None
