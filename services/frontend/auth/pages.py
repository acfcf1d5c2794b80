"""Signing in and out: the sign-in page (local accounts), single sign-on (OIDC), sign-out,
and the health check, the only routes the gate lets anybody reach (gate.PUBLIC_PATHS).

A successful sign-in opens a session in the registry and sets two cookies: ``cts_session``
(HttpOnly: the page's scripts never see it) and ``cts_csrf`` (readable: csrf.js echoes it in
``X-CSRF-Token``); both SameSite=Strict, Secure under HTTPS, ending with the browser.
"""

from __future__ import annotations

import asyncio
import html
import secrets
from pathlib import Path
from string import Template
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from services.core.access import Principal, PrincipalKind, Role
from services.core.config.services import OidcSettings
from services.frontend.auth.access import AccessControl
from services.frontend.auth.gate import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    SIGN_IN_PATH,
    client_address,
    principal_of,
)
from services.frontend.auth.oidc import oidc_client, role_from_claims, username_from_claims
from services.registry.accounts import SignIn, SignInVerdict
from services.registry.audit import ActorKind, AuditAction, AuditEntry

SIGN_IN_FORM_COOKIE = "cts_sign_in"  # the sign-in form's own CSRF token (no session yet)
PAGE = Template((Path(__file__).parents[1] / "static" / "sign_in.html").read_text("utf-8"))
MESSAGES = {
    SignInVerdict.WRONG: "The user name or the password is wrong.",
    SignInVerdict.DISABLED: "This account is disabled; ask an administrator.",
}


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path of this site only (never //host or a URL)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def sign_in_page(
    *, csrf: str, next_path: str, message: str = "", username: str = "", sso: str | None = None
) -> str:
    """The page, every value escaped (a user name typed is shown back as text)."""
    notice = f'<div class="message" role="alert">{html.escape(message)}</div>' if message else ""
    button = ""
    if sso is not None:
        target = "auth/oidc/start?next=" + html.escape(next_path, quote=True)
        button = f'<div class="or">or</div><a class="sso" href="{target}">{html.escape(sso)}</a>'
    return PAGE.substitute(
        message=notice,
        action="sign-in",
        csrf=html.escape(csrf, quote=True),
        next=html.escape(next_path, quote=True),
        username=html.escape(username, quote=True),
        sso=button,
    )


def _cookie_options(request: Request) -> dict[str, Any]:
    return {
        "httponly": True,
        "samesite": "strict",
        "secure": request.url.scheme == "https",
        "path": "/",
    }


