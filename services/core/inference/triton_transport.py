"""How a model input travels to Triton: the transport choice and the bytes moved by each.

A full study is 221 MB as float32. When the server runs on this machine the volume goes
through POSIX shared memory (the request carries only a region name); otherwise it travels
in the gRPC request (benchmarks compare the two).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


@dataclass
class TransferStats:
    """Bytes moved between this client and the server, by path."""

    requests: int = 0
    regions_registered: int = 0  # shared-memory registrations (reused regions count once)
    grpc_request_bytes: int = 0  # tensor bytes inside gRPC requests
    shared_memory_bytes: int = 0  # tensor bytes written to shared memory regions
    response_bytes: int = 0  # output tensor bytes received
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, grpc: int = 0, shm: int = 0, response: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            self.requests += 1
            self.grpc_request_bytes += grpc
            self.shared_memory_bytes += shm
            self.response_bytes += response
            self.seconds += seconds

    def add_registration(self) -> None:
        with self._lock:
            self.regions_registered += 1

    def as_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "regions_registered": self.regions_registered,
            "grpc_request_bytes": self.grpc_request_bytes,
            "shared_memory_bytes": self.shared_memory_bytes,
            "response_bytes": self.response_bytes,
            "seconds": round(self.seconds, 4),
        }


def url_host(url: str) -> str:
    """The host part of ``host:port`` (``[::1]:8001`` included)."""
    if url.startswith("["):
        return url[: url.index("]") + 1]
    return url.rsplit(":", 1)[0] if ":" in url else url


def choose_transport(configured: str, url: str) -> str:
    """``shared_memory`` or ``grpc``; ``auto`` picks shared memory for a server on this host."""
    if configured == "auto":
        return "shared_memory" if url_host(url) in LOCAL_HOSTS else "grpc"
    return configured
