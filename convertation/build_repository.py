"""Build the Triton model repository: ONNX files, config.pbtxt files, metadata.

    python -m convertation.build_repository --output model_repository_running \\
        --flavour {python,onnxruntime,tensorrt} \\
        (--demo [--seed N] | --encoder-checkpoint F --binary-head F --multilabel-head F) \\
        [--ctvit-config F]

Models: ``ct_clip_encoder`` (volume -> embedding), ``binary_head`` (embedding ->
pathology_probability), ``multilabel_head`` (embedding -> finding_probabilities) and the
ensemble ``chest_screening`` that chains them. Every flavour keeps each model's ONNX
graph at ``<model>/1/model.onnx`` (the embedded onnxruntime backend reads those files);
the flavours differ in how Triton runs them:

* ``python``: Triton's python backend runs the ONNX file with onnxruntime
  (convertation/python_backend/model.py is copied beside it). This is the flavour the
  tritonserver of the nvidia-pytriton wheel can serve.
* ``onnxruntime``: ``platform: "onnxruntime_onnx"`` for NVIDIA's Triton container.
* ``tensorrt``: ``platform: "tensorrt_plan"``; the plans are made by
  convertation/{vit,head}/convert2trt.sh with trtexec, here if trtexec is on PATH,
  otherwise on a GPU machine with the commands the builder prints.

``<repository>/chest_screening/metadata.json`` records the preprocessing target, labels,
thresholds, the demo flag and the sha256 and provenance of every weight file.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from convertation.errors import ConversionError, report_cli_failure
from convertation.model_sources import ModelSet, checkpoint_models, demo_models, sha256_of
from convertation.python_backend import TEMPLATE_MODEL_PY
from convertation.tensorrt_plans import TensorRtStatus, build_plans
from convertation.triton_config import (
    MODEL_NAMES,
    ONNX_FILENAME,
    SERVED_MODEL_NAMES,
    VERSION,
    Flavour,
    config_text,
    flavour_header,
    model_configs,
)
from services.core.labels import FINDING_LABELS, SEVERITY_ORDER
from services.core.model_metadata import (
    BINARY_HEAD_NAME,
    ENCODER_NAME,
    MULTILABEL_HEAD_NAME,
    ModelMetadata,
    WeightFile,
    write_metadata,
)

# The contract's field of view: 240 x 1.5 mm, 480 x 0.75 mm, 480 x 0.75 mm (360 mm each way).
# A smaller encoder keeps it and takes coarser voxels.
FULL_TARGET_SHAPE = (240, 480, 480)
FULL_TARGET_SPACING_MM = (1.5, 0.75, 0.75)
FIELD_OF_VIEW_MM = tuple(
    n * s for n, s in zip(FULL_TARGET_SHAPE, FULL_TARGET_SPACING_MM, strict=True)
)
# The weight files of a model folder: ONNX graphs, external ONNX data, TensorRT plans.
WEIGHT_SUFFIXES = (".onnx", ".data", ".plan")


@dataclass(frozen=True)
class BuildResult:
    repository: Path
    flavour: Flavour
    metadata: ModelMetadata
    tensorrt: TensorRtStatus | None = None


def target_spacing_for(shape: Sequence[int]) -> tuple[float, float, float]:
    """Voxel spacing that keeps the contract's field of view for an input of ``shape``."""
    if len(shape) != 3 or any(int(n) <= 0 for n in shape):
        raise ValueError(f"expected a positive (D, H, W) shape, got {tuple(shape)}")
    spacing = tuple(fov / int(n) for fov, n in zip(FIELD_OF_VIEW_MM, shape, strict=True))
    return (spacing[0], spacing[1], spacing[2])


def _reset_model_dirs(repository: Path) -> None:
    """Empty the version folders of our four models (a previous flavour's files must go)."""
    for name in MODEL_NAMES:
        version_dir = repository / name / VERSION
        if version_dir.exists():
            shutil.rmtree(version_dir)
        version_dir.mkdir(parents=True)


def _export_onnx(models: ModelSet, repository: Path) -> None:
    from convertation.head.export import export_binary_head_onnx, export_multilabel_head_onnx
    from convertation.vit.export import export_encoder_onnx

    def target(name: str) -> Path:
        return repository / name / VERSION / ONNX_FILENAME

    started = time.perf_counter()
    export_encoder_onnx(models.encoder, target(ENCODER_NAME))
    logger.info("exported {} in {:.1f} s", target(ENCODER_NAME), time.perf_counter() - started)
    export_binary_head_onnx(models.binary_head, target(BINARY_HEAD_NAME))
    export_multilabel_head_onnx(models.multilabel_head, target(MULTILABEL_HEAD_NAME))