class AuthPages:
    """The routes' handlers over one AccessControl (and the OIDC client, when configured)."""

    def __init__(self, access: AccessControl, oidc: OidcSettings | None) -> None:
        self.access = access
        self.oidc = oidc
        self.client = oidc_client(oidc) if oidc is not None else None

    def form(
        self, request: Request, next_path: str, message: str, username: str, status: int
    ) -> Response:
        token = secrets.token_urlsafe(24)
        page = sign_in_page(
            csrf=token,
            next_path=next_path,
            message=message,
            username=username,
            sso=self.oidc.button_label if self.oidc is not None else None,
        )
        response = HTMLResponse(page, status_code=status, headers={"cache-control": "no-store"})
        response.set_cookie(SIGN_IN_FORM_COOKIE, token, **_cookie_options(request))
        return response

    def signed_in(self, request: Request, principal: Principal, next_path: str) -> Response:
        opened = self.access.registry.accounts.open_session(
            principal.name, client_address(request) or ""
        )
        # A page (not a redirect) moves on: after a provider's cross-site redirect, only a
        # navigation our own page starts carries SameSite=Strict cookies.
        target = html.escape(safe_next(next_path), quote=True)
        page = (
            f'<!doctype html><meta http-equiv="refresh" content="0;url={target}">'
            f'<title>Signed in</title><a href="{target}">Continue</a>'
        )
        response = HTMLResponse(page, headers={"cache-control": "no-store"})
        options = _cookie_options(request)
        response.set_cookie(SESSION_COOKIE, opened.token, **options)
        response.set_cookie(CSRF_COOKIE, opened.csrf_token, **{**options, "httponly": False})
        response.delete_cookie(SIGN_IN_FORM_COOKIE, path="/")
        return response

    def healthz(self) -> PlainTextResponse:
        return PlainTextResponse("ok")

    def sign_in_form(self, request: Request, next: str = "/") -> Response:
        if not self.access.sign_in_required:
            return RedirectResponse(safe_next(next), status_code=303)
        return self.form(request, safe_next(next), "", "", 200)

    async def sign_in(
        self,
        request: Request,
        username: Annotated[str, Form(max_length=128)],
        password: Annotated[str, Form(max_length=1024)],
        csrf_token: Annotated[str, Form(max_length=128)] = "",
        next: Annotated[str, Form(max_length=2048)] = "/",
    ) -> Response:
        next_path = safe_next(next)
        expected = request.cookies.get(SIGN_IN_FORM_COOKIE, "")
        if not expected or not secrets.compare_digest(expected.encode(), csrf_token.encode()):
            return self.form(request, next_path, "The form expired; please sign in again.", "", 403)
        try:
            verdict = await self.access.verify_password(
                username.strip(), password, client_address(request) or ""
            )
        except SQLAlchemyError as error:
            logger.error("sign-in impossible: {}", type(error).__name__)
            message = "Accounts cannot be checked right now; please try again in a minute."
            return self.form(request, next_path, message, username, 503)
        if verdict.verdict is SignInVerdict.LOCKED:
            message = (
                "Too many failed sign-ins: this account is locked for "
                f"{self.access.policy.lockout_minutes:g} minutes (an administrator can unlock "
                "it by resetting the password)."
            )
            return self.form(request, next_path, message, username, 429)
        if verdict.verdict is not SignInVerdict.OK or verdict.account is None:
            return self.form(request, next_path, MESSAGES[verdict.verdict], username, 401)
        account = verdict.account
        principal = Principal(name=account.name, role=account.role, kind=PrincipalKind.USER)
        return await asyncio.to_thread(self.signed_in, request, principal, next_path)

    def sign_out(self, request: Request) -> Response:
        principal = principal_of(request)
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            self.access.registry.accounts.close_session(token)
            self.access.forget_session(token)
        if principal is not None and principal.kind is PrincipalKind.USER:
            self.access.audit(principal, AuditAction.SIGN_OUT, client_address(request))
        response = JSONResponse({"signed_out": True}, headers={"cache-control": "no-store"})
        for name in (SESSION_COOKIE, CSRF_COOKIE):
            response.delete_cookie(name, path="/")
        return response

    async def oidc_start(self, request: Request, next: str = "/") -> Response:
        if self.client is None:
            return self.form(request, "/", "Single sign-on is not configured.", "", 404)
        request.session["next"] = safe_next(next)
        redirect_uri = str(request.url_for("oidc_callback"))
        response: Response = await self.client.authorize_redirect(request, redirect_uri)
        return response

    async def oidc_callback(self, request: Request) -> Response:
        if self.client is None or self.oidc is None:
            return self.form(request, "/", "Single sign-on is not configured.", "", 404)
        next_path = safe_next(request.session.pop("next", "/"))
        try:
            token = await self.client.authorize_access_token(request)
        except Exception as error:  # noqa: BLE001 - any failure of the provider's answer refuses
            logger.warning("OIDC sign-in refused: {}", type(error).__name__)
            return self.form(
                request, next_path, "Single sign-on failed; please try again.", "", 401
            )
        claims = dict(token.get("userinfo") or {})
        name = username_from_claims(claims, self.oidc)
        role = role_from_claims(claims, self.oidc)
        verdict = None
        if name is not None and role is not None:
            verdict = await asyncio.to_thread(
                self.access.registry.accounts.oidc_sign_in, name, role
            )
        admitted = verdict is not None and verdict.verdict is SignInVerdict.OK
        why = "oidc" if admitted else self._oidc_refusal(name, role, verdict)
        await asyncio.to_thread(
            self.access.audit_entry,
            AuditEntry(
                actor=(name or "unnamed")[:128],
                actor_kind=ActorKind.USER if admitted else ActorKind.ANONYMOUS,
                action=AuditAction.SIGN_IN if admitted else AuditAction.SIGN_IN_FAILED,
                client=client_address(request) or "",
                detail=why,
            ),
        )
        if not admitted or name is None or role is None:
            return self.form(request, next_path, OIDC_MESSAGES[why], "", 403)
        principal = Principal(name=name, role=role, kind=PrincipalKind.USER)
        return await asyncio.to_thread(self.signed_in, request, principal, next_path)

    @staticmethod
    def _oidc_refusal(name: str | None, role: Role | None, verdict: SignIn | None) -> str:
        if name is None:
            return "oidc: no user name"
        if role is None:
            return "oidc: no role for this account"
        return "oidc: account disabled"


OIDC_MESSAGES = {
    "oidc: no user name": "The hospital's sign-in did not name you; ask an administrator.",
    "oidc: no role for this account": (
        "Your hospital account has no role in this system; ask an administrator."
    ),
    "oidc: account disabled": MESSAGES[SignInVerdict.DISABLED],
}


def build_auth_router(access: AccessControl, oidc: OidcSettings | None) -> APIRouter:
    pages = AuthPages(access, oidc)
    router = APIRouter(include_in_schema=False)
    router.add_api_route("/healthz", pages.healthz, methods=["GET"])
    router.add_api_route(SIGN_IN_PATH, pages.sign_in_form, methods=["GET"])
    router.add_api_route(SIGN_IN_PATH, pages.sign_in, methods=["POST"])
    router.add_api_route("/sign-out", pages.sign_out, methods=["POST"])
    if oidc is not None:
        router.add_api_route("/auth/oidc/start", pages.oidc_start, methods=["GET"])
        router.add_api_route(
            "/auth/oidc/callback", pages.oidc_callback, methods=["GET"], name="oidc_callback"
        )
    return router
