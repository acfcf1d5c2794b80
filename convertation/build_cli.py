"""The command line of ``python -m convertation.build_repository`` (its docstring says more)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from convertation.model_sources import MissingFindings
from convertation.precision import DEFAULT_MAX_ABS_DIFF, DEFAULT_MIN_COSINE, Precision
from convertation.triton_config import Flavour


def _one_of(default: Enum) -> dict[str, Any]:
    """The choices of an option that takes a value of ``default``'s enum, and its default."""
    return {"choices": [member.value for member in type(default)], "default": default.value}


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convertation.build_repository",
        description="Build the Triton model repository (ONNX files, configs, metadata).",
    )
    parser.add_argument("--output", type=Path, required=True, help="repository folder")
    parser.add_argument("--flavour", **_one_of(Flavour.PYTHON))
    parser.add_argument(
        "--demo", action="store_true", help="seeded weights (meaningless probabilities)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo weights")
    parser.add_argument("--encoder-checkpoint", type=Path, help="CT-CLIP checkpoint")
    parser.add_argument(
        "--binary-head", type=Path, help="seed-head checkpoint file or `training train` run folder"
    )
    parser.add_argument(
        "--multilabel-head",
        type=Path,
        help="seed-head checkpoint file or `training train` run folder",
    )
    parser.add_argument(
        "--missing-findings",
        **_one_of(MissingFindings.REFUSE),
        help="a trained multilabel head without some deployed findings: refuse (default) or "
        "fill (exported as 0 and marked not assessed: no threshold, no probability shown)",
    )
    parser.add_argument(
        "--ctvit-config",
        type=Path,
        help='JSON {"ctvit": {...}, "dim_latent": N, "input_shape": [...]} '
        "(default: the full CT-CLIP architecture)",
    )
    body_part = parser.add_mutually_exclusive_group()
    body_part.add_argument(
        "--bpr-model",
        type=Path,
        metavar="DIR",
        help="bpreg's model folder (model.pt, config.json, inference-settings.json) for the "
        "body-part regression model (default with --demo: seeded DEMO weights)",
    )
    body_part.add_argument(
        "--no-bpr", action="store_true", help="no body-part regression model (lung_air only)"
    )
    precision = parser.add_argument_group("reduced precision (convertation/precision.py)")
    precision.add_argument(
        "--precision",
        **_one_of(Precision.FP32),
        help="int8: deployed only if its embedding keeps the tolerance against FP32 on "
        "--parity-volumes; otherwise refused (exit 1) and the FP32 build kept",
    )
    precision.add_argument("--parity-volumes", type=Path, nargs="+", default=[], metavar="NPY")
    precision.add_argument("--parity-min-cosine", type=float, default=DEFAULT_MIN_COSINE)
    precision.add_argument("--parity-max-abs-diff", type=float, default=DEFAULT_MAX_ABS_DIFF)
    arguments = parser.parse_args(argv)
    if arguments.precision != Precision.FP32.value and arguments.flavour == Flavour.TENSORRT.value:
        parser.error("--precision int8 is onnxruntime's quantisation: not for the tensorrt flavour")
    heads = (arguments.binary_head, arguments.multilabel_head)
    if arguments.demo and arguments.encoder_checkpoint:
        parser.error("--demo and --encoder-checkpoint exclude each other")
    if not arguments.demo and not arguments.encoder_checkpoint:
        parser.error("give --demo or --encoder-checkpoint")
    if any(heads) and not all(heads):
        parser.error("give both --binary-head and --multilabel-head, or neither")
    return arguments


def demo_build_command(output: Path, *, ctvit_config: Path | None = None) -> list[str]:
    """The command that builds a python-flavour demo repository (tests and benchmarks run it
    in a process of its own: torch stays out of theirs); ``ctvit_config``: a smaller encoder."""
    import sys

    command = [sys.executable, "-m", "convertation.build_repository", "--output", str(output)]
    command += ["--flavour", Flavour.PYTHON.value, "--demo"]
    return command if ctvit_config is None else [*command, "--ctvit-config", str(ctvit_config)]
