"""``python -m services.registry users|keys|audit``: accounts and the audit trail from the
server's console (an administrator with access to the configuration and the database).

    users add NAME --role radiologist|technologist|admin [--password-stdin | --oidc]
    users first-admin (--password-file FILE | --password-stdin)
                                       a new registry's user admin (start.sh); else nothing
    users list | users disable NAME | users enable NAME | users reset-password NAME
    users set-role NAME --role ROLE
    keys add NAME --role ROLE          the new key on the last line of output, once
    keys list | keys revoke NAME
    audit [--since ISO] [--actor NAME] [--study TASK_ID] [--format csv|jsonl] [--output FILE]

A password comes from standard input with --password-stdin (one line), else is asked for
twice on a terminal, else a random one is made and printed once. Every change is written to
the audit trail with the operating-system user who ran the command as its actor.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from services.core.access import Role
from services.registry.accounts import AccountError, new_secret
from services.registry.audit import ActorKind, AuditAction, AuditEntry, AuditQuery, as_csv, as_jsonl
from services.registry.registry import Registry

ROLES = [role.value for role in Role]
FIRST_ADMIN = "admin"


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = commands.add_parser("users", help="people who sign in").add_subparsers(
        dest="action", required=True
    )
    add = users.add_parser("add", help="a new user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    how = add.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true", help="read the password")
    how.add_argument("--oidc", action="store_true", help="signs in through the OIDC provider")
    first = users.add_parser("first-admin", help="the user admin, unless one exists")
    source = first.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--password-file", type=Path, help="kept there (0600): made if absent, never replaced"
    )
    source.add_argument("--password-stdin", action="store_true", help="read the password")
    users.add_parser("list", help="every user, with role and state")
    for action, text in (("disable", "sign out and keep out"), ("enable", "let in again")):
        users.add_parser(action, help=text).add_argument("name")
    reset = users.add_parser("reset-password", help="a new password; unlocks; signs out")
    reset.add_argument("name")
    reset.add_argument("--password-stdin", action="store_true")
    set_role = users.add_parser("set-role", help="another role")
    set_role.add_argument("name")
    set_role.add_argument("--role", required=True, choices=ROLES)

    keys = commands.add_parser("keys", help="API keys of systems").add_subparsers(
        dest="action", required=True
    )
    key = keys.add_parser("add", help="a new key, printed once")
    key.add_argument("name")
    key.add_argument("--role", required=True, choices=ROLES)
    keys.add_parser("list", help="every key (never the key itself)")
    keys.add_parser("revoke", help="the key stops working at once").add_argument("name")

    trail = commands.add_parser("audit", help="the audit trail")
    trail.add_argument("--since", type=_instant, default=None, help="ISO 8601; UTC if no offset")
    trail.add_argument("--actor", default=None)
    trail.add_argument("--study", default=None, metavar="TASK_ID")
    trail.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    trail.add_argument("--output", type=Path, default=None, help="default: standard output")


def _instant(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def run(arguments: argparse.Namespace, registry: Registry) -> int:
    """Runs one command; AccountError reaches the caller (one line, exit status 2)."""
    if arguments.command == "audit":
        return _audit(arguments, registry)
    if arguments.command == "keys":
        return _keys(arguments, registry)
    return _users(arguments, registry)


def _console_entry(action: AuditAction, detail: str) -> AuditEntry:
    return AuditEntry(
        actor=getpass.getuser(), actor_kind=ActorKind.SYSTEM, action=action, detail=detail
    )


def _password(from_stdin: bool) -> tuple[str, bool]:
    """The password and whether it was made here (and so must be shown)."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n"), False
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise AccountError("the two passwords differ")
        return first, False
    return new_secret(), True


