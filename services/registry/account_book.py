"""The registry's accounts and audit trail as the services use them: each call one
transaction (``Registry.accounts``, ``Registry.audit``).

    registry.accounts.add_user("jdoe", Role.RADIOLOGIST, password="...")
    verdict = registry.accounts.verify_password("jdoe", "...", policy)
    registry.audit.record(AuditEntry(actor="jdoe", actor_kind=ActorKind.USER, ...))
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session

from services.core.access import Principal, Role
from services.registry import accounts, audit
from services.registry.accounts import (
    ActiveSession,
    KeyAccount,
    OpenedSession,
    SignIn,
    SignInPolicy,
    UserAccount,
)
from services.registry.audit import AuditEntry, AuditQuery

T = TypeVar("T")
Read = Callable[[], AbstractContextManager[Session]]


class Write(Protocol):
    """The registry's one-transaction write (``Registry._write``)."""

    def __call__(self, change: Callable[[Session, datetime], T], /) -> T: ...


def with_audit(
    change: Callable[[Session, datetime], T], entry: AuditEntry | None
) -> Callable[[Session, datetime], T]:
    """The change and its audit row in one transaction: a change is never made without its
    row, and a refused one (no such user or key) writes none."""

    def both(session: Session, now: datetime) -> T:
        done = change(session, now)
        if entry is not None:
            audit.record(session, entry, now)
        return done

    return both


class AccountBook:
    def __init__(self, write: Write, reading: Read) -> None:
        self._write = write
        self._reading = reading

    def add_user(
        self, name: str, role: Role, *, password: str | None, audited: AuditEntry | None = None
    ) -> UserAccount:
        return self._write(
            with_audit(lambda s, now: accounts.add_user(s, name, role, password, now), audited)
        )

    def users(self) -> list[UserAccount]:
        with self._reading() as session:
            return accounts.users(session)

    def user(self, name: str) -> UserAccount | None:
        with self._reading() as session:
            return accounts.user(session, name)

    def set_disabled(self, name: str, disabled: bool, *, audited: AuditEntry | None = None) -> None:
        self._write(
            with_audit(lambda s, now: accounts.set_disabled(s, name, disabled, now), audited)
        )

    def reset_password(
        self, name: str, password: str, *, audited: AuditEntry | None = None
    ) -> None:
        self._write(
            with_audit(lambda s, now: accounts.reset_password(s, name, password, now), audited)
        )

    def set_role(self, name: str, role: Role, *, audited: AuditEntry | None = None) -> None:
        self._write(with_audit(lambda s, now: accounts.set_role(s, name, role, now), audited))

    def verify_password(self, name: str, password: str, policy: SignInPolicy) -> SignIn:
        return self._write(lambda s, now: accounts.verify_password(s, name, password, policy, now))

    def oidc_sign_in(self, name: str, role: Role) -> SignIn:
        return self._write(lambda s, now: accounts.oidc_sign_in(s, name, role, now))

    def add_key(self, name: str, role: Role, *, audited: AuditEntry | None = None) -> str:
        return self._write(with_audit(lambda s, now: accounts.add_key(s, name, role, now), audited))

    def api_keys(self) -> list[KeyAccount]:
        with self._reading() as session:
            return accounts.api_keys(session)

    def revoke_key(self, name: str, *, audited: AuditEntry | None = None) -> None:
        self._write(with_audit(lambda s, now: accounts.revoke_key(s, name, now), audited))

    def key_holder(self, key: str) -> Principal | None:
        return self._write(lambda s, now: accounts.key_holder(s, key, now))

    def open_session(self, name: str, client: str) -> OpenedSession:
        return self._write(lambda s, now: accounts.open_session(s, name, client, now))

    def active_session(self, token: str, idle: timedelta) -> ActiveSession | None:
        return self._write(lambda s, now: accounts.active_session(s, token, idle, now))

    def close_session(self, token: str) -> str | None:
        return self._write(lambda s, _now: accounts.close_session(s, token))

    def forget_idle_sessions(self, idle: timedelta) -> int:
        return self._write(lambda s, now: accounts.forget_idle_sessions(s, idle, now))


class AuditTrail:
    def __init__(self, write: Write, reading: Read) -> None:
        self._write = write
        self._reading = reading

    def record(self, entry: AuditEntry) -> None:
        self._write(lambda s, now: audit.record(s, entry, now))

    def events(self, query: AuditQuery) -> list[AuditEntry]:
        with self._reading() as session:
            return audit.events(session, query)
