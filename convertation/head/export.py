"""Export the two heads to ONNX with probabilities as outputs.

    python -m convertation.head.export --binary-head B.pt --multilabel-head M.pt --output-dir D
    python -m convertation.head.export --demo-seed 0 --output-dir D      # seeded demo heads

Writes ``D/binary_head.onnx`` (``embedding`` [batch, E] -> ``pathology_probability``
[batch, 1]) and ``D/multilabel_head.onnx`` (-> ``finding_probabilities`` [batch, 20]).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from convertation.errors import ConversionError, report_cli_failure
from convertation.head.heads import (
    EMBEDDING_DIM,
    BinaryHead,
    FindingProbabilities,
    MultilabelHead,
    PathologyProbability,
    build_demo_heads,
    load_binary_head,
    load_multilabel_head,
)
from convertation.onnx_export import export_module

INPUT_NAME = "embedding"
BINARY_OUTPUT_NAME = "pathology_probability"
MULTILABEL_OUTPUT_NAME = "finding_probabilities"
BINARY_FILE = "binary_head.onnx"
MULTILABEL_FILE = "multilabel_head.onnx"


def _export_head(wrapper: nn.Module, embedding_dim: int, output: Path, output_name: str) -> Path:
    example = torch.nn.functional.normalize(torch.randn(2, embedding_dim), dim=-1)
    return export_module(
        wrapper.eval(), example, output, input_name=INPUT_NAME, output_name=output_name
    )


def export_binary_head_onnx(head: BinaryHead, output: Path) -> Path:
    """``embedding`` [batch, E] -> ``pathology_probability`` [batch, 1]."""
    return _export_head(PathologyProbability(head), head.embedding_dim, output, BINARY_OUTPUT_NAME)


def export_multilabel_head_onnx(head: MultilabelHead, output: Path) -> Path:
    """``embedding`` [batch, E] -> ``finding_probabilities`` [batch, 20]."""
    return _export_head(
        FindingProbabilities(head), head.embedding_dim, output, MULTILABEL_OUTPUT_NAME
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary-head", type=Path, help="state dict of a BinaryHead")
    parser.add_argument("--multilabel-head", type=Path, help="state dict of a MultilabelHead")
    parser.add_argument("--demo-seed", type=int, help="seeded demo heads instead of files")
    parser.add_argument("--embedding-dim", type=int, default=EMBEDDING_DIM)
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    from_files = args.binary_head is not None and args.multilabel_head is not None
    if from_files == (args.demo_seed is not None):
        parser.error("give both --binary-head and --multilabel-head, or --demo-seed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.demo_seed is not None:
            binary, multilabel = build_demo_heads(args.embedding_dim, args.demo_seed)
        else:
            binary = load_binary_head(args.binary_head, args.embedding_dim)
            multilabel = load_multilabel_head(args.multilabel_head, args.embedding_dim)
        export_binary_head_onnx(binary, args.output_dir / BINARY_FILE)
        export_multilabel_head_onnx(multilabel, args.output_dir / MULTILABEL_FILE)
    except ConversionError as error:
        return report_cli_failure(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
