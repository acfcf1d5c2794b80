"""Who may come in: users (local accounts with an argon2id hash, or named by an OIDC
provider), API keys for systems, and signed-in browser sessions.

Secrets are never stored: a key and a session token are random (256 bits) and only their
SHA-256 is kept, which is enough for a value nobody can guess (a password needs argon2's
slowness; a random key does not). Failed sign-ins count per account; after
``SignInPolicy.lockout_after`` of them the account is locked for ``lockout_minutes``, and
each failure before that answers later than the one before (the frontend waits
``failure_delay_s``), so guessing is slow at once and stopped soon.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from enum import Enum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel, ConfigDict
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from services.core.access import Principal, PrincipalKind, Role
from services.registry.models import ApiKey, User, WebSession

KEY_PREFIX = "cts_"  # an API key says what it is (secret scanners look for such prefixes)
TOKEN_BYTES = 32
NAME_CHARACTERS = 128
MIN_PASSWORD_CHARACTERS = 12  # NIST SP 800-63B asks for at least 8; a reading room shares PCs
_HASHER = PasswordHasher()  # argon2id with the library's current recommended cost


class AccountError(ValueError):
    """A change that cannot be made (an unknown name, a name taken): said in one line."""


class UserSource(str, Enum):
    LOCAL = "local"
    OIDC = "oidc"


class UserAccount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Role
    source: UserSource
    disabled: bool
    locked_until: datetime | None
    last_sign_in_at: datetime | None
    created_at: datetime


class KeyAccount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class SignInPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lockout_after: int = 5
    lockout_minutes: float = 15.0


class SignInVerdict(str, Enum):
    OK = "ok"
    WRONG = "wrong"  # unknown name, wrong password, or an OIDC account's name
    LOCKED = "locked"
    DISABLED = "disabled"


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: SignInVerdict
    failures: int = 0  # consecutive failures of the account, this one included
    account: UserAccount | None = None


class OpenedSession(BaseModel):
    """A new browser session: the cookie's token and the page's CSRF token (shown once)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str
    csrf_token: str


class ActiveSession(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    principal: Principal
    csrf_token: str


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARACTERS:
        raise AccountError(f"a password has at least {MIN_PASSWORD_CHARACTERS} characters")
    return _HASHER.hash(password)


def new_secret() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def _account(row: User) -> UserAccount:
    """The account of a row: its columns of the same names (role and source as enums)."""
    return UserAccount.model_validate(row, from_attributes=True)


def _user(session: Session, name: str) -> User:
    row = session.scalar(select(User).where(User.name == name))
    if row is None:
        raise AccountError(f"no user named {name!r}")
    return row


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > NAME_CHARACTERS or any(ch.isspace() for ch in name):
        raise AccountError("a name is 1 to 128 characters without spaces")
    return name


# -- users ------------------------------------------------------------------------------------


def add_user(
    session: Session, name: str, role: Role, password: str | None, now: datetime
) -> UserAccount:
    """A local account (with a password) or an OIDC one (``password=None``)."""
    name = _check_name(name)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AccountError(f"a user named {name!r} exists")
    row = User(
        name=name,
        role=role.value,
        source=(UserSource.LOCAL if password is not None else UserSource.OIDC).value,
        password_hash=hash_password(password) if password is not None else None,
        disabled=False,
        failed_sign_ins=0,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return _account(row)


def users(session: Session) -> list[UserAccount]:
    return [_account(row) for row in session.scalars(select(User).order_by(User.name))]


def user(session: Session, name: str) -> UserAccount | None:
    row = session.scalar(select(User).where(User.name == name))
    return _account(row) if row is not None else None


def set_disabled(session: Session, name: str, disabled: bool, now: datetime) -> None:
    row = _user(session, name)
    row.disabled, row.updated_at = disabled, now
    if disabled:  # a disabled user is signed out everywhere at once
        session.execute(delete(WebSession).where(WebSession.user_name == name))


def reset_password(session: Session, name: str, password: str, now: datetime) -> None:
    row = _user(session, name)
    row.password_hash = hash_password(password)
    row.source = UserSource.LOCAL.value
    row.failed_sign_ins, row.locked_until, row.updated_at = 0, None, now
    session.execute(delete(WebSession).where(WebSession.user_name == name))


def set_role(session: Session, name: str, role: Role, now: datetime) -> None:
    row = _user(session, name)
    row.role, row.updated_at = role.value, now


def verify_password(
    session: Session, name: str, password: str, policy: SignInPolicy, now: datetime
) -> SignIn:
    """A local sign-in: counts a failure, locks the account after too many, resets on success.

    An unknown name is WRONG like a wrong password (the answer does not say which names
    exist) and costs one argon2 verification too, so its timing says nothing either."""
    row = session.scalar(select(User).where(User.name == name))
    if row is None:
        _spend_one_verification(password)
        return SignIn(verdict=SignInVerdict.WRONG, failures=1)
    if row.locked_until is not None and row.locked_until > now:
        return SignIn(verdict=SignInVerdict.LOCKED, failures=row.failed_sign_ins)
    if row.locked_until is not None:  # the lockout is over: counting starts afresh
        row.failed_sign_ins, row.locked_until = 0, None
    if row.disabled:
        return SignIn(verdict=SignInVerdict.DISABLED)
    if row.password_hash is None or not _matches(row.password_hash, password):
        row.failed_sign_ins += 1
        row.updated_at = now
        if row.failed_sign_ins >= policy.lockout_after:
            row.locked_until = now + timedelta(minutes=policy.lockout_minutes)
            return SignIn(verdict=SignInVerdict.LOCKED, failures=row.failed_sign_ins)
        return SignIn(verdict=SignInVerdict.WRONG, failures=row.failed_sign_ins)
    if _HASHER.check_needs_rehash(row.password_hash):
        row.password_hash = hash_password(password)
    row.failed_sign_ins, row.locked_until, row.last_sign_in_at = 0, None, now
    return SignIn(verdict=SignInVerdict.OK, account=_account(row))


_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))  # what an unknown name is checked against


