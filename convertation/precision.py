"""Reduced precision for the encoder, admitted only by measured parity with FP32.

``python -m convertation.build_repository ... --precision int8 --parity-volumes A.npy ...``
builds the FP32 repository as usual, then quantises the encoder (ONNX Runtime's dynamic
INT8 quantisation of the MatMul weights; the vector quantiser's codebook product stays
FP32, since its argmax picks the code) and runs both on the reference volumes: model inputs
``[1, 1, D, H, W]`` (``python -m services.batch IN OUT --save-model-input DIR`` writes
them). The INT8 encoder replaces the FP32 one only if, on every volume, the L2-normalised
embedding keeps the tolerance (cosine >= 0.999 and max abs diff <= 0.01 by default, the
benchmark's INT8 tolerance). Otherwise the build is refused with what was measured and by
how much it missed; the FP32 repository it built stays complete. The metadata records the
precision, the tolerance and the parity of every volume.

Weights whose embedding moves by more than the tolerance under INT8 rounding (the demo
weights: their vector quantiser flips codes under any small change of its input) are
always refused; weights whose embedding is stable pass.

BF16 (OpenVINO's CPU plugin on AVX512_BF16/AMX hosts) is not offered: no runtime of this
stack (onnxruntime in the batch and in Triton's python flavour) runs it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from convertation.errors import BuildError
from services.core.arrays import Embedding, ModelInput

DEFAULT_MIN_COSINE = 0.999
DEFAULT_MAX_ABS_DIFF = 0.01
CPU = ["CPUExecutionProvider"]


class Precision(str, Enum):
    FP32 = "fp32"
    INT8 = "int8"


@dataclass(frozen=True)
class ParityTolerance:
    min_cosine: float = DEFAULT_MIN_COSINE
    max_abs_diff: float = DEFAULT_MAX_ABS_DIFF

    def describe(self) -> str:
        return f"cosine >= {self.min_cosine:g} and max abs diff <= {self.max_abs_diff:g}"


@dataclass(frozen=True)
class Parity:
    """The candidate's L2-normalised embedding against FP32 on one volume."""

    volume: str
    cosine: float
    max_abs_diff: float

    def misses(self, tolerance: ParityTolerance) -> list[str]:
        """What is outside the tolerance, with the margin; empty when within."""
        found = []
        if self.cosine < tolerance.min_cosine:
            short = tolerance.min_cosine - self.cosine
            found.append(
                f"cosine {self.cosine:.6f} < {tolerance.min_cosine:g} (short by {short:.2g})"
            )
        if self.max_abs_diff > tolerance.max_abs_diff:
            over = self.max_abs_diff - tolerance.max_abs_diff
            found.append(
                f"max abs diff {self.max_abs_diff:.3g} > {tolerance.max_abs_diff:g} (over by {over:.2g})"
            )
        return found


@dataclass(frozen=True)
class PrecisionVerdict:
    precision: Precision
    tolerance: ParityTolerance
    parities: list[Parity]

    @property
    def accepted(self) -> bool:
        return bool(self.parities) and not any(p.misses(self.tolerance) for p in self.parities)

    def describe(self) -> str:
        measured = "; ".join(
            f"{p.volume}: "
            + (
                ", ".join(p.misses(self.tolerance))
                or f"cosine {p.cosine:.6f}, max abs diff {p.max_abs_diff:.3g} (within)"
            )
            for p in self.parities
        )
        verdict = "accepted" if self.accepted else "refused"
        return (
            f"{self.precision.value} encoder {verdict}: tolerance {self.tolerance.describe()} "
            f"on the L2-normalised embedding against FP32; {measured}"
        )


class PrecisionRefused(BuildError):
    """The reduced-precision encoder missed the parity tolerance (the verdict says by how much)."""

    def __init__(self, verdict: PrecisionVerdict) -> None:
        super().__init__(verdict.describe() + "; the FP32 encoder is kept")
        self.verdict = verdict


def load_parity_volumes(
    paths: list[Path], target_shape: tuple[int, int, int]
) -> dict[str, ModelInput]:
    """Model inputs saved as .npy, each ``[1, 1, D, H, W]`` (or ``[D, H, W]``) of the target."""
    if not paths:
        raise BuildError("a reduced precision needs --parity-volumes (model inputs saved as .npy)")
    volumes = {}
    for path in paths:
        try:
            array = np.load(path)
        except (OSError, ValueError) as error:
            raise BuildError(f"cannot read the parity volume {path}: {error}") from error
        if tuple(array.shape[-3:]) != tuple(target_shape) or array.size != int(
            np.prod(target_shape)
        ):
            raise BuildError(
                f"parity volume {path} has shape {array.shape}; the encoder takes "
                f"[1, 1, {', '.join(map(str, target_shape))}]"
            )
        volumes[Path(path).name] = array.astype(np.float32).reshape(1, 1, *target_shape)
    return volumes


