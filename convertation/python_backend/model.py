"""Triton python-backend model that runs the ONNX graph beside it with onnxruntime.

`convertation.build_repository` copies this one file into every non-ensemble model of
the python flavour (``<model>/1/model.py`` next to ``<model>/1/model.onnx``). The
tensor names come from the model's config.pbtxt and are checked against the ONNX
session, so the same file serves the encoder and both heads.

Runs inside Triton's python-backend stub, whose interpreter must see numpy < 2 and
onnxruntime (see services/triton/local_server.py for how the environment is set).
Optional config parameters: ``onnx_filename`` (default model.onnx),
``intra_op_num_threads`` (default 0: onnxruntime's choice), ``allow_spinning`` (default 0:
idle threads sleep) and ``optimised_graph_cache`` (default 1: the optimised graph is saved
beside the model and later loads start from it; ``optimised_graphs.py``, copied beside this
file from services/core/inference/, does it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))  # optimised_graphs.py beside this file
from optimised_graphs import create_session

DEFAULT_ONNX_FILENAME = "model.onnx"


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {
        key: value.get("string_value", "")
        for key, value in model_config.get("parameters", {}).items()
    }


def _check_names(kind: str, configured: list[str], in_graph: list[str], path: Path) -> None:
    missing = sorted(set(configured) - set(in_graph))
    if missing:
        raise pb_utils.TritonModelException(
            f"{kind} {missing} of config.pbtxt are not in {path.name} (graph has {in_graph})"
        )


class TritonPythonModel:
    """One onnxruntime session; requests batched by Triton run as one session call."""

    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        parameters = _parameters(model_config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = version_dir / parameters.get("onnx_filename", DEFAULT_ONNX_FILENAME)
        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(f"ONNX file not found: {onnx_path}")

        threads = int(parameters.get("intra_op_num_threads", "0") or 0)
        spinning = parameters.get("allow_spinning", "0") or "0"

        def options() -> ort.SessionOptions:
            session_options = ort.SessionOptions()
            session_options.intra_op_num_threads = threads
            session_options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
            return session_options

        use_cache = (parameters.get("optimised_graph_cache", "1") or "1") != "0"
        self.session, self.session_start = create_session(
            onnx_path, options, ["CPUExecutionProvider"], use_cache=use_cache
        )
        self.input_names = [item["name"] for item in model_config["input"]]
        self.output_names = [item["name"] for item in model_config["output"]]
        _check_names(
            "inputs", self.input_names, [i.name for i in self.session.get_inputs()], onnx_path
        )
        _check_names(
            "outputs", self.output_names, [o.name for o in self.session.get_outputs()], onnx_path
        )
        self.output_dtypes = {
            item["name"]: pb_utils.triton_string_to_numpy(item["data_type"])
            for item in model_config["output"]
        }

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            return self._execute_batch(requests)
        except Exception as error:  # noqa: BLE001 - one failed batch must not take the model down
            message = f"{type(error).__name__}: {error}"
            return [
                pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests
            ]

    def _execute_batch(self, requests: list[Any]) -> list[Any]:
        # Dynamic batching hands several requests at once: run them as one batch.
        per_request = [
            {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.input_names
            }
            for request in requests
        ]
        sizes = [arrays[self.input_names[0]].shape[0] for arrays in per_request]
        if len(per_request) == 1:
            # The usual case: hand the stub's own buffer to onnxruntime as it is (a
            # concatenate would copy the 221 MB model input into fresh pages first).
            feed = {name: np.ascontiguousarray(array) for name, array in per_request[0].items()}
        else:
            feed = {
                name: np.concatenate([arrays[name] for arrays in per_request])
                for name in self.input_names
            }
        results = self.session.run(self.output_names, feed)
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(
                    name,
                    np.ascontiguousarray(
                        result[start : start + size], dtype=self.output_dtypes[name]
                    ),
                )
                for name, result in zip(self.output_names, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
