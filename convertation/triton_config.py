"""Triton model configurations as dataclasses, rendered to ``config.pbtxt`` text.

The dataclasses hold only what this project's models use (tensors, batching,
instance groups, warm-up, ensemble steps, parameters); ``render_config`` writes
the protobuf text format that Triton reads. Tests parse the output with the
``ModelConfig`` protobuf shipped in tritonclient, so a rendering mistake fails there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


class Platform(str, Enum):
    """How Triton runs a model: a ``platform`` (native runtimes) or the python ``backend``."""

    ONNXRUNTIME = "onnxruntime_onnx"
    TENSORRT = "tensorrt_plan"
    ENSEMBLE = "ensemble"
    PYTHON = "python"  # rendered as `backend: "python"`


class InstanceKind(str, Enum):
    CPU = "KIND_CPU"
    GPU = "KIND_GPU"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output; ``dims`` exclude the batch dimension when max_batch_size > 0."""

    name: str
    dims: tuple[int, ...]
    data_type: str = "TYPE_FP32"


@dataclass(frozen=True)
class InstanceGroup:
    kind: InstanceKind = InstanceKind.CPU
    count: int = 1


@dataclass(frozen=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0


@dataclass(frozen=True)
class WarmupInput:
    name: str
    dims: tuple[int, ...]
    data_type: str = "TYPE_FP32"
    # Zero data is valid input for every model here (a volume of zeros, a zero embedding)
    # and, unlike random data, gives the same warm-up on every start.
    zero_data: bool = True


@dataclass(frozen=True)
class ModelWarmup:
    name: str
    batch_size: int
    inputs: tuple[WarmupInput, ...]
    count: int = 1


@dataclass(frozen=True)
class EnsembleStep:
    """One composing model; maps are {model tensor name: ensemble tensor name}."""

    model_name: str
    input_map: dict[str, str]
    output_map: dict[str, str]
    model_version: int = -1


@dataclass(frozen=True)
class ModelConfig:
    name: str
    platform: Platform
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    instance_groups: tuple[InstanceGroup, ...] = ()
    dynamic_batching: DynamicBatching | None = None
    warmups: tuple[ModelWarmup, ...] = ()
    ensemble_steps: tuple[EnsembleStep, ...] = ()
    default_model_filename: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        is_ensemble = self.platform is Platform.ENSEMBLE
        if is_ensemble != bool(self.ensemble_steps):
            raise ValueError(f"{self.name}: ensemble steps belong to (and only to) an ensemble")
        if is_ensemble and (self.instance_groups or self.dynamic_batching or self.warmups):
            raise ValueError(f"{self.name}: an ensemble has no instances, batching or warm-up")
        if self.max_batch_size < 0:
            raise ValueError(f"{self.name}: max_batch_size must be >= 0")


def _quote(text: str) -> str:
    # JSON string escaping is a subset of what the protobuf text format accepts.
    return json.dumps(text)


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor_block(keyword: str, tensors: Sequence[TensorSpec]) -> list[str]:
    if not tensors:
        return []
    blocks = []
    for tensor in tensors:
        blocks.append(
            "  {\n"
            f"    name: {_quote(tensor.name)}\n"
            f"    data_type: {tensor.data_type}\n"
            f"    dims: {_dims(tensor.dims)}\n"
            "  }"
        )
    return [f"{keyword} [\n" + ",\n".join(blocks) + "\n]"]


def _map_entries(keyword: str, mapping: dict[str, str], indent: str) -> list[str]:
    return [
        f"{indent}{keyword} {{ key: {_quote(key)} value: {_quote(value)} }}"
        for key, value in mapping.items()
    ]


def _ensemble_block(steps: Sequence[EnsembleStep]) -> list[str]:
    lines = ["ensemble_scheduling {"]
    for step in steps:
        lines.append("  step {")
        lines.append(f"    model_name: {_quote(step.model_name)}")
        lines.append(f"    model_version: {step.model_version}")
        lines.extend(_map_entries("input_map", step.input_map, "    "))
        lines.extend(_map_entries("output_map", step.output_map, "    "))
        lines.append("  }")
    lines.append("}")
    return ["\n".join(lines)]


def _warmup_block(warmup: ModelWarmup) -> str:
    lines = [
        "model_warmup {",
        f"  name: {_quote(warmup.name)}",
        f"  batch_size: {warmup.batch_size}",
        f"  count: {warmup.count}",
    ]
    for item in warmup.inputs:
        data = "zero_data: true" if item.zero_data else "random_data: true"
        lines.append(
            f"  inputs {{ key: {_quote(item.name)} value {{ data_type: {item.data_type} "
            f"dims: {_dims(item.dims)} {data} }} }}"
        )
    lines.append("}")
    return "\n".join(lines)


def render_config(config: ModelConfig, header: str = "") -> str:
    """The ``config.pbtxt`` text of one model (protobuf text format)."""
    parts: list[str] = []
    if header:
        parts.append("\n".join(f"# {line}".rstrip() for line in header.splitlines()))
    parts.append(f"name: {_quote(config.name)}")
    if config.platform is Platform.PYTHON:
        parts.append('backend: "python"')
    else:
        parts.append(f"platform: {_quote(config.platform.value)}")
    parts.append(f"max_batch_size: {config.max_batch_size}")
    if config.default_model_filename:
        parts.append(f"default_model_filename: {_quote(config.default_model_filename)}")
    parts.extend(_tensor_block("input", config.inputs))
    parts.extend(_tensor_block("output", config.outputs))
    for group in config.instance_groups:
        parts.append(f"instance_group [ {{ kind: {group.kind.value} count: {group.count} }} ]")
    if config.dynamic_batching is not None:
        batching = config.dynamic_batching
        lines = ["dynamic_batching {"]
        if batching.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_dims(batching.preferred_batch_sizes)}")
        lines.append(f"  max_queue_delay_microseconds: {batching.max_queue_delay_microseconds}")
        lines.append("}")
        parts.append("\n".join(lines))
    parts.extend(_warmup_block(warmup) for warmup in config.warmups)
    if config.ensemble_steps:
        parts.extend(_ensemble_block(config.ensemble_steps))
    for key, value in config.parameters.items():
        parts.append(
            f"parameters {{ key: {_quote(key)} value {{ string_value: {_quote(value)} }} }}"
        )
    return "\n".join(parts) + "\n"
