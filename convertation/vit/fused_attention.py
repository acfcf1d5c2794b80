"""Multi-head attention as one graph node: ONNX Runtime's ``com.microsoft.MultiHeadAttention``.

The exporter writes attention written out in torch as Reshape/Transpose -> MatMul -> Add
bias -> Softmax -> MatMul -> Transpose: five transposes of q, k, v and the result, and a
separate pass over the (heads x tokens x tokens) scores to add the position bias. ONNX
Runtime's MultiHeadAttention takes q, k and v as ``[batch, tokens, heads * dim_head]``,
adds the bias inside its score product and writes its result in that layout, and its
output is bit-identical to the written-out pattern on this model's shapes (benchmarks/
README.md, "Encoder against the machine's limit").

`multi_head_attention` is what `CosineSimAttention` calls. Inside ``fused_attention_export()``
it is the custom op ``ctclip::multi_head_attention``, which `TRANSLATION_TABLE` turns into
the single node; otherwise (eager torch, and the portable graph that TensorRT builds from)
it is the written-out pattern. The scale is 1: CT-CLIP's scales are applied to q and k
before (cosine-similarity attention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import onnx
import torch
from onnx.defs import OpSchema
from torch import Tensor

MSFT_DOMAIN = "com.microsoft"
_MHA = "MultiHeadAttention"
_state = {"fused": False}


def _written_out(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, heads: int) -> Tensor:
    """``[B, S, heads * d]`` q, k, v -> softmax(q k^T + bias) v, heads merged back."""
    batch, tokens, _ = q.shape

    def split(x: Tensor) -> Tensor:
        return x.reshape(batch, x.shape[1], heads, -1).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2)
    if bias is not None:
        scores = scores + bias
    attended = scores.softmax(dim=-1) @ split(v)
    return attended.transpose(1, 2).reshape(batch, tokens, -1)


@torch.library.custom_op("ctclip::multi_head_attention", mutates_args=())
def _fused_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, heads: int) -> Tensor:
    return _written_out(q, k, v, bias, heads)


@_fused_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, heads: int) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def multi_head_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, heads: int
) -> Tensor:
    """Attention over ``[B, S, heads * d]`` inputs; ``bias`` is ``[1, heads, S, S]`` or None."""
    if _state["fused"]:
        return torch.ops.ctclip.multi_head_attention(q, k, v, bias, heads)
    return _written_out(q, k, v, bias, heads)


@contextmanager
def fused_attention_export() -> Iterator[None]:
    """Within: attention traces as the custom op (export with `TRANSLATION_TABLE`)."""
    previous = _state["fused"]
    _state["fused"] = True
    try:
        yield
    finally:
        _state["fused"] = previous


def _register_schema() -> None:
    """The onnx package knows no com.microsoft schemas; onnxscript needs one to emit the node.

    Only what this model uses: q, k, v, the attention bias, num_heads and scale (the inputs
    ONNX Runtime documents for the op, in its order).
    """
    if onnx.defs.has(_MHA, MSFT_DOMAIN):
        return
    parameter, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    inputs = [parameter("query", "T")] + [
        parameter(name, "M" if name == "key_padding_mask" else "T", param_option=optional)
        for name in ("key", "value", "bias", "key_padding_mask", "attention_bias")
    ]
    onnx.defs.register_schema(
        OpSchema(
            _MHA,
            MSFT_DOMAIN,
            1,
            inputs=inputs,
            outputs=[parameter("output", "T")],
            type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
            attributes=[
                OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads"),
                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale"),
            ],
        )
    )


def _translation_table() -> dict[Any, Callable[..., Any]]:
    import onnxscript

    _register_schema()
    msft = onnxscript.values.Opset(MSFT_DOMAIN, 1)

    def onnx_multi_head_attention(q: Any, k: Any, v: Any, bias: Any, heads: int) -> Any:
        if bias is None:
            return msft.MultiHeadAttention(q, k, v, num_heads=heads, scale=1.0)
        return msft.MultiHeadAttention(q, k, v, None, None, bias, num_heads=heads, scale=1.0)

    return {torch.ops.ctclip.multi_head_attention.default: onnx_multi_head_attention}


def translation_table() -> dict[Any, Callable[..., Any]]:
    """The exporter's ``custom_translation_table`` for the fused attention."""
    return _translation_table()