def write_configs(
    repository: Path, flavour: Flavour, target_shape: tuple[int, int, int], embedding_dim: int
) -> None:
    """Every model's ``config.pbtxt``; the python flavour's ``model.py`` beside each ONNX file."""
    header = flavour_header(flavour)
    for name, config in model_configs(flavour, target_shape, embedding_dim).items():
        (repository / name / "config.pbtxt").write_text(config_text(config, header=header))
        if flavour is Flavour.PYTHON and name in SERVED_MODEL_NAMES:
            shutil.copyfile(TEMPLATE_MODEL_PY, repository / name / VERSION / "model.py")


def _weight_files(repository: Path, models: ModelSet) -> list[WeightFile]:
    """Every weight file of the three models (ONNX, external ONNX data, plans) with sha256."""
    entries = []
    for name in SERVED_MODEL_NAMES:
        provenance = models.provenance[name]
        for path in sorted((repository / name / VERSION).iterdir()):
            if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
                entries.append(
                    WeightFile(
                        model=name,
                        path=path.relative_to(repository).as_posix(),
                        sha256=sha256_of(path),
                        source=provenance.source,
                        source_sha256=provenance.source_sha256,
                    )
                )
    return entries


def build_repository(repository: Path, flavour: Flavour, models: ModelSet) -> BuildResult:
    """Write the repository for ``models``; returns what was built."""
    repository = Path(repository).resolve()
    repository.mkdir(parents=True, exist_ok=True)
    target_shape = models.encoder.expected_input_shape()

    _reset_model_dirs(repository)
    _export_onnx(models, repository)
    write_configs(repository, flavour, target_shape, models.embedding_dim)
    tensorrt = (
        build_plans(repository, target_shape, models.embedding_dim)
        if flavour is Flavour.TENSORRT
        else None
    )

    metadata = ModelMetadata(
        demo=models.demo,
        flavour=flavour.value,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        target_shape=target_shape,
        target_spacing_mm=target_spacing_for(target_shape),
        embedding_dim=models.embedding_dim,
        ctvit_config=models.ctvit_config,
        labels=list(FINDING_LABELS),
        severity_order=list(SEVERITY_ORDER),
        weights=_weight_files(repository, models),
    )
    write_metadata(repository, metadata)
    return BuildResult(repository=repository, flavour=flavour, metadata=metadata, tensorrt=tensorrt)


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convertation.build_repository",
        description="Build the Triton model repository (ONNX files, configs, metadata).",
    )
    parser.add_argument("--output", type=Path, required=True, help="repository folder")
    parser.add_argument(
        "--flavour", choices=[flavour.value for flavour in Flavour], default=Flavour.PYTHON.value
    )
    parser.add_argument(
        "--demo", action="store_true", help="seeded weights (meaningless probabilities)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo weights")
    parser.add_argument("--encoder-checkpoint", type=Path, help="CT-CLIP checkpoint")
    parser.add_argument("--binary-head", type=Path, help="binary head checkpoint")
    parser.add_argument("--multilabel-head", type=Path, help="multilabel head checkpoint")
    parser.add_argument(
        "--ctvit-config",
        type=Path,
        help='JSON {"ctvit": {...}, "dim_latent": N, "input_shape": [...]} '
        "(default: the full CT-CLIP architecture)",
    )
    arguments = parser.parse_args(argv)
    checkpoints = (arguments.encoder_checkpoint, arguments.binary_head, arguments.multilabel_head)
    if arguments.demo and any(checkpoints):
        parser.error("--demo and checkpoints exclude each other")
    if not arguments.demo and not all(checkpoints):
        parser.error(
            "give --demo, or all of --encoder-checkpoint, --binary-head and --multilabel-head"
        )
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    flavour = Flavour(arguments.flavour)
    started = time.perf_counter()
    try:
        if arguments.demo:
            models = demo_models(arguments.seed, arguments.ctvit_config)
        else:
            models = checkpoint_models(
                arguments.encoder_checkpoint,
                arguments.binary_head,
                arguments.multilabel_head,
                arguments.ctvit_config,
            )
        result = build_repository(arguments.output, flavour, models)
    except ConversionError as error:
        return report_cli_failure(error)
    logger.info(
        "built the {} repository {} in {:.1f} s ({}weights, model version {})",
        flavour.value,
        result.repository,
        time.perf_counter() - started,
        "DEMO " if result.metadata.demo else "",
        result.metadata.model_version,
    )
    if result.tensorrt is not None and not result.tensorrt.built:
        print(result.tensorrt.message)  # on stdout too: the user has to act on it
    return 0


if __name__ == "__main__":
    sys.exit(main())
