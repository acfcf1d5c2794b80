"""The TensorRT step of the ``tensorrt`` flavour: ONNX files -> plans with trtexec.

The plans are made by convertation/{vit,head,bpr}/convert2trt.sh (shape profiles and FP16
live there). Where trtexec is on PATH they run here; otherwise the builder prints the commands to
run on a GPU machine with TensorRT.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from convertation.errors import BuildError
from convertation.triton_config import ONNX_FILENAME, PLAN_FILENAME, VERSION
from services.core.model_metadata import (
    BINARY_HEAD_NAME,
    BODY_PART_REGRESSION_NAME,
    ENCODER_NAME,
    MULTILABEL_HEAD_NAME,
)

CONVERTATION_DIR = Path(__file__).resolve().parent
ENCODER_TRT_SCRIPT = CONVERTATION_DIR / "vit" / "convert2trt.sh"
HEAD_TRT_SCRIPT = CONVERTATION_DIR / "head" / "convert2trt.sh"
BPR_TRT_SCRIPT = CONVERTATION_DIR / "bpr" / "convert2trt.sh"


@dataclass(frozen=True)
class TensorRtStatus:
    built: bool
    message: str
    commands: tuple[str, ...] = ()


def tensorrt_commands(
    repository: Path,
    target_shape: tuple[int, int, int],
    embedding_dim: int,
    *,
    body_part_regression: bool = False,
) -> tuple[str, ...]:
    """The trtexec scripts' command lines that turn the ONNX files into plans."""
    depth, height, width = target_shape

    def files(model: str) -> tuple[str, str]:
        version = repository / model / VERSION
        return str(version / ONNX_FILENAME), str(version / PLAN_FILENAME)

    commands = [
        [str(ENCODER_TRT_SCRIPT), *files(ENCODER_NAME), str(depth), str(height), str(width)],
        [str(HEAD_TRT_SCRIPT), *files(BINARY_HEAD_NAME), str(embedding_dim)],
        [str(HEAD_TRT_SCRIPT), *files(MULTILABEL_HEAD_NAME), str(embedding_dim)],
    ]
    if body_part_regression:
        commands.append([str(BPR_TRT_SCRIPT), *files(BODY_PART_REGRESSION_NAME)])
    return tuple(shlex.join(["bash", *command]) for command in commands)


def build_plans(
    repository: Path,
    target_shape: tuple[int, int, int],
    embedding_dim: int,
    *,
    body_part_regression: bool = False,
) -> TensorRtStatus:
    """Run the scripts when trtexec is here; otherwise say which commands to run elsewhere."""
    commands = tensorrt_commands(
        repository, target_shape, embedding_dim, body_part_regression=body_part_regression
    )
    # The scripts honour $TRTEXEC too, for a trtexec outside PATH.
    trtexec_name = os.environ.get("TRTEXEC", "trtexec")
    trtexec = shutil.which(trtexec_name)
    if trtexec is None:
        message = (
            f"TensorRT plans skipped: {trtexec_name} is not on PATH (no TensorRT here). "
            "On a GPU machine with TensorRT run:\n  " + "\n  ".join(commands)
        )
        logger.warning("{}", message)
        return TensorRtStatus(built=False, message=message, commands=commands)
    for command in commands:
        logger.info("running {}", command)
        completed = subprocess.run(shlex.split(command), check=False)
        if completed.returncode != 0:
            raise BuildError(f"TensorRT conversion failed (exit {completed.returncode}): {command}")
    return TensorRtStatus(
        built=True, message=f"TensorRT plans built with {trtexec}", commands=commands
    )