def _users(arguments: argparse.Namespace, registry: Registry) -> int:
    book, name = registry.accounts, getattr(arguments, "name", "")
    if arguments.action == "list":
        for account in book.users():
            state = "disabled" if account.disabled else "active"
            if account.locked_until and account.locked_until > datetime.now(UTC):
                state = f"locked until {account.locked_until.isoformat(timespec='seconds')}"
            signed_in = account.last_sign_in_at
            last = signed_in.isoformat(timespec="seconds") if signed_in else "never"
            print(f"{account.name}\t{account.role.value}\t{account.source.value}\t{state}\t{last}")
        return 0
    if arguments.action == "first-admin":
        return _first_admin(arguments, registry)
    if arguments.action == "add":
        password, made = (None, False) if arguments.oidc else _password(arguments.password_stdin)
        entry = _console_entry(AuditAction.USER_ADDED, f"{name} {arguments.role}")
        book.add_user(name, Role(arguments.role), password=password, audited=entry)
        print(f"user {name} added ({arguments.role})")
        if made:
            print(f"password (shown once): {password}")
        return 0
    if arguments.action == "reset-password":
        password, made = _password(arguments.password_stdin)
        book.reset_password(
            name, password, audited=_console_entry(AuditAction.PASSWORD_RESET, name)
        )
        print(f"password of {name} reset; its sessions are signed out")
        if made:
            print(f"password (shown once): {password}")
        return 0
    if arguments.action == "set-role":
        entry = _console_entry(AuditAction.ROLE_CHANGED, f"{name} {arguments.role}")
        book.set_role(name, Role(arguments.role), audited=entry)
        print(f"{name} is now {arguments.role}")
        return 0
    disable = arguments.action == "disable"
    action = AuditAction.USER_DISABLED if disable else AuditAction.USER_ENABLED
    book.set_disabled(name, disable, audited=_console_entry(action, name))
    print(f"{name} {'disabled and signed out' if disable else 'enabled'}")
    return 0


def _first_admin(arguments: argparse.Namespace, registry: Registry) -> int:
    """A new registry's first web user, ``admin``; nothing (and no output) once a user of that
    name exists. The registry is asked first: when it cannot be (its database is down), the
    command fails (exit 2) before any password is made. A password file is never replaced:
    one left by an earlier try is the admin's password."""
    if registry.accounts.user(FIRST_ADMIN) is not None:
        return 0
    path: Path | None = arguments.password_file
    made = False
    if path is None:
        password = sys.stdin.readline().rstrip("\r\n")
    elif path.exists():
        password = path.read_text(encoding="utf-8").strip()
    else:
        password, made = new_secret(), True
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(password + "\n")
    entry = _console_entry(AuditAction.USER_ADDED, f"{FIRST_ADMIN} {Role.ADMIN.value}")
    registry.accounts.add_user(FIRST_ADMIN, Role.ADMIN, password=password, audited=entry)
    if made:
        print(
            f"web sign-in: user {FIRST_ADMIN}, password {password} (shown this once; kept in {path})"
        )
    elif path is not None:
        print(f"web sign-in: user {FIRST_ADMIN}, with the password kept in {path}")
    else:
        print(f"web sign-in: user {FIRST_ADMIN}, with the password given")
    return 0


def _keys(arguments: argparse.Namespace, registry: Registry) -> int:
    book = registry.accounts
    if arguments.action == "list":
        for held in book.api_keys():
            state = f"revoked {held.revoked_at:%Y-%m-%d}" if held.revoked_at else "active"
            last = held.last_used_at
            used = last.isoformat(timespec="seconds") if last else "never"
            print(f"{held.name}\t{held.role.value}\t{state}\tlast used {used}")
        return 0
    if arguments.action == "revoke":
        entry = _console_entry(AuditAction.KEY_REVOKED, arguments.name)
        book.revoke_key(arguments.name, audited=entry)
        print(f"key {arguments.name} revoked")
        return 0
    entry = _console_entry(AuditAction.KEY_ADDED, f"{arguments.name} {arguments.role}")
    key = book.add_key(arguments.name, Role(arguments.role), audited=entry)
    print(f"key {arguments.name} added ({arguments.role}); it is shown once, below:")
    print(key)
    return 0


def _audit(arguments: argparse.Namespace, registry: Registry) -> int:
    query = AuditQuery(
        since=arguments.since, actor=arguments.actor, task_id=arguments.study, limit=10_000_000
    )
    entries = registry.audit.events(query)
    text = as_jsonl(entries) if arguments.format == "jsonl" else as_csv(entries)
    if arguments.output is None:
        sys.stdout.write(text)
    else:
        arguments.output.write_text(text)
    return 0
