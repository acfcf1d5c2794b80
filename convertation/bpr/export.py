"""Export the body-part regression network to ONNX.

    python -m convertation.bpr.export --checkpoint MODEL_DIR_OR_FILE --output bpr.onnx
    python -m convertation.bpr.export --demo [--demo-seed 0] [--demo-folder DIR] --output bpr.onnx

The graph takes ``slices`` float32 ``[N, 1, 128, 128]`` (dynamic N) and gives ``scores``
float32 ``[N, 1]``. ``--demo`` writes a DEMO model folder (seeded weights, invented lookup
table, labelled demo) and exports from it through the same strict loader. After the export,
torch and onnxruntime score the same seeded batch; a difference over 1e-4 is a failure.
A checkpoint that does not fit exits non-zero with a one-line message naming the key.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from convertation.bpr.loading import load_bpr_model, write_demo_model_folder
from convertation.bpr.network import INPUT_CHANNELS, INPUT_SIZE, BodyPartRegressionNet
from convertation.errors import ConversionError, OnnxExportError, report_cli_failure
from convertation.onnx_export import export_module, run_onnx

INPUT_NAME = "slices"
OUTPUT_NAME = "scores"
PARITY_TOLERANCE = 1e-4
PARITY_BATCH = 2


def example_slices(batch: int, seed: int = 0) -> torch.Tensor:
    """A seeded batch in the network's input range [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE)
    return torch.rand(shape, generator=generator) * 2.0 - 1.0


def export_bpr_onnx(network: BodyPartRegressionNet, output: Path) -> float:
    """Write ``output`` and return the largest torch-vs-onnxruntime score difference."""
    slices = example_slices(PARITY_BATCH)
    export_module(network.eval(), slices, output, input_name=INPUT_NAME, output_name=OUTPUT_NAME)
    with torch.no_grad():
        expected = network(slices).numpy()
    (got,) = run_onnx(output, {INPUT_NAME: slices.numpy()})
    difference = float(np.max(np.abs(got - expected)))
    if got.shape != expected.shape or difference > PARITY_TOLERANCE:
        raise OnnxExportError(
            f"onnxruntime scores differ from torch by {difference:.2e} "
            f"(shape {got.shape} vs {expected.shape}; tolerance {PARITY_TOLERANCE})"
        )
    logger.info("{}: onnxruntime matches torch within {:.2e}", output.name, difference)
    return difference


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", type=Path, help="bpreg model folder, .pt/.pth state dict or .npz"
    )
    source.add_argument("--demo", action="store_true", help="seeded DEMO weights and table")
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--demo-folder", type=Path, help="where --demo writes its model folder")
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="bpr-demo-") as scratch:
            source = args.checkpoint
            if args.demo:
                source = write_demo_model_folder(args.demo_folder or Path(scratch), args.demo_seed)
            loaded = load_bpr_model(source)
            export_bpr_onnx(loaded.network, args.output)
    except ConversionError as error:
        return report_cli_failure(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
