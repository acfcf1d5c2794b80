"""The one door in front of every route of the web server (the page, Gradio's own routes,
the REST API, the study files): it names who is asking and turns away whoever is not
signed in, before any route runs.

* A browser: the ``cts_session`` cookie (HttpOnly, SameSite=Strict, Secure under HTTPS).
  A request that changes something (any method but GET/HEAD/OPTIONS) must also carry the
  session's CSRF token in ``X-CSRF-Token`` (the page's script adds it to every request of
  its own origin, csrf.js) and must not come from another origin.
* A system: ``Authorization: Bearer <API key>``; no cookie, so no CSRF check.
* Nobody: a page request is sent to the sign-in page, anything else gets 401.

Only ``PUBLIC_PATHS`` answer without sign-in; a test walks every route to hold that.
With ``frontend.sign_in: false`` everybody is the open principal (the page says so in red).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from urllib.parse import quote, urlsplit

from loguru import logger
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from services.core.access import Principal
from services.frontend.auth.access import OPEN_PRINCIPAL, AccessControl

SESSION_COOKIE = "cts_session"
CSRF_COOKIE = "cts_csrf"  # readable by the page's script, which echoes it in the header
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SIGN_IN_PATH = "/sign-in"
PUBLIC_PATHS = frozenset(
    {
        SIGN_IN_PATH,
        "/healthz",  # start.sh and load balancers: says "ok", nothing else
        "/auth/oidc/start",
        "/auth/oidc/callback",
        "/api/v1/openapi.json",  # the REST API's schema: no study in it
        "/api/v1/docs",
    }
)


class Refusal(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def principal_of(connection: HTTPConnection) -> Principal | None:
    """Who the gate let in (None only on public paths)."""
    principal = connection.scope.get("state", {}).get("principal")
    return principal if isinstance(principal, Principal) else None


def client_address(connection: HTTPConnection) -> str | None:
    return connection.client.host if connection.client else None


class AccessGate:
    def __init__(self, app: ASGIApp, access: AccessControl) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        public = scope["path"] in PUBLIC_PATHS
        try:
            principal, csrf = await self._admit(connection, public=public)
        except Refusal as refusal:
            await self._refuse(scope, send, connection, refusal)
            return
        except SQLAlchemyError as error:  # the registry is away and nothing recent is cached
            logger.warning("sign-in not checked: {}", type(error).__name__)
            if public:  # the sign-in page itself says it cannot sign anyone in now
                await self.app(scope, receive, send)
                return
            await self._refuse(
                scope, send, connection, Refusal(503, "accounts cannot be checked right now")
            )
            return
        state = scope.setdefault("state", {})
        state["principal"], state["csrf_token"] = principal, csrf
        await self.app(scope, receive, send)

    async def _admit(
        self, connection: HTTPConnection, *, public: bool
    ) -> tuple[Principal | None, str | None]:
        try:
            principal, csrf = await self._who(connection)
        except Refusal:
            if public:  # a wrong key does not close the sign-in page or the schema
                return None, None
            raise
        if not public:
            self._check(connection, principal, csrf)
        return principal, csrf

    async def _who(self, connection: HTTPConnection) -> tuple[Principal | None, str | None]:
        if not self.access.sign_in_required:
            return OPEN_PRINCIPAL, None
        scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials:
            holder = await asyncio.to_thread(self.access.key_holder, credentials.strip())
            if holder is None:
                raise Refusal(401, "the API key is unknown or revoked")
            return holder, None
        token = connection.cookies.get(SESSION_COOKIE)
        if not token:
            return None, None
        active = await asyncio.to_thread(self.access.session, token)
        if active is None:
            return None, None
        return active.principal, active.csrf_token

    def _check(
        self, connection: HTTPConnection, principal: Principal | None, csrf: str | None
    ) -> None:
        if principal is None:
            raise Refusal(401, "sign in first")
        method = connection.scope.get("method", "GET")
        if method in SAFE_METHODS or csrf is None:
            return
        origin = connection.headers.get("origin")
        if origin and urlsplit(origin).netloc != connection.headers.get("host"):
            raise Refusal(403, "a request from another site")
        if connection.headers.get("sec-fetch-site") == "cross-site":
            raise Refusal(403, "a request from another site")
        given = connection.headers.get(CSRF_HEADER, "")
        if not secrets.compare_digest(given.encode(), csrf.encode()):
            raise Refusal(403, "the page's CSRF token is missing or wrong; reload the page")

    async def _refuse(
        self, scope: Scope, send: Send, connection: HTTPConnection, refusal: Refusal
    ) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.reason})
            return
        wants_page = (
            refusal.status == 401
            and scope.get("method") == "GET"
            and not scope["path"].startswith("/api/")
            and "text/html" in connection.headers.get("accept", "")
        )
        root = scope.get("root_path", "")
        if wants_page:
            target = scope["path"] + (
                f"?{scope['query_string'].decode()}" if scope.get("query_string") else ""
            )
            location = f"{root}{SIGN_IN_PATH}?next={quote(target, safe='')}"
            headers = [(b"location", location.encode()), (b"cache-control", b"no-store")]
            await send({"type": "http.response.start", "status": 303, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = json.dumps({"reason": refusal.reason}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if refusal.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="chest-ct-screening"'))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
