"""Who is asking, for every request of the web server: a browser's session cookie or a
system's API key, resolved through the registry (services/registry/accounts.py) and cached
for a few seconds, so that a page polling every second does not cost a database round trip
per poll. A disabled user or a revoked key is out within ``CACHE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar, cast

from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from services.core.access import Principal, PrincipalKind, Role
from services.core.config import Settings
from services.registry import Registry
from services.registry.accounts import ActiveSession, SignIn, SignInPolicy, SignInVerdict, sha256
from services.registry.audit import ActorKind, AuditAction, AuditEntry

CACHE_SECONDS = 5.0
STALE_SECONDS = 300.0
LONGEST_FAILURE_DELAY_S = 16.0
# Without sign-in (frontend.sign_in: false) everybody is this one open principal.
OPEN_PRINCIPAL = Principal(name="anyone", role=Role.RADIOLOGIST, kind=PrincipalKind.OPEN)

T = TypeVar("T")
ACTOR_KINDS = {
    PrincipalKind.USER: ActorKind.USER,
    PrincipalKind.KEY: ActorKind.KEY,
    PrincipalKind.OPEN: ActorKind.ANONYMOUS,
}


class _Cache:
    """token hash -> (what it resolved to, when); None answers are cached too (a burst of
    requests with a wrong key costs one lookup). While the database cannot be reached, an
    answer up to ``STALE_SECONDS`` old still counts: a restart of the database does not sign
    the department out."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[object, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: str, *, within_s: float) -> tuple[bool, object]:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[1] > within_s:
            return False, None
        return True, entry[0]

    def put(self, key: str, value: object) -> None:
        with self._lock:
            if len(self._entries) > 10_000:  # a flood of made-up tokens cannot grow it forever
                self._entries.clear()
            self._entries[key] = (value, time.monotonic())

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def lookup(self, key: str, resolve: Callable[[], T]) -> T | None:
        found, cached = self.get(key, within_s=CACHE_SECONDS)
        if found:
            return cast("T | None", cached)
        try:
            value = resolve()
        except SQLAlchemyError:
            found, cached = self.get(key, within_s=STALE_SECONDS)
            if found:
                return cast("T | None", cached)
            raise
        self.put(key, value)
        return value


class AccessControl:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        frontend = settings.frontend
        self.sign_in_required = frontend.sign_in
        self.idle = timedelta(minutes=frontend.session_idle_minutes)
        self.policy = SignInPolicy(
            lockout_after=frontend.lockout_after_failures,
            lockout_minutes=frontend.lockout_minutes,
        )
        self._sessions = _Cache()
        self._keys = _Cache()

    # -- who is asking --------------------------------------------------------------------

    def session(self, token: str) -> ActiveSession | None:
        """Raises SQLAlchemyError when the database is away and nothing recent is cached."""
        return self._sessions.lookup(
            sha256(token), lambda: self.registry.accounts.active_session(token, self.idle)
        )

    def key_holder(self, api_key: str) -> Principal | None:
        return self._keys.lookup(
            sha256(api_key), lambda: self.registry.accounts.key_holder(api_key)
        )

    def forget_session(self, token: str) -> None:
        self._sessions.drop(sha256(token))

    # -- signing in -------------------------------------------------------------------------

    async def verify_password(self, name: str, password: str, client: str) -> SignIn:
        """A local sign-in, audited; a failure answers only after a delay that doubles with
        each failure of the account in a row (argon2 runs in a thread: the server stays
        responsive)."""
        verdict = await asyncio.to_thread(
            self.registry.accounts.verify_password, name, password, self.policy
        )
        action = {
            SignInVerdict.OK: AuditAction.SIGN_IN,
            SignInVerdict.LOCKED: AuditAction.SIGN_IN_LOCKED,
        }.get(verdict.verdict, AuditAction.SIGN_IN_FAILED)
        kind = ActorKind.USER if verdict.verdict is SignInVerdict.OK else ActorKind.ANONYMOUS
        await asyncio.to_thread(
            self.audit_entry,
            AuditEntry(
                actor=name[:128], actor_kind=kind, action=action, client=client, detail="password"
            ),
        )
        if verdict.verdict is not SignInVerdict.OK:
            await asyncio.sleep(self.failure_delay(verdict.failures))
        return verdict

    def failure_delay(self, failures: int) -> float:
        base = self.settings.frontend.failed_sign_in_delay_s
        return min(LONGEST_FAILURE_DELAY_S, base * 2 ** max(0, failures - 1))

    # -- the audit trail ------------------------------------------------------------------

    def audit_entry(self, entry: AuditEntry) -> None:
        """Written before the answer goes out; a failed write is logged (without identity) and
        the request still answered: a database outage must not lock radiologists out of the
        worklist. The log line names the action and actor for a later reconciliation."""
        try:
            self.registry.audit.record(entry)
        except SQLAlchemyError as error:
            logger.error(
                "audit row not written ({}): {} by {}",
                type(error).__name__,
                entry.action.value,
                entry.actor,
            )

    def audit(
        self,
        principal: Principal,
        action: AuditAction,
        client: str | None,
        *,
        task_id: str | None = None,
        study_instance_uid: str | None = None,
        detail: str = "",
    ) -> None:
        self.audit_entry(
            AuditEntry(
                actor=principal.name,
                actor_kind=ACTOR_KINDS[principal.kind],
                action=action,
                task_id=task_id,
                study_instance_uid=study_instance_uid,
                client=client,
                detail=detail,
            )
        )
