"""A paging system's webhook endpoint for the tests (tests/test_webhooks.py, the stack test):
a real HTTP server on 127.0.0.1 that checks each POST's HMAC-SHA256 signature. Not a test
module."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """A paging system's endpoint: checks the signature, keeps what it accepted, and answers
    503 to its first ``failures`` requests."""

    def __init__(self, key: str, failures: int = 0) -> None:
        self.key = key.encode()
        self.failures = failures
        self.requests = 0
        self.accepted: list[dict[str, object]] = []
        self.bad_signatures = 0
        self.deliveries: list[str] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(receiver.key, body, hashlib.sha256).hexdigest()
                receiver.requests += 1
                if not hmac.compare_digest(expected, self.headers.get("X-CTS-Signature", "")):
                    receiver.bad_signatures += 1
                    status = 401
                elif receiver.requests <= receiver.failures:
                    status = 503
                else:
                    receiver.accepted.append(json.loads(body))
                    receiver.deliveries.append(self.headers["X-CTS-Delivery"])
                    status = 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        return Handler


@contextmanager
def serving(receiver: Receiver, port: int) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", port), receiver.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/hooks/ct?token=x"
    finally:
        server.shutdown()
        server.server_close()
