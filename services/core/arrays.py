"""Named numpy array types: what an array holds, in which dtype, shape and units.

numpy's typing checks the dtype only (``NDArray[np.float32]``); the shape, units and range
are the comment beside each name, so that a signature says what it takes and returns.
Domain names first, then the plain dtypes for everything else.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

# -- by dtype ----------------------------------------------------------------------------

Float32Array: TypeAlias = NDArray[np.float32]
Float64Array: TypeAlias = NDArray[np.float64]
FloatArray: TypeAlias = NDArray[np.floating[Any]]  # float32 or float64 (either is accepted)
Int16Array: TypeAlias = NDArray[np.int16]
Int64Array: TypeAlias = NDArray[np.int64]
IntegerArray: TypeAlias = NDArray[np.integer[Any]]  # any integer dtype (stored DICOM values)
UInt8Array: TypeAlias = NDArray[np.uint8]
BoolArray: TypeAlias = NDArray[np.bool_]
AnyArray: TypeAlias = NDArray[Any]  # dtype unknown to the code (np.load, a model's raw output)

# -- images and volumes ------------------------------------------------------------------

HuVolume: TypeAlias = NDArray[np.float32]  # HU, (slices, rows, columns) as Volume.hu holds it
ModelVolume: TypeAlias = NDArray[np.float32]  # one model input volume (D, H, W), SLP+, [-1, 1]
ModelInput: TypeAlias = NDArray[np.float32]  # [B, 1, D, H, W] ([B, 1, 240, 480, 480]), [-1, 1]
GreyImage: TypeAlias = NDArray[np.uint8]  # (rows, columns) display grey levels 0..255

# -- model outputs -----------------------------------------------------------------------

Embedding: TypeAlias = NDArray[np.float32]  # L2-normalised, [..., embedding_dim] (CT-CLIP: 512)
Probabilities: TypeAlias = NDArray[np.float32]  # in [0, 1]: [B] or [B, n_labels]

# -- body-part regression ----------------------------------------------------------------

BprSlices: TypeAlias = NDArray[np.float32]  # network input [N, 1, 128, 128], [-1, 1]
BprScores: TypeAlias = NDArray[np.float32]  # raw network scores [N, 1]

# -- patient geometry (DICOM LPS, mm) ----------------------------------------------------

LpsVector: TypeAlias = NDArray[np.float64]  # (3,) direction (unit) or point in mm, DICOM LPS
LpsDirections: TypeAlias = NDArray[np.float64]  # (3, 3): row i is the LPS direction of axis i
Orientation: TypeAlias = NDArray[np.float64]  # (6,) ImageOrientationPatient: row, column
PositionsMm: TypeAlias = NDArray[np.float64]  # (n,) positions along one axis, mm
