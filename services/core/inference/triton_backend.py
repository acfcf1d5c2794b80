"""Inference on a Triton Inference Server over gRPC: the ``chest_screening`` ensemble.

The ensemble takes ``volume`` float32 ``[B, 1, D, H, W]`` and returns ``embedding``
``[B, dim]``, ``pathology_probability`` ``[B, 1]`` and ``finding_probabilities``
``[B, n_labels]``. The model metadata (labels, thresholds, demo flag) is read from the
model repository folder the server serves, so both sides agree on what the numbers mean.

A full study is 221 MB as float32. When the server runs on this machine the volume goes
through POSIX shared memory (the request carries only a region name); otherwise it travels
in the gRPC request, whose size limit is raised for that. Unreachable server, deadline or
overload -> ``ModelServerUnavailable``: the caller retries later, the study is fine.

Shared-memory regions are registered once and reused from study to study: a fresh 221 MB
region per request cost a registration round trip and, on virtual machines, the first
touch of 221 MB of new pages (about 0.2 s here) in the adapter and again in the server. A
region the server no longer knows (it restarted) is registered again; after a failed
request its region is dropped, not reused.

When the metadata lists a body-part regression model, the server serves it too
(``body_part_regression``: ``slices`` ``[N, 1, 128, 128]`` -> ``scores``); its requests take
the same transport and are part of readiness, and ``body_part_model`` hands it to the
pipeline's chest check.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as system_shm
from loguru import logger
from tritonclient.utils import InferenceServerException

from services.core.arrays import AnyArray, BprSlices, Float32Array, ModelInput
from services.core.body_part.bpr_detector import BodyPartRegressionModel
from services.core.config import InferenceSettings
from services.core.errors import ModelServerUnavailable
from services.core.inference.base import ModelOutputs, checked_model_input, model_outputs
from services.core.inference.body_part import SCORES_OUTPUT, SLICES_INPUT, body_part_model
from services.core.inference.triton_transport import TransferStats, choose_transport
from services.core.model_metadata import ModelMetadata, read_metadata
from services.core.retry import retrying

INPUT_NAME = "volume"
OUTPUT_NAMES = ("embedding", "pathology_probability", "finding_probabilities")
# gRPC's default receive limit is 4 MiB; a study is 221 MB. 2**31 - 1 is gRPC's maximum.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
# Idle regions kept per backend: one adapter thread reuses one for its volumes and one or
# two for body-part slices (4 slices of a long scan, fewer of a short one).
MAX_IDLE_REGIONS = 3
# gRPC status codes after which the same request may succeed later.
TRANSIENT_STATUSES = frozenset(
    {
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.ABORTED",
        "StatusCode.CANCELLED",
    }
)


def is_transient(error: InferenceServerException) -> bool:
    return str(error.status()) in TRANSIENT_STATUSES


def is_unknown_region(error: InferenceServerException) -> bool:
    """The server does not know the shared-memory region (it restarted since registering).
    Triton says "Unable to find shared memory region" (the wheel's server) or "Unable to
    find system shared memory region" (newer releases)."""
    message = str(error.message() or "").lower()
    return "unable to find" in message and "shared memory region" in message


@dataclass
class SharedMemoryRegion:
    """A POSIX shared-memory region registered with the server under ``name``."""

    name: str
    nbytes: int
    handle: Any

    @property
    def key(self) -> str:
        return "/" + self.name


class TritonBackend:
    """The InferenceBackend that sends each batch to Triton's ``chest_screening`` ensemble."""

    name = "triton"
    # The arithmetic is in Triton's process, on a GPU or on CPU cores. Where Triton shares
    # this host's cores it competes with work beside a request all the same (not measured).
    computes_on_this_cpu = False

    def __init__(
        self, settings: InferenceSettings, *, ready_timeout_s: float | None = None
    ) -> None:
        self.settings = settings
        self.url = settings.triton_url
        self.model_name = settings.triton_model
        self.timeout_s = float(settings.triton_timeout_s)
        self.metadata: ModelMetadata = read_metadata(settings.model_repository)
        self.transport = choose_transport(settings.triton_transport, self.url)
        self.stats = TransferStats()
        # Registered regions not in use, kept for the next request (at most
        # MAX_IDLE_REGIONS).
        self._idle_regions: list[SharedMemoryRegion] = []
        self._regions_lock = threading.Lock()
        self._client = grpcclient.InferenceServerClient(
            self.url,
            channel_args=[
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                # Triton's gRPC server (its defaults) counts a ping as a strike when no call
                # is open, or when it comes less than 5 minutes after the previous one while
                # no data flows, and after two strikes closes the connection (GOAWAY
                # "too_many_pings": seen in idle adapters with 30-second pings; by the same
                # rule a request computing for more than ~90 s could be cut). Ping rarely,
                # and only during calls.
                ("grpc.keepalive_time_ms", 330_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 0),
                ("grpc.http2.max_pings_without_data", 0),
                # After a server restart, reconnect within seconds (gRPC's default backoff
                # grows to two minutes).
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", 5000),
            ],
        )
        info = self.metadata.body_part_regression
        # Readiness covers every model the metadata promises.
        self._required_models = [self.model_name] + ([info.model] if info is not None else [])
        self.wait_until_ready(self.timeout_s if ready_timeout_s is None else ready_timeout_s)
        self.body_part_model = self._body_part_model()
        if self.transport == "shared_memory" and not self._shared_memory_works():
            if settings.triton_transport == "shared_memory":
                raise RuntimeError(
                    f"Triton at {self.url} cannot read this host's shared memory "
                    "(set inference.triton_transport to grpc or auto)"
                )
            logger.warning("Triton at {} cannot use shared memory: falling back to gRPC", self.url)
            self.transport = "grpc"
        logger.info(
            "triton backend ready: {} models {}, transport {}, demo weights {}",
            self.url,
            ", ".join(self._required_models),
            self.transport,
            self.metadata.demo,
        )

    def _body_part_model(self) -> BodyPartRegressionModel | None:
        """The served body-part regression model, when the metadata lists one."""
        info = self.metadata.body_part_regression
        if info is None:
            return None

        def score_batch(slices: BprSlices) -> AnyArray:
            result = self._request(info.model, SLICES_INPUT, slices, (SCORES_OUTPUT,))
            return result.as_numpy(SCORES_OUTPUT)

        return body_part_model(
            score_batch,
            self.settings.model_repository,
            info,
            source=f"triton {self.url} {info.model}",
        )

    # -- readiness -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        try:
            return bool(
                self._client.is_server_ready(client_timeout=5)
                and all(
                    self._client.is_model_ready(name, client_timeout=5)
                    for name in self._required_models
                )
            )
        except InferenceServerException:
            return False

    def wait_until_ready(self, timeout_s: float) -> None:
        """Poll until the server and its models are ready; ModelServerUnavailable on timeout."""

        def check() -> None:
            if not self.is_ready():
                raise ModelServerUnavailable(
                    f"Triton at {self.url} (models {', '.join(self._required_models)}) not "
                    f"ready after {timeout_s:.0f} s"
                )

        retrying(
            retry_on=ModelServerUnavailable,
            backoff=self.settings.triton_ready_backoff,
            give_up_after_s=timeout_s,
        )(check)

    def _shared_memory_works(self) -> bool:
        """Register a one-page region: fails when the server cannot see this host's /dev/shm."""
        name = f"cts_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        region = system_shm.create_shared_memory_region(name, "/" + name, 4096, create_only=True)
        try:
            self._client.register_system_shared_memory(name, "/" + name, 4096)
            self._client.unregister_system_shared_memory(name)
            return True
        except InferenceServerException as error:
            logger.debug("shared memory probe failed: {}", error)
            return False
        finally:
            system_shm.destroy_shared_memory_region(region)

    # -- inference -------------------------------------------------------------------------

    def _send(
        self, model: str, inputs: list[grpcclient.InferInput], outputs: tuple[str, ...]
    ) -> Any:
        try:
            return self._client.infer(
                model,
                inputs,
                outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as error:
            if is_transient(error):
                raise ModelServerUnavailable(f"Triton at {self.url}: {error}") from error
            raise

    def _request(
        self, model: str, input_name: str, array: Float32Array, outputs: tuple[str, ...]
    ) -> Any:
        """One float32 input to ``model`` by the chosen transport; the raw result."""
        started = time.perf_counter()
        if self.transport == "shared_memory":
            result = self._request_shared_memory(model, input_name, array, outputs)
            moved = {"shm": array.nbytes}
        else:
            tensor = grpcclient.InferInput(input_name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            result = self._send(model, [tensor], outputs)
            moved = {"grpc": array.nbytes}
        self.stats.add(
            **moved,
            response=_response_bytes(result, outputs),
            seconds=time.perf_counter() - started,
        )
        return result

    def _request_shared_memory(
        self, model: str, input_name: str, array: Float32Array, outputs: tuple[str, ...]
    ) -> Any:
        region = self._take_region(array.nbytes)
        reusable = False
        try:
            system_shm.set_shared_memory_region(region.handle, [array])
            tensor = grpcclient.InferInput(input_name, list(array.shape), "FP32")
            tensor.set_shared_memory(region.name, array.nbytes)
            try:
                result = self._send(model, [tensor], outputs)
            except InferenceServerException as error:
                if not is_unknown_region(error):
                    raise
                # The server restarted since this region was registered: register it again.
                logger.info(
                    "Triton forgot shared memory region {}: registering it again", region.name
                )
                self._register(region)
                result = self._send(model, [tensor], outputs)
            reusable = True
        finally:
            if reusable:
                self._give_back_region(region)
            else:  # the server may be gone or in an unknown state: do not reuse the region
                self._drop_region(region)
        return result

    def _take_region(self, nbytes: int) -> SharedMemoryRegion:
        """An idle registered region of exactly ``nbytes``, or a new one."""
        with self._regions_lock:
            for index, region in enumerate(self._idle_regions):
                if region.nbytes == nbytes:
                    return self._idle_regions.pop(index)
        # Named after this process: if it is killed, services/adapter/housekeeping.py finds
        # the region by its pid and removes it.
        name = f"cts_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        handle = system_shm.create_shared_memory_region(name, "/" + name, nbytes, create_only=True)
        region = SharedMemoryRegion(name=name, nbytes=nbytes, handle=handle)
        try:
            self._register(region)
        except BaseException:
            system_shm.destroy_shared_memory_region(handle)
            raise
        return region

    def _register(self, region: SharedMemoryRegion) -> None:
        try:
            self._client.register_system_shared_memory(region.name, region.key, region.nbytes)
        except InferenceServerException as error:
            if is_transient(error):
                raise ModelServerUnavailable(f"Triton at {self.url}: {error}") from error
            raise
        self.stats.add_registration()

    def _give_back_region(self, region: SharedMemoryRegion) -> None:
        with self._regions_lock:
            if len(self._idle_regions) < MAX_IDLE_REGIONS:
                self._idle_regions.append(region)
                return
        self._drop_region(region)

    def _drop_region(self, region: SharedMemoryRegion) -> None:
        try:
            self._unregister(region.name)
        finally:
            system_shm.destroy_shared_memory_region(region.handle)

    def _unregister(self, name: str) -> None:
        """Unregister a region; the server may still hold it for a moment after answering
        ("currently in use"), so retry briefly before giving up."""

        def attempt() -> None:
            try:
                self._client.unregister_system_shared_memory(name)
            except InferenceServerException as error:
                if is_transient(error):  # the server is gone: retrying here cannot help
                    raise ModelServerUnavailable(str(error)) from error
                raise

        try:
            retrying(
                retry_on=InferenceServerException,
                backoff=self.settings.shared_memory_release_backoff,
            )(attempt)
        except (InferenceServerException, ModelServerUnavailable) as error:
            # Server gone (it forgets regions when it restarts) or stuck: say so.
            logger.warning("could not unregister shared memory {}: {}", name, error)

    def infer(self, volume: ModelInput) -> ModelOutputs:
        volume = checked_model_input(volume, self.metadata)
        result = self._request(self.model_name, INPUT_NAME, volume, OUTPUT_NAMES)
        return model_outputs(
            *(result.as_numpy(name) for name in OUTPUT_NAMES),
            batch=volume.shape[0],
            metadata=self.metadata,
        )

    def close(self) -> None:
        with self._regions_lock:
            idle, self._idle_regions = self._idle_regions, []
        for region in idle:
            self._drop_region(region)
        self._client.close()


def _response_bytes(result: Any, outputs: tuple[str, ...]) -> int:
    return sum(int(result.as_numpy(name).nbytes) for name in outputs)
