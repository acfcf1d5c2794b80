"""The exceptions of the conversion package: one base, one subclass per kind of failure.

Every command line here (`convertation.build_repository`, `convertation.vit.export`,
`convertation.head.export`) catches `ConversionError` and ends with `report_cli_failure`:
a one-line message on stderr and a non-zero exit status. Anything else that escapes is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys

# Exit status of a command line whose conversion failed (argparse uses 2 for usage errors).
CONVERSION_FAILED_EXIT = 1


class ConversionError(Exception):
    """The conversion cannot go on with these inputs; the message names the problem."""


class CheckpointError(ConversionError):
    """A checkpoint cannot be read or does not fit the module (the message names the key)."""


class EncoderConfigError(ConversionError):
    """A CTViT configuration file cannot be read or describes an impossible encoder."""


class OnnxExportError(ConversionError):
    """An ONNX file could not be written, or onnxruntime does not run it as expected."""


class BuildError(ConversionError):
    """The model repository cannot be built (missing inputs, a failed TensorRT step, ...)."""


def one_line(error: BaseException) -> str:
    """The error's message on a single line (torch's and pydantic's messages span several)."""
    return " ".join(str(error).split())


def report_cli_failure(error: ConversionError) -> int:
    """Print ``error: <message>`` on stderr and return the exit status for the failure."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return CONVERSION_FAILED_EXIT
