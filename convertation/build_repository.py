"""Build the Triton model repository: ONNX files, config.pbtxt files, metadata.

    python -m convertation.build_repository --output model_repository_running \\
        --flavour {python,onnxruntime,tensorrt} \\
        (--demo [--seed N] | --encoder-checkpoint F) [--binary-head H --multilabel-head H] \\
        [--missing-findings refuse|fill] [--ctvit-config F] [--bpr-model DIR | --no-bpr] \\
        [--precision int8 --parity-volumes A.npy ... (convertation/precision.py)]

Models: ``ct_clip_encoder`` (volume -> embedding), ``binary_head`` (embedding ->
pathology_probability), ``multilabel_head`` (embedding -> finding_probabilities) and the
ensemble ``chest_screening`` that chains them, and ``body_part_regression`` (slices ->
scores, for the chest check) from bpreg's model folder (``--bpr-model DIR``) or, with
``--demo``, from seeded demo weights and an invented lookup table (``--no-bpr`` leaves it
out; the chest check then uses lung_air). Its lookup table is written to
``body_part_regression/inference-settings.json``. Every flavour keeps each model's ONNX
graph at ``<model>/1/model.onnx`` (the embedded onnxruntime backend reads those files);
the flavours differ in how Triton runs them:

* ``python``: Triton's python backend runs the ONNX file with onnxruntime
  (convertation/python_backend/model.py is copied beside it). This is the flavour the
  tritonserver of the nvidia-pytriton wheel can serve.
* ``onnxruntime``: ``platform: "onnxruntime_onnx"`` for NVIDIA's Triton container.
* ``tensorrt``: ``platform: "tensorrt_plan"``; the plans are made by
  convertation/{vit,head,bpr}/convert2trt.sh with trtexec, here if trtexec is on PATH,
  otherwise on a GPU machine with the commands the builder prints.

A head (``H``) is a seed-head checkpoint file or a run folder of ``python -m training train``
(convertation/head/deploy.py): a trained head is loaded with the architecture its
``head.json`` records, and its evaluated thresholds go into the metadata; a multilabel head
without some of the 20 deployed findings needs ``--missing-findings fill`` (those findings
are then "not assessed"). Trained heads may go with ``--demo`` encoder weights, and an
``--encoder-checkpoint`` may go without heads (seeded heads beside the real encoder, enough
for ``training embed``); either way the repository is marked demo.

``<repository>/chest_screening/metadata.json`` records the preprocessing target, labels,
thresholds, the findings not assessed, the demo flag and the sha256 and provenance of every
weight file, and the body-part regression model's demo flag and settings file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger

from convertation.build_cli import parse_arguments
from convertation.errors import ConversionError, report_cli_failure
from convertation.model_sources import (
    BodyPartSource,
    MissingFindings,
    ModelSet,
    Provenance,
    body_part_from_folder,
    checkpoint_models,
    demo_body_part,
    demo_models,
    load_heads,
    sha256_of,
    with_encoder_checkpoint,
)
from convertation.precision import (
    ParityTolerance,
    Precision,
    load_parity_volumes,
    reduce_encoder_precision,
)
from convertation.python_backend import OPTIMISED_GRAPHS_PY, TEMPLATE_MODEL_PY
from convertation.tensorrt_plans import TensorRtStatus, build_plans
from convertation.triton_config import (
    BPR_MAX_BATCH,
    MODEL_NAMES,
    ONNX_FILENAME,
    SERVED_MODEL_NAMES,
    VERSION,
    Flavour,
    config_text,
    flavour_header,
    model_configs,
)
from services.core.body_part.bpr_settings import inference_settings_json
from services.core.labels import FINDING_LABELS, SEVERITY_ORDER
from services.core.model_metadata import (
    BINARY_HEAD_NAME,
    BODY_PART_REGRESSION_NAME,
    ENCODER_NAME,
    ENSEMBLE_NAME,
    MULTILABEL_HEAD_NAME,
    BodyPartRegressionInfo,
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
# bpreg's file name, beside the body-part regression model's config.pbtxt.
BPR_SETTINGS_RELATIVE_PATH = f"{BODY_PART_REGRESSION_NAME}/inference-settings.json"


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


def _reset_model_dirs(repository: Path, *, body_part_regression: bool) -> None:
    """Empty the version folders of our models (a previous build's files must go).

    The body-part regression folder goes entirely when this build has no such model: Triton
    would otherwise serve a stale one that the metadata does not list.
    """
    names = [*MODEL_NAMES, BODY_PART_REGRESSION_NAME] if body_part_regression else MODEL_NAMES
    shutil.rmtree(repository / BODY_PART_REGRESSION_NAME, ignore_errors=True)
    for name in names:
        version_dir = repository / name / VERSION
        if version_dir.exists():
            shutil.rmtree(version_dir)
        version_dir.mkdir(parents=True)


def _served_names(models: ModelSet) -> list[str]:
    """The models with weights (not the ensemble)."""
    extra = [BODY_PART_REGRESSION_NAME] if models.body_part_regression is not None else []
    return [*SERVED_MODEL_NAMES, *extra]


def _export_onnx(models: ModelSet, repository: Path, flavour: Flavour) -> None:
    from convertation.head.deploy import export_head
    from convertation.vit.export import export_encoder_onnx

    def target(name: str) -> Path:
        return repository / name / VERSION / ONNX_FILENAME

    started = time.perf_counter()
    # ONNX Runtime's fused attention for the flavours that run onnxruntime; standard
    # operators for the graph trtexec builds TensorRT plans from.
    fused = flavour is not Flavour.TENSORRT
    export_encoder_onnx(models.encoder, target(ENCODER_NAME), fused_attention=fused)
    logger.info("exported {} in {:.1f} s", target(ENCODER_NAME), time.perf_counter() - started)
    export_head(models.binary_head, target(BINARY_HEAD_NAME), deployed_labels=FINDING_LABELS)
    export_head(
        models.multilabel_head, target(MULTILABEL_HEAD_NAME), deployed_labels=FINDING_LABELS
    )
    body_part = models.body_part_regression
    if body_part is not None:
        from convertation.bpr.export import export_bpr_onnx

        export_bpr_onnx(body_part.network, target(BODY_PART_REGRESSION_NAME))
        (repository / BPR_SETTINGS_RELATIVE_PATH).write_text(
            json.dumps(inference_settings_json(body_part.settings), indent=2) + "\n"
        )


def write_configs(
    repository: Path,
    flavour: Flavour,
    target_shape: tuple[int, int, int],
    embedding_dim: int,
    *,
    body_part_regression: bool = False,
) -> None:
    """Every model's ``config.pbtxt``; the python flavour's ``model.py`` beside each ONNX file."""
    header = flavour_header(flavour)
    configs = model_configs(
        flavour, target_shape, embedding_dim, body_part_regression=body_part_regression
    )
    for name, config in configs.items():
        (repository / name / "config.pbtxt").write_text(config_text(config, header=header))
        if flavour is Flavour.PYTHON and name != ENSEMBLE_NAME:
            shutil.copyfile(TEMPLATE_MODEL_PY, repository / name / VERSION / "model.py")
            shutil.copyfile(
                OPTIMISED_GRAPHS_PY, repository / name / VERSION / OPTIMISED_GRAPHS_PY.name
            )


def _provenance(models: ModelSet, name: str) -> Provenance:
    if name == BODY_PART_REGRESSION_NAME:
        assert models.body_part_regression is not None
        return models.body_part_regression.provenance
    return models.provenance[name]


def _weight_files(repository: Path, models: ModelSet) -> list[WeightFile]:
    """Every weight file of the served models (ONNX, external ONNX data, plans) with sha256."""
    entries = []
    for name in _served_names(models):
        provenance = _provenance(models, name)
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


def _body_part_info(models: ModelSet) -> BodyPartRegressionInfo | None:
    body_part = models.body_part_regression
    if body_part is None:
        return None
    return BodyPartRegressionInfo(
        demo=body_part.demo,
        inference_settings=BPR_SETTINGS_RELATIVE_PATH,
        max_batch_size=BPR_MAX_BATCH,
        source=body_part.provenance.source,
        source_sha256=body_part.provenance.source_sha256,
    )


def build_repository(repository: Path, flavour: Flavour, models: ModelSet) -> BuildResult:
    """Write the repository for ``models``; returns what was built."""
    repository = Path(repository).resolve()
    repository.mkdir(parents=True, exist_ok=True)
    target_shape = models.encoder.expected_input_shape()

    body_part = models.body_part_regression
    _reset_model_dirs(repository, body_part_regression=body_part is not None)
    _export_onnx(models, repository, flavour)
    write_configs(
        repository,
        flavour,
        target_shape,
        models.embedding_dim,
        body_part_regression=body_part is not None,
    )
    tensorrt = (
        build_plans(
            repository,
            target_shape,
            models.embedding_dim,
            body_part_regression=body_part is not None,
        )
        if flavour is Flavour.TENSORRT
        else None
    )

    from convertation.head.deploy import deployed_thresholds

    thresholds = deployed_thresholds(
        models.binary_head, models.multilabel_head, deployed_labels=FINDING_LABELS
    )
    metadata = ModelMetadata(
        demo=models.demo,
        flavour=flavour.value,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        target_shape=target_shape,
        target_spacing_mm=target_spacing_for(target_shape),
        embedding_dim=models.embedding_dim,
        ctvit_config=models.ctvit_config,
        labels=list(FINDING_LABELS),
        severity_order=list(SEVERITY_ORDER),
        pathology_threshold=thresholds.pathology,
        finding_thresholds=thresholds.findings,
        not_assessed=thresholds.not_assessed,
        weights=_weight_files(repository, models),
        body_part_regression=_body_part_info(models),
    )
    write_metadata(repository, metadata)
    return BuildResult(repository=repository, flavour=flavour, metadata=metadata, tensorrt=tensorrt)


def _body_part_source(arguments: argparse.Namespace) -> BodyPartSource | None:
    """``--bpr-model``'s folder, demo weights with ``--demo``, or none."""
    if arguments.bpr_model is not None:
        return body_part_from_folder(arguments.bpr_model)
    if arguments.demo and not arguments.no_bpr:
        return demo_body_part(arguments.seed)
    logger.info("no body-part regression model: the chest check will use lung_air")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    flavour = Flavour(arguments.flavour)
    started = time.perf_counter()
    try:
        missing_findings = MissingFindings(arguments.missing_findings)
        if arguments.demo or arguments.binary_head is None:
            # Seeded heads (a demo); with --encoder-checkpoint, the real encoder beside them
            # (enough for `training embed`: the heads are then trained on its embeddings).
            models = demo_models(arguments.seed, arguments.ctvit_config)
            if arguments.encoder_checkpoint is not None:
                models = with_encoder_checkpoint(
                    models, arguments.encoder_checkpoint, arguments.ctvit_config
                )
            if arguments.binary_head is not None:
                models.binary_head, models.multilabel_head, provenance = load_heads(
                    arguments.binary_head,
                    arguments.multilabel_head,
                    models.embedding_dim,
                    missing_findings,
                )
                models.provenance.update(provenance)
        else:
            models = checkpoint_models(
                arguments.encoder_checkpoint,
                arguments.binary_head,
                arguments.multilabel_head,
                arguments.ctvit_config,
                missing_findings,
            )
        models.body_part_regression = _body_part_source(arguments)
        precision = Precision(arguments.precision)
        if precision is not Precision.FP32:  # read before the build: a bad file fails fast
            volumes = load_parity_volumes(
                arguments.parity_volumes, models.encoder.expected_input_shape()
            )
        result = build_repository(arguments.output, flavour, models)
        if precision is not Precision.FP32:
            tolerance = ParityTolerance(arguments.parity_min_cosine, arguments.parity_max_abs_diff)
            verdict = reduce_encoder_precision(result.repository, precision, volumes, tolerance)
            logger.info("{}", verdict.describe())
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
