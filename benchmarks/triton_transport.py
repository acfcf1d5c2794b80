"""How long it takes to move one full-size study (float32 [1, 1, 240, 480, 480], 221 MB) to
Triton and back through TritonBackend: plain gRPC versus system shared memory.

    .venv/bin/python benchmarks/triton_transport.py [--runs N]

The served model is a stand-in with the ensemble's name and tensors (a python-backend
model that averages the volume), so the numbers are the transport and Triton's own
handling, not the encoder. Uses the tritonserver of the nvidia-pytriton wheel on free
local ports and a temporary repository. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from services.core.config import InferenceSettings  # noqa: E402
from services.core.inference.triton_backend import TritonBackend  # noqa: E402
from services.core.model_metadata import ModelMetadata, write_metadata  # noqa: E402
from services.triton.local_server import LocalTritonServer, free_local_ports  # noqa: E402

SHAPE = (240, 480, 480)
STAND_IN_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Stand-in for the chest_screening ensemble: same tensors, trivial arithmetic."""

    def execute(self, requests):
        responses = []
        for request in requests:
            volume = pb_utils.get_input_tensor_by_name(request, "volume").as_numpy()
            mean = volume.reshape(volume.shape[0], -1).mean(axis=1, keepdims=True)
            mean = mean.astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("embedding", np.repeat(mean, 512, axis=1)),
                        pb_utils.Tensor("pathology_probability", mean),
                        pb_utils.Tensor("finding_probabilities", np.repeat(mean, 20, axis=1)),
                    ]
                )
            )
        return responses
'''
STAND_IN_CONFIG = """
name: "chest_screening"
backend: "python"
max_batch_size: 1
input [ { name: "volume" data_type: TYPE_FP32 dims: [ 1, 240, 480, 480 ] } ]
output [
  { name: "embedding" data_type: TYPE_FP32 dims: [ 512 ] },
  { name: "pathology_probability" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "finding_probabilities" data_type: TYPE_FP32 dims: [ 20 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


def stand_in_repository(root: Path) -> Path:
    model = root / "chest_screening"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(STAND_IN_MODEL)
    (model / "config.pbtxt").write_text(STAND_IN_CONFIG)
    write_metadata(
        root,
        ModelMetadata(
            demo=True, flavour="python", created_at=datetime.now(timezone.utc).isoformat()
        ),
    )
    return root


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    volume = np.random.default_rng(0).uniform(-1, 1, (1, 1, *SHAPE)).astype(np.float32)
    report: dict[str, object] = {"volume_bytes": volume.nbytes, "runs": arguments.runs}
    with tempfile.TemporaryDirectory(prefix="cts-transport-") as temporary:
        repository = stand_in_repository(Path(temporary) / "repository")
        http, grpc, metrics = free_local_ports(3)
        with LocalTritonServer(
            repository,
            http_port=http,
            grpc_port=grpc,
            metrics_port=metrics,
            log_file=Path(temporary) / "triton.log",
        ):
            status_client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
            for transport in ("grpc", "shared_memory"):
                settings = InferenceSettings(
                    model_repository=repository,
                    triton_url=f"127.0.0.1:{grpc}",
                    triton_transport=transport,
                    triton_timeout_s=120,
                )
                backend = TritonBackend(settings)
                expected = float(volume.mean())
                outputs = backend.infer(volume)  # warm-up
                assert abs(float(outputs.pathology_probability[0]) - expected) < 1e-4
                seconds = []
                for _ in range(arguments.runs):
                    started = time.perf_counter()
                    backend.infer(volume)
                    seconds.append(time.perf_counter() - started)
                # Registered while the backend lives: the one region it reuses (0 for gRPC).
                in_use = len(backend._client.get_system_shared_memory_status().regions)
                backend.close()
                report[transport] = {
                    "median_s": round(statistics.median(seconds), 4),
                    "min_s": round(min(seconds), 4),
                    "max_s": round(max(seconds), 4),
                    "bytes": backend.stats.as_dict(),
                    "regions_registered_while_open": in_use,
                    # Regions still registered after close(): must be 0 (no leak).
                    "regions_left": len(status_client.get_system_shared_memory_status().regions),
                }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
