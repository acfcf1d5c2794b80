"""One size limit for every request body of the web server (the page's uploads and the REST
API's), enforced before the body is read, and a deadline for a body that stops arriving.

* A declared Content-Length over ``frontend.max_upload_mb`` gets 413 at once; the body is
  never read and the connection is closed.
* A body without a length (chunked) is counted as it arrives and cut off at the limit (413).
* A body that stalls for ``frontend.upload_stall_timeout_s`` is dropped (408): a client
  cannot hold a worker and a connection open by sending nothing.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Multipart framing around a file of exactly the limit.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


async def reply(send: Send, status: int, reason: str) -> None:
    body = json.dumps({"reason": reason}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class UploadLimit:
    def __init__(self, app: ASGIApp, *, max_upload_mb: int, stall_timeout_s: float) -> None:
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.limit_bytes = max_upload_mb * 1024 * 1024 + MULTIPART_OVERHEAD_BYTES
        self.stall_timeout_s = stall_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = f"the upload is over the {self.max_upload_mb} MB limit"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit_bytes:
            await reply(send, 413, too_large)
            return
        watch = _BodyWatch(receive, send, self.limit_bytes, self.stall_timeout_s, too_large)
        try:
            await self.app(scope, watch.receive, watch.send)
        except Exception:
            if watch.refusal is None:
                raise
        if watch.refusal is not None and not watch.started:
            await reply(send, *watch.refusal)


class _BodyWatch:
    """One request's body as the app reads it: counted, with a deadline per chunk."""

    def __init__(
        self, receive: Receive, send: Send, limit_bytes: int, stall_timeout_s: float, too_large: str
    ) -> None:
        self._receive, self._send = receive, send
        self.limit_bytes, self.stall_timeout_s, self.too_large = (
            limit_bytes,
            stall_timeout_s,
            too_large,
        )
        self.received = 0
        self.body_done = False
        self.refusal: tuple[int, str] | None = None
        self.started = False

    async def receive(self) -> Message:
        if self.body_done:  # afterwards only a disconnect can come: no deadline on it
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self.stall_timeout_s)
        except TimeoutError:
            self.refusal = (408, f"the upload stalled for {self.stall_timeout_s:g} s")
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
            if self.received > self.limit_bytes:
                self.refusal = (413, self.too_large)
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.refusal is not None and not self.started:
            return  # the app's answer to a body it never got is replaced by ours
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)
