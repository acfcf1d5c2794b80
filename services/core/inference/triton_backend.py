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
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as system_shm
from loguru import logger
from tenacity import stop_after_attempt
from tritonclient.utils import InferenceServerException

from services.core.config import InferenceSettings
from services.core.errors import ModelServerUnavailable
from services.core.inference.base import ModelOutputs, checked_model_input, model_outputs
from services.core.inference.triton_transport import TransferStats, choose_transport
from services.core.model_metadata import ModelMetadata, read_metadata
from services.core.retry import retrying

INPUT_NAME = "volume"
OUTPUT_NAMES = ("embedding", "pathology_probability", "finding_probabilities")
# gRPC's default receive limit is 4 MiB; a study is 221 MB. 2**31 - 1 is gRPC's maximum.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
MAX_IDLE_REGIONS = 2
UNREGISTER_ATTEMPTS = 8
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
        # MAX_IDLE_REGIONS; one adapter thread needs one).
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
        self.wait_until_ready(self.timeout_s if ready_timeout_s is None else ready_timeout_s)
        if self.transport == "shared_memory" and not self._shared_memory_works():
            if settings.triton_transport == "shared_memory":
                raise RuntimeError(
                    f"Triton at {self.url} cannot read this host's shared memory "
                    "(set inference.triton_transport to grpc or auto)"
                )
            logger.warning("Triton at {} cannot use shared memory: falling back to gRPC", self.url)
            self.transport = "grpc"
        logger.info(
            "triton backend ready: {} model {}, transport {}, demo weights {}",
            self.url,
            self.model_name,
            self.transport,
            self.metadata.demo,
        )

    # -- readiness -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        try:
            return bool(
                self._client.is_server_ready(client_timeout=5)
                and self._client.is_model_ready(self.model_name, client_timeout=5)
            )
        except InferenceServerException:
            return False

    def wait_until_ready(self, timeout_s: float) -> None:
        """Poll until the server and the ensemble are ready; ModelServerUnavailable on timeout."""

        def check() -> None:
            if not self.is_ready():
                raise ModelServerUnavailable(
                    f"Triton at {self.url} (model {self.model_name}) not ready after "
                    f"{timeout_s:.0f} s"
                )

        retrying(
            retry_on=ModelServerUnavailable, initial_s=0.2, maximum_s=5.0, give_up_after_s=timeout_s
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

    def _outputs(self) -> list[grpcclient.InferRequestedOutput]:
        return [grpcclient.InferRequestedOutput(name) for name in OUTPUT_NAMES]

    def _send(self, inputs: list[grpcclient.InferInput]) -> Any:
        try:
            return self._client.infer(
                self.model_name,
                inputs,
                outputs=self._outputs(),
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as error:
            if is_transient(error):
                raise ModelServerUnavailable(f"Triton at {self.url}: {error}") from error
            raise

    def _infer_grpc(self, volume: np.ndarray) -> Any:
        tensor = grpcclient.InferInput(INPUT_NAME, list(volume.shape), "FP32")
        tensor.set_data_from_numpy(volume)
        started = time.perf_counter()
        result = self._send([tensor])
        self.stats.add(
            grpc=volume.nbytes,
            response=_response_bytes(result),
            seconds=time.perf_counter() - started,
        )
        return result

    def _infer_shared_memory(self, volume: np.ndarray) -> Any:
        started = time.perf_counter()
        region = self._take_region(volume.nbytes)
        reusable = False
        try:
            system_shm.set_shared_memory_region(region.handle, [volume])
            tensor = grpcclient.InferInput(INPUT_NAME, list(volume.shape), "FP32")
            tensor.set_shared_memory(region.name, volume.nbytes)
            try:
                result = self._send([tensor])
            except InferenceServerException as error:
                if not is_unknown_region(error):
                    raise
                # The server restarted since this region was registered: register it again.
                logger.info(
                    "Triton forgot shared memory region {}: registering it again", region.name
                )
                self._register(region)
                result = self._send([tensor])
            reusable = True
        finally:
            if reusable:
                self._give_back_region(region)
            else:  # the server may be gone or in an unknown state: do not reuse the region
                self._drop_region(region)
        self.stats.add(
            shm=volume.nbytes,
            response=_response_bytes(result),
            seconds=time.perf_counter() - started,
        )
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
                initial_s=0.01,
                maximum_s=1.0,
                stop=stop_after_attempt(UNREGISTER_ATTEMPTS),
            )(attempt)
        except (InferenceServerException, ModelServerUnavailable) as error:
            # Server gone (it forgets regions when it restarts) or stuck: say so.
            logger.warning("could not unregister shared memory {}: {}", name, error)

    def infer(self, volume: np.ndarray) -> ModelOutputs:
        volume = checked_model_input(volume, self.metadata)
        if self.transport == "shared_memory":
            result = self._infer_shared_memory(volume)
        else:
            result = self._infer_grpc(volume)
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


def _response_bytes(result: Any) -> int:
    return sum(int(result.as_numpy(name).nbytes) for name in OUTPUT_NAMES)
