"""Slice-viewer data of a study's series: a small, display-oriented copy of the HU volume.

The web UI scrolls through slices in three planes and applies window presets or a free
window/level in the browser, so the data must hold HU (not grey levels of one window) and
be small. For every study whose series was read (a refused one too: a reader must see why
it was refused) the adapter writes

    results/<task_id>/viewer/study<N>.json   what the data is (shape, spacing, code table)
    results/<task_id>/viewer/study<N>.bin    zlib-compressed uint8 codes, C order

The volume is reoriented to the display frame: axis 0 runs superior -> inferior, axis 1
anterior -> posterior, axis 2 patient right -> left (radiological convention: an axial
slice shows the patient's right on the left of the image). It is cropped in-plane to the
body with a margin, and each axis is averaged over blocks of voxels: as many as fit in
MIN_SPACING_MM, more when the axis would keep over MAX_SLICES / MAX_IN_PLANE voxels. HU are stored as 8-bit codes through a
piecewise-linear table whose steps stay below CT noise where the windows look: 8 HU in
the lungs, 4 HU in soft tissue, 40 HU in bone (CODE_KNOTS_HU); ``codes_hu`` in the JSON
turns a code back into HU.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.core.arrays import Float32Array, Float64Array, FloatArray, HuVolume, UInt8Array
from services.core.volume import Volume

VIEWER_FORMAT_VERSION = 2  # 2: interpolated_axis, interpolated_slices
# HU at the knots of the code table and the code each knot gets (linear in between).
CODE_KNOTS_HU = (-1024.0, -900.0, -200.0, 300.0, 1500.0, 3072.0)
CODE_KNOTS = (0.0, 4.0, 92.0, 217.0, 247.0, 255.0)
MIN_SPACING_MM = (
    1.5  # thinner voxels are averaged up to this: bytes, not what a screening view needs
)
MAX_SLICES = 128  # along the superior-inferior axis (300 slices of 1 mm: 100 slabs of 3 mm)
MAX_IN_PLANE = 256  # along each in-plane axis, after cropping
BODY_HU = -500.0  # above this: body, table or clothes; below: air
CROP_MARGIN_MM = 10.0
COMPRESSION_LEVEL = 1  # zlib: CT noise barely compresses; level 6 saves 3% for twice the time
AXIS_NAMES = ("superior to inferior", "anterior to posterior", "patient right to left")


@dataclass(frozen=True)
class DisplayFrame:
    """How the array axes of a Volume map onto the display frame."""

    source_axis: tuple[int, int, int]  # display axis d takes the volume's axis source_axis[d]
    flipped: tuple[bool, bool, bool]  # display axis d runs against the source axis


# Display axis d follows LPS component LPS_COMPONENT[d] in the direction LPS_SIGN[d]: LPS z
# grows toward superior (so superior -> inferior is -z), y toward posterior, x toward left.
LPS_COMPONENT = (2, 1, 0)
LPS_SIGN = (-1.0, 1.0, 1.0)
STORED_ORDER = DisplayFrame((0, 1, 2), (False, False, False))


def display_frame(volume: Volume) -> DisplayFrame:
    """The nearest display axis of each volume axis (a tilted or oblique series is shown
    along the axes it is closest to)."""
    directions = volume.axis_directions()
    source: dict[int, int] = {}
    flipped: dict[int, bool] = {}
    for axis in range(3):
        component = int(np.argmax(np.abs(directions[axis])))
        display = LPS_COMPONENT.index(component)
        if display in source:  # two axes near one direction: keep the stored order
            return STORED_ORDER
        source[display] = axis
        flipped[display] = bool(np.sign(directions[axis][component]) != LPS_SIGN[display])
    return DisplayFrame((source[0], source[1], source[2]), (flipped[0], flipped[1], flipped[2]))


def body_bounds(hu: HuVolume, axes: tuple[int, ...], margin: tuple[int, ...]) -> list[slice]:
    """Per array axis, the slice that keeps the body (HU > BODY_HU) on ``axes`` plus a margin;
    found on a coarse sample, so it costs milliseconds on a 300-slice study."""
    steps = [max(1, size // 64) for size in hu.shape]
    sample = hu[:: steps[0], :: steps[1], :: steps[2]] > BODY_HU
    bounds = [slice(0, size) for size in hu.shape]
    if not sample.any():
        return bounds
    for axis in axes:
        others = tuple(other for other in range(3) if other != axis)
        present = np.flatnonzero(sample.any(axis=others))
        start = max(0, int(present[0]) * steps[axis] - margin[axis])
        stop = min(hu.shape[axis], (int(present[-1]) + 1) * steps[axis] + margin[axis])
        bounds[axis] = slice(start, stop)
    return bounds


def block_factors(
    shape: tuple[int, ...], spacing: tuple[float, ...], limits: tuple[int, ...]
) -> tuple[int, ...]:
    """Voxels averaged per output voxel along each axis."""
    return tuple(
        max(1, math.ceil(size / limit), int(MIN_SPACING_MM // max(step, 1e-6)))
        for size, step, limit in zip(shape, spacing, limits, strict=True)
    )


def block_mean(array: Float32Array, factors: tuple[int, ...]) -> Float32Array:
    """Mean over blocks of ``factors`` voxels (a remainder at the end of an axis is dropped).

    One axis at a time, as sums of strided views (three times faster than reshape-and-sum
    on a cropped, non-contiguous view); each step reads the previous, smaller result.
    """
    result = array[
        tuple(slice(0, (size // f) * f) for size, f in zip(array.shape, factors, strict=True))
    ]
    for axis, factor in enumerate(factors):
        if factor == 1:
            continue
        index: list[slice] = [slice(None)] * result.ndim
        index[axis] = slice(0, None, factor)
        total = np.array(result[tuple(index)], dtype=np.float32)
        for offset in range(1, factor):
            index[axis] = slice(offset, None, factor)
            total += result[tuple(index)]
        result = total
    count = int(np.prod(factors))
    if count == 1:
        return np.array(result, dtype=np.float32)
    return result / np.float32(count)


def codes_hu() -> Float64Array:
    """HU of each of the 256 codes."""
    return np.interp(np.arange(256, dtype=np.float64), CODE_KNOTS, CODE_KNOTS_HU)


LOWEST_HU = int(CODE_KNOTS_HU[0])
# The code of every whole HU from LOWEST_HU to the table's top: encoding is one lookup.
_CODE_OF_HU = np.rint(
    np.interp(np.arange(LOWEST_HU, int(CODE_KNOTS_HU[-1])), CODE_KNOTS_HU, CODE_KNOTS)
).astype(np.uint8)


def encode_hu(hu: FloatArray) -> UInt8Array:
    """uint8 codes of HU values (rounded to whole HU, clipped to the table's range)."""
    index = np.clip(hu, LOWEST_HU, LOWEST_HU + len(_CODE_OF_HU) - 1) - (LOWEST_HU - 0.5)
    return _CODE_OF_HU[index.astype(np.int32)]


@dataclass(frozen=True)
class ViewerStack:
    codes: UInt8Array  # uint8 (slices, rows, columns) in the display frame
    spacing_mm: tuple[float, float, float]
    source_shape: tuple[int, int, int]
    factors: tuple[int, int, int]  # in the display frame
    # The display axis the series' slices stack along (0 for an axial series) and the
    # indices along it that hold an interpolated slice (in whole or in part of a block).
    interpolated_axis: int = 0
    interpolated_slices: tuple[int, ...] = ()

    def metadata(self, data_file: str) -> dict[str, object]:
        return {
            "format_version": VIEWER_FORMAT_VERSION,
            "data_file": data_file,
            "encoding": "zlib-compressed uint8 codes, C order (slice, row, column)",
            "shape": list(self.codes.shape),
            "spacing_mm": [round(value, 4) for value in self.spacing_mm],
            "axes": list(AXIS_NAMES),
            "codes_hu": [round(float(value), 2) for value in codes_hu()],
            "source_shape": list(self.source_shape),
            "block_factors": list(self.factors),
            "interpolated_axis": self.interpolated_axis,
            "interpolated_slices": list(self.interpolated_slices),
        }


def viewer_stack(volume: Volume) -> ViewerStack:
    """The display-frame stack of a volume: cropped, block-averaged, encoded."""
    frame = display_frame(volume)
    hu = volume.hu
    spacing = tuple(float(value) for value in volume.spacing_mm)
    limits = [0, 0, 0]
    for display, axis in enumerate(frame.source_axis):
        limits[axis] = MAX_SLICES if display == 0 else MAX_IN_PLANE
    in_plane = tuple(frame.source_axis[1:])
    margin = tuple(round(CROP_MARGIN_MM / max(step, 1e-6)) for step in spacing)
    bounds = body_bounds(hu, in_plane, margin)
    cropped = hu[tuple(bounds)]
    factors = block_factors(cropped.shape, spacing, tuple(limits))
    averaged = block_mean(cropped, factors)
    oriented = np.transpose(averaged, frame.source_axis)
    flips = tuple(slice(None, None, -1) if flip else slice(None) for flip in frame.flipped)
    codes = np.ascontiguousarray(encode_hu(oriented[flips]))
    first, second, third = frame.source_axis
    return ViewerStack(
        codes=codes,
        spacing_mm=(
            spacing[first] * factors[first],
            spacing[second] * factors[second],
            spacing[third] * factors[third],
        ),
        source_shape=volume.shape,
        factors=(factors[first], factors[second], factors[third]),
        interpolated_axis=frame.source_axis.index(0),
        interpolated_slices=displayed_slices(
            volume.interpolated_slices, frame, bounds[0], factors[0], codes.shape
        ),
    )


def displayed_slices(
    slices: tuple[int, ...],
    frame: DisplayFrame,
    kept: slice,
    factor: int,
    shape: tuple[int, ...],
) -> tuple[int, ...]:
    """The display indices, along the axis the volume's axis 0 became, of the blocks that
    hold any of ``slices`` (volume axis 0 indices): the crop ``kept`` of that axis, its
    block ``factor`` and the flip of the display frame applied."""
    display = frame.source_axis.index(0)
    size = int(shape[display])
    start = kept.start or 0
    found = set()
    for index in slices:
        block = (index - start) // factor
        if index >= start and block < size:
            found.add(size - 1 - block if frame.flipped[display] else block)
    return tuple(sorted(found))


def write_viewer(stack: ViewerStack, directory: Path, prefix: str) -> list[Path]:
    """``<prefix>.json`` and ``<prefix>.bin`` in ``directory``; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{prefix}.bin"
    data.write_bytes(zlib.compress(stack.codes.tobytes(), COMPRESSION_LEVEL))
    meta = directory / f"{prefix}.json"
    meta.write_text(json.dumps(stack.metadata(data.name)), encoding="utf-8")
    return [meta, data]


def read_viewer_codes(meta_path: Path) -> tuple[dict[str, Any], UInt8Array]:
    """The metadata and the codes array back (tests, tools)."""
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    raw = zlib.decompress((meta_path.parent / str(metadata["data_file"])).read_bytes())
    shape = tuple(int(value) for value in metadata["shape"])
    return metadata, np.frombuffer(raw, dtype=np.uint8).reshape(shape)
