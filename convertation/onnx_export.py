"""What the ONNX exports here share: torch's dynamo exporter writing one self-contained file
with a dynamic batch axis, and running such a file with onnxruntime."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from loguru import logger
from torch import nn

from convertation.errors import OnnxExportError
from services.core.arrays import AnyArray

OPSET = 18
# One file only, so the protobuf limit applies. The full CT-CLIP encoder is ~0.72 GB.
MAX_SINGLE_FILE_BYTES = 2**31 - 1


# The exporter's op registry warns once per torchvision op when torchvision is absent (it is:
# torchvision has no CPU build here, and none of these models uses it).
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def export_module(
    module: nn.Module,
    example_input: torch.Tensor,
    output: Path,
    *,
    input_name: str,
    output_name: str,
    custom_translation_table: dict[Any, Callable[..., Any]] | None = None,
) -> Path:
    """Export ``module(example_input)`` with a dynamic first (batch) axis to ``output``.

    The dynamo exporter is used: the legacy TorchScript exporter crashed on the full CT-CLIP
    encoder. ``example_input`` must have a batch of at least 2, or torch.export would
    specialise the batch axis to its size. ``custom_translation_table`` maps custom torch
    ops to the ONNX functions that write them (e.g. `convertation.vit.fused_attention`).
    """
    if example_input.shape[0] < 2:
        raise ValueError("the example input needs a batch of at least 2 for a dynamic batch")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter warns about its own internals (deprecated helpers, etc.).
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example_input,),
            dynamo=True,
            input_names=[input_name],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
            custom_translation_table=custom_translation_table,
        )
    if program is None:
        raise OnnxExportError("torch.onnx.export returned no program")
    _name_graph_output(program.model.graph, output_name)
    model = program.model_proto
    size = model.ByteSize()
    if size > MAX_SINGLE_FILE_BYTES:
        raise OnnxExportError(f"the graph is {size} bytes, over the 2 GB single-file limit")
    onnx.save_model(model, str(output))
    onnx.checker.check_model(str(output))
    logger.info("wrote {} ({:.1f} MB)", output, output.stat().st_size / 1e6)
    return output


def _name_graph_output(graph: ir.Graph, name: str) -> None:
    """Give the single graph output ``name``, renaming an inner value that already has it.

    The exporter names values after the torch ops that make them; an inner value may already
    be called e.g. "embedding" (``F.embedding``), and ONNX needs unique names.
    """
    (output,) = graph.outputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            if value.name == name and value is not output:
                value.name = f"{name}_inner"
    output.name = name


def run_onnx(path: Path, feed: dict[str, AnyArray], threads: int = 0) -> list[AnyArray]:
    """Run an ONNX file once with onnxruntime on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)