def _spend_one_verification(password: str) -> None:
    _matches(_DUMMY_HASH, password)


def _matches(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def oidc_sign_in(session: Session, name: str, role: Role, now: datetime) -> SignIn:
    """A user the OIDC provider vouched for: created on first sign-in with the role its claim
    maps to, the role kept in step with the claim afterwards; a disabled one stays out."""
    row = session.scalar(select(User).where(User.name == name))
    if row is None:
        add_user(session, name, role, None, now)
        row = _user(session, name)
    if row.disabled:
        return SignIn(verdict=SignInVerdict.DISABLED)
    row.role, row.last_sign_in_at, row.updated_at = role.value, now, now
    return SignIn(verdict=SignInVerdict.OK, account=_account(row))


# -- API keys ---------------------------------------------------------------------------------


def add_key(session: Session, name: str, role: Role, now: datetime) -> str:
    """A new key for a system; the key itself is returned here once and never again."""
    name = _check_name(name)
    if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
        raise AccountError(f"a key named {name!r} exists (revoke it, or choose another name)")
    key = KEY_PREFIX + new_secret()
    session.add(ApiKey(name=name, role=role.value, key_hash=sha256(key), created_at=now))
    return key


def api_keys(session: Session) -> list[KeyAccount]:
    rows = session.scalars(select(ApiKey).order_by(ApiKey.name))
    return [
        KeyAccount(
            name=row.name,
            role=Role(row.role),
            created_at=row.created_at,
            revoked_at=row.revoked_at,
            last_used_at=row.last_used_at,
        )
        for row in rows
    ]


def revoke_key(session: Session, name: str, now: datetime) -> None:
    row = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if row is None:
        raise AccountError(f"no key named {name!r}")
    row.revoked_at = row.revoked_at or now


def key_holder(session: Session, key: str, now: datetime) -> Principal | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == sha256(key)))
    if row is None or row.revoked_at is not None:
        return None
    row.last_used_at = now
    return Principal(name=row.name, role=Role(row.role), kind=PrincipalKind.KEY)


# -- browser sessions -------------------------------------------------------------------------


def open_session(session: Session, name: str, client: str, now: datetime) -> OpenedSession:
    opened = OpenedSession(token=new_secret(), csrf_token=new_secret())
    session.add(
        WebSession(
            token_hash=sha256(opened.token),
            user_name=name,
            csrf_token=opened.csrf_token,
            client=client[:NAME_CHARACTERS],
            created_at=now,
            last_seen_at=now,
        )
    )
    return opened


def active_session(
    session: Session, token: str, idle: timedelta, now: datetime
) -> ActiveSession | None:
    """The session's user, if the session exists, was used within ``idle`` and its user may
    still sign in; it is kept alive by this use. An idle session is removed."""
    row = session.get(WebSession, sha256(token))
    if row is None:
        return None
    if row.last_seen_at + idle < now:
        session.delete(row)
        return None
    account = session.scalar(select(User).where(User.name == row.user_name))
    if account is None or account.disabled:
        session.delete(row)
        return None
    row.last_seen_at = now
    principal = Principal(name=account.name, role=Role(account.role), kind=PrincipalKind.USER)
    return ActiveSession(principal=principal, csrf_token=row.csrf_token)


def close_session(session: Session, token: str) -> str | None:
    """Signs the session out; the user's name, if it was signed in."""
    row = session.get(WebSession, sha256(token))
    if row is None:
        return None
    session.delete(row)
    return row.user_name


def forget_idle_sessions(session: Session, idle: timedelta, now: datetime) -> int:
    result = session.execute(delete(WebSession).where(WebSession.last_seen_at < now - idle))
    return int(getattr(result, "rowcount", 0) or 0)