def quantise_int8(fp32: Path, output: Path, codebook_size: int) -> Path:
    """ONNX Runtime's dynamic INT8 quantisation of the MatMul weights, the products with the
    codebook (a weight with ``codebook_size`` in its shape) kept FP32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    codebook_products = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and any(codebook_size in shapes.get(name, ()) for name in node.input)
    ]
    del model.graph.value_info[:]  # stale exporter entries fail the quantiser's inference
    with tempfile.TemporaryDirectory(prefix="cts-int8-", dir=Path(output).parent) as folder:
        cleaned = Path(folder) / "fp32.onnx"
        onnx.save(model, str(cleaned))
        del model
        quantize_dynamic(
            str(cleaned),
            str(output),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=codebook_products,
            # The shape inference the quantiser runs knows no com.microsoft operators (the
            # fused attention): their outputs are FP32.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return Path(output)


def embedding_parity(name: str, reference: Embedding, candidate: Embedding) -> Parity:
    a, b = reference.ravel().astype(np.float64), candidate.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return Parity(name, cosine, float(np.abs(a - b).max()))


def measure_parity(fp32: Path, candidate: Path, volumes: dict[str, ModelInput]) -> list[Parity]:
    """Both graphs on every volume, one at a time (a full-size volume is 221 MB)."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(path), providers=CPU) for path in (fp32, candidate)]
    parities = []
    for name, volume in volumes.items():
        reference, result = (s.run(None, {s.get_inputs()[0].name: volume})[0] for s in sessions)
        parities.append(embedding_parity(name, reference, result))
    return parities


def int8_verdict(
    fp32: Path, candidate: Path, volumes: dict[str, ModelInput], tolerance: ParityTolerance
) -> PrecisionVerdict:
    return PrecisionVerdict(Precision.INT8, tolerance, measure_parity(fp32, candidate, volumes))


def apply_int8(
    encoder: Path, volumes: dict[str, ModelInput], tolerance: ParityTolerance, codebook_size: int
) -> PrecisionVerdict:
    """Quantise ``encoder`` (a model.onnx), measure, and replace it only when accepted;
    raises PrecisionRefused (the file untouched) otherwise."""
    encoder = Path(encoder)
    with tempfile.TemporaryDirectory(prefix="cts-precision-", dir=encoder.parent) as folder:
        candidate = quantise_int8(encoder, Path(folder) / "int8.onnx", codebook_size)
        verdict = int8_verdict(encoder, candidate, volumes, tolerance)
        if not verdict.accepted:
            raise PrecisionRefused(verdict)
        shutil.move(str(candidate), encoder)
    return verdict


def reduce_encoder_precision(
    repository: Path,
    precision: Precision,
    volumes: dict[str, ModelInput],
    tolerance: ParityTolerance,
) -> PrecisionVerdict:
    """The gate on a built repository: the encoder replaced and the metadata updated (its
    sha256, the model version, the precision and its parity), or PrecisionRefused."""
    from services.core.checksums import sha256_of
    from services.core.model_metadata import (
        ENCODER_NAME,
        EncoderPrecision,
        PrecisionParity,
        read_metadata,
        write_metadata,
    )

    if precision is not Precision.INT8:
        raise BuildError(f"no reduced-precision build for {precision.value}")
    repository = Path(repository)
    metadata = read_metadata(repository)
    encoder = repository / ENCODER_NAME / "1" / "model.onnx"
    codebook_size = int(metadata.ctvit_config["ctvit"]["codebook_size"])
    verdict = apply_int8(encoder, volumes, tolerance, codebook_size)
    relative = encoder.relative_to(repository).as_posix()
    weights = [
        weight.model_copy(update={"sha256": sha256_of(encoder)})
        if weight.path == relative
        else weight
        for weight in metadata.weights
    ]
    record = EncoderPrecision(
        precision=precision.value,
        min_cosine=tolerance.min_cosine,
        max_abs_diff=tolerance.max_abs_diff,
        parity=[
            PrecisionParity(volume=p.volume, cosine=p.cosine, max_abs_diff=p.max_abs_diff)
            for p in verdict.parities
        ],
    )
    write_metadata(
        repository, metadata.model_copy(update={"weights": weights, "encoder_precision": record})
    )
    return verdict
