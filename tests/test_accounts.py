"""Accounts, API keys, browser sessions and the audit trail in the registry, on SQLite and
the real PostgreSQL; the ``users``, ``keys`` and ``audit`` commands."""

from __future__ import annotations

import csv
import getpass
import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from registry_support import BACKEND_PARAMETERS, open_registry, registry_url
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DatabaseError

from services.core.access import PERMISSIONS, Permission, PrincipalKind, Role, allowed
from services.registry import Registry
from services.registry.accounts import AccountError, SignInPolicy, SignInVerdict, sha256
from services.registry.audit import ActorKind, AuditAction, AuditEntry, AuditQuery
from services.registry.models import ApiKey, WebSession

POLICY = SignInPolicy(lockout_after=3, lockout_minutes=15)
PASSWORD = "correct horse battery"
PARAMETERS = BACKEND_PARAMETERS


@pytest.fixture(params=PARAMETERS)
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    with open_registry(request.param, tmp_path) as opened:
        yield opened


def test_the_permissions_table_gives_each_role_its_documented_rights() -> None:
    assert allowed(Role.RADIOLOGIST, Permission.SEE_IDENTITY)
    assert allowed(Role.RADIOLOGIST, Permission.REVIEW)
    assert not allowed(Role.TECHNOLOGIST, Permission.SEE_ALL_STUDIES)
    assert allowed(Role.TECHNOLOGIST, Permission.UPLOAD)
    assert not allowed(Role.ADMIN, Permission.SEE_IDENTITY)
    assert {Permission.MANAGE_USERS, Permission.AUDIT, Permission.PURGE} <= PERMISSIONS[Role.ADMIN]
    assert set(PERMISSIONS) == set(Role)


def test_a_local_user_signs_in_with_the_password_and_only_with_it(registry: Registry) -> None:
    book = registry.accounts
    book.add_user("jdoe", Role.RADIOLOGIST, password=PASSWORD)
    with registry.reading() as session:
        password_hash = session.execute(text("SELECT password_hash FROM users")).scalar_one()
    assert password_hash.startswith("$argon2id$")
    assert PASSWORD not in password_hash

    signed_in = book.verify_password("jdoe", PASSWORD, POLICY)
    assert signed_in.verdict is SignInVerdict.OK
    assert signed_in.account is not None
    assert signed_in.account.role is Role.RADIOLOGIST
    assert book.verify_password("jdoe", "wrong password!", POLICY).verdict is SignInVerdict.WRONG
    assert book.verify_password("nobody", PASSWORD, POLICY).verdict is SignInVerdict.WRONG
    with pytest.raises(AccountError, match="exists"):
        book.add_user("jdoe", Role.ADMIN, password=PASSWORD)
    with pytest.raises(AccountError, match="at least 12"):
        book.add_user("short", Role.ADMIN, password="short")


def test_repeated_failures_lock_the_account_until_the_lockout_ends(registry: Registry) -> None:
    book = registry.accounts
    book.add_user("jdoe", Role.RADIOLOGIST, password=PASSWORD)
    verdicts = [book.verify_password("jdoe", f"guess {n:08d}", POLICY) for n in range(3)]
    assert [v.verdict for v in verdicts] == [
        SignInVerdict.WRONG,
        SignInVerdict.WRONG,
        SignInVerdict.LOCKED,
    ]
    assert [v.failures for v in verdicts] == [1, 2, 3]
    # The right password does not open a locked account.
    assert book.verify_password("jdoe", PASSWORD, POLICY).verdict is SignInVerdict.LOCKED
    account = book.user("jdoe")
    assert account is not None
    assert account.locked_until is not None
    with registry._writes.begin() as session:  # the lockout's end, as if 15 minutes passed
        session.execute(text("UPDATE users SET locked_until = :t"), {"t": datetime.now(UTC)})
    assert book.verify_password("jdoe", PASSWORD, POLICY).verdict is SignInVerdict.OK
    # A reset password unlocks too, and counting started afresh after the success.
    assert book.verify_password("jdoe", "guess again!", POLICY).failures == 1


def test_a_disabled_user_is_signed_out_everywhere_and_kept_out(registry: Registry) -> None:
    book = registry.accounts
    book.add_user("jdoe", Role.TECHNOLOGIST, password=PASSWORD)
    opened = book.open_session("jdoe", "10.0.0.7")
    active = book.active_session(opened.token, timedelta(minutes=30))
    assert active is not None
    assert active.principal.name == "jdoe"
    assert active.principal.kind is PrincipalKind.USER
    assert active.csrf_token == opened.csrf_token
    book.set_disabled("jdoe", True)
    assert book.active_session(opened.token, timedelta(minutes=30)) is None
    assert book.verify_password("jdoe", PASSWORD, POLICY).verdict is SignInVerdict.DISABLED
    book.set_disabled("jdoe", False)
    assert book.verify_password("jdoe", PASSWORD, POLICY).verdict is SignInVerdict.OK


def test_sessions_end_when_idle_or_signed_out_and_keep_only_a_hash(registry: Registry) -> None:
    book = registry.accounts
    book.add_user("jdoe", Role.RADIOLOGIST, password=PASSWORD)
    opened = book.open_session("jdoe", "10.0.0.7")
    with registry.reading() as session:
        stored = session.get(WebSession, sha256(opened.token))
        assert stored is not None
        assert session.scalar(text("SELECT count(*) FROM web_sessions")) == 1
    with registry._writes.begin() as session:
        old = datetime.now(UTC) - timedelta(minutes=31)
        session.execute(text("UPDATE web_sessions SET last_seen_at = :t"), {"t": old})
    assert book.active_session(opened.token, timedelta(minutes=30)) is None
    again = book.open_session("jdoe", "10.0.0.7")
    assert book.close_session(again.token) == "jdoe"
    assert book.active_session(again.token, timedelta(minutes=30)) is None
    assert book.active_session("made-up", timedelta(minutes=30)) is None


def test_an_api_key_works_until_revoked_and_only_its_hash_is_kept(registry: Registry) -> None:
    book = registry.accounts
    key = book.add_key("ris", Role.TECHNOLOGIST)
    assert key.startswith("cts_")
    assert len(key) > 40
    holder = book.key_holder(key)
    assert holder is not None
    assert (holder.name, holder.role, holder.kind) == ("ris", Role.TECHNOLOGIST, PrincipalKind.KEY)
    with registry.reading() as session:
        row = session.query(ApiKey).one()
        assert row.key_hash == sha256(key)
        assert key not in row.key_hash
        assert row.last_used_at is not None
    assert book.key_holder(key + "x") is None
    book.revoke_key("ris")
    assert book.key_holder(key) is None
    assert book.api_keys()[0].revoked_at is not None


def test_an_oidc_user_is_created_at_first_sign_in_with_the_claimed_role(
    registry: Registry,
) -> None:
    book = registry.accounts
    first = book.oidc_sign_in("alice@hospital.example", Role.RADIOLOGIST)
    assert first.verdict is SignInVerdict.OK
    again = book.oidc_sign_in("alice@hospital.example", Role.TECHNOLOGIST)
    assert again.account is not None
    assert again.account.role is Role.TECHNOLOGIST
    # No password: a local sign-in with any password is refused.
    verdict = book.verify_password("alice@hospital.example", PASSWORD, POLICY)
    assert verdict.verdict is SignInVerdict.WRONG


def test_the_audit_trail_is_append_only_and_filtered(registry: Registry) -> None:
    trail = registry.audit
    for actor, action, task in (
        ("jdoe", AuditAction.VIEW_STUDY, "task-1"),
        ("jdoe", AuditAction.DOWNLOAD_SR, "task-1"),
        ("ORTHANC", AuditAction.ASSOCIATION_ACCEPTED, None),
        ("asmith", AuditAction.VIEW_STUDY, "task-2"),
    ):
        kind = ActorKind.AE if actor == "ORTHANC" else ActorKind.USER
        trail.record(
            AuditEntry(actor=actor, actor_kind=kind, action=action, task_id=task, client="::1")
        )
    assert [e.action for e in trail.events(AuditQuery(actor="jdoe"))] == [
        AuditAction.VIEW_STUDY,
        AuditAction.DOWNLOAD_SR,
    ]
    assert {e.actor for e in trail.events(AuditQuery(task_id="task-1"))} == {"jdoe"}
    later = trail.events(AuditQuery(since=datetime.now(UTC) + timedelta(minutes=1)))
    assert later == []
    for statement in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
        with pytest.raises(DatabaseError, match="append-only"), registry._writes.begin() as s:
            s.execute(text(statement))
    assert len(trail.events(AuditQuery())) == 4
    # A refusal names what the caller asked for, however long: it is written, bounded to the
    # column (PostgreSQL would refuse the row, which the trail would then lose).
    asked = "x" * 500
    trail.record(
        AuditEntry(
            actor="jdoe",
            actor_kind=ActorKind.USER,
            action=AuditAction.ACCESS_REFUSED,
            task_id=asked,
            study_instance_uid="1." * 200,
        )
    )
    (refused,) = trail.events(AuditQuery(actions=(AuditAction.ACCESS_REFUSED,)))
    assert refused.task_id == asked[:64]
    assert refused.study_instance_uid is not None
    assert len(refused.study_instance_uid) == 64


def run_command(
    arguments: list[str], config: Path, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.registry", "--config", str(config), *arguments],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def registry_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"storage:\n  root: {tmp_path / 'storage'}\n")
    upgraded = run_command(["upgrade"], config)
    assert upgraded.returncode == 0, upgraded.stderr
    return config


def test_the_commands_manage_users_and_keys_and_export_the_trail(
    registry_config: Path, tmp_path: Path
) -> None:
    added = run_command(
        ["users", "add", "jdoe", "--role", "radiologist", "--password-stdin"],
        registry_config,
        stdin=PASSWORD + "\n",
    )
    assert added.returncode == 0, added.stderr
    made = run_command(["users", "add", "tech1", "--role", "technologist"], registry_config)
    assert made.returncode == 0, made.stderr
    shown = made.stdout.strip().splitlines()[-1].removeprefix("password (shown once): ")
    assert len(shown) >= 40
    listed = run_command(["users", "list"], registry_config)
    assert listed.stdout.splitlines() == [
        "jdoe\tradiologist\tlocal\tactive\tnever",
        "tech1\ttechnologist\tlocal\tactive\tnever",
    ]
    refused = run_command(["users", "disable", "nobody"], registry_config)
    assert refused.returncode == 2
    assert "no user named 'nobody'" in refused.stderr

    key_made = run_command(["keys", "add", "ris", "--role", "technologist"], registry_config)
    assert key_made.returncode == 0, key_made.stderr
    key = key_made.stdout.strip().splitlines()[-1]
    assert key.startswith("cts_")
    assert key not in run_command(["keys", "list"], registry_config).stdout
    assert run_command(["keys", "revoke", "ris"], registry_config).returncode == 0
    assert "revoked" in run_command(["keys", "list"], registry_config).stdout

    exported = run_command(["audit", "--format", "jsonl"], registry_config)
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [row["action"] for row in rows] == [
        "user_added",
        "user_added",
        "key_added",
        "key_revoked",
    ]
    assert set(rows[0]) >= {"time", "actor", "action", "task_id", "study_instance_uid", "client"}
    assert datetime.fromisoformat(rows[0]["time"]).tzinfo is not None
    as_csv = run_command(["audit", "--actor", rows[0]["actor"], "--format", "csv"], registry_config)
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(table) == 4
    assert table[2]["detail"] == "ris technologist"
    since = datetime.now(UTC) + timedelta(hours=1)
    none_yet = run_command(["audit", "--since", since.isoformat()], registry_config)
    assert none_yet.stdout.strip().splitlines() == [
        "time,actor,actor_kind,action,task_id,study_instance_uid,client,detail"
    ]


@pytest.mark.parametrize("backend", BACKEND_PARAMETERS)
def test_each_account_change_writes_one_audit_row_naming_its_target(
    backend: str, tmp_path: Path
) -> None:
    """disable, enable, reset-password, set-role and keys revoke: one row each, written with
    the change (actor: who ran the command; action; the target in its detail); a refused
    change writes none."""
    with registry_url(backend, tmp_path) as url:
        config = registry_config_for(url, tmp_path)
        for setup, stdin in (
            (["users", "add", "jdoe", "--role", "radiologist", "--password-stdin"], PASSWORD),
            (["keys", "add", "ris", "--role", "technologist"], ""),
        ):
            done = run_command(setup, config, stdin=stdin + "\n")
            assert done.returncode == 0, done.stderr
        registry = Registry(url)
        try:
            changes = [
                (["users", "disable", "jdoe"], AuditAction.USER_DISABLED, "jdoe"),
                (["users", "enable", "jdoe"], AuditAction.USER_ENABLED, "jdoe"),
                (["users", "reset-password", "jdoe"], AuditAction.PASSWORD_RESET, "jdoe"),
                (
                    ["users", "set-role", "jdoe", "--role", "admin"],
                    AuditAction.ROLE_CHANGED,
                    "jdoe admin",
                ),
                (["keys", "revoke", "ris"], AuditAction.KEY_REVOKED, "ris"),
                (["users", "disable", "nobody"], None, ""),  # refused: no row
                (["keys", "revoke", "nothing"], None, ""),
            ]
            for arguments, action, target in changes:
                before = len(registry.audit.events(AuditQuery()))
                ran = run_command(arguments, config, stdin="a new long password\n")
                rows = registry.audit.events(AuditQuery())[before:]
                if action is None:
                    assert ran.returncode == 2, arguments
                    assert rows == [], arguments
                    continue
                assert ran.returncode == 0, ran.stderr
                assert [(row.action, row.detail) for row in rows] == [(action, target)], arguments
                assert rows[0].actor == getpass.getuser()
                assert rows[0].actor_kind is ActorKind.SYSTEM
            user = registry.accounts.user("jdoe")
            assert user is not None
            assert (user.role, user.disabled) == (Role.ADMIN, False)
            assert registry.accounts.api_keys()[0].revoked_at is not None
        finally:
            registry.close()


def registry_config_for(url: URL, folder: Path) -> Path:
    config = folder / "config.yaml"
    config.write_text(
        f"storage:\n  root: {folder / 'storage'}\n"
        f"registry:\n  url: '{url.render_as_string(hide_password=False)}'\n"
    )
    return config


@pytest.mark.parametrize("backend", BACKEND_PARAMETERS)
def test_the_first_admin_is_made_once_and_its_password_file_never_replaced(
    backend: str, tmp_path: Path
) -> None:
    secret = tmp_path / "run" / "secrets" / "admin-password"
    with registry_url(backend, tmp_path) as url:
        config = registry_config_for(url, tmp_path)
        made = run_command(["users", "first-admin", "--password-file", str(secret)], config)
        assert made.returncode == 0, made.stderr
        password = secret.read_text().strip()
        assert secret.stat().st_mode & 0o777 == 0o600
        assert made.stdout == (
            f"web sign-in: user admin, password {password} (shown this once; kept in {secret})\n"
        )
        again = run_command(["users", "first-admin", "--password-file", str(secret)], config)
        assert (again.returncode, again.stdout) == (0, "")  # it exists: nothing, not a word
        assert secret.read_text().strip() == password
        registry = Registry(url)
        try:
            assert registry.accounts.verify_password("admin", password, POLICY).verdict is (
                SignInVerdict.OK
            )
            added = registry.audit.events(AuditQuery(actions=(AuditAction.USER_ADDED,)))
            assert [row.detail for row in added] == ["admin admin"]
        finally:
            registry.close()
    # A new registry (or a try that failed after the file was written) keeps the file's.
    (tmp_path / "second").mkdir()
    with registry_url(backend, tmp_path / "second") as url:
        config = registry_config_for(url, tmp_path / "second")
        kept = run_command(["users", "first-admin", "--password-file", str(secret)], config)
        assert kept.returncode == 0, kept.stderr
        assert kept.stdout == f"web sign-in: user admin, with the password kept in {secret}\n"
        assert secret.read_text().strip() == password
        registry = Registry(url)
        try:
            assert registry.accounts.verify_password("admin", password, POLICY).verdict is (
                SignInVerdict.OK
            )
        finally:
            registry.close()


def test_the_first_admin_is_not_tried_while_the_registry_cannot_be_asked(
    tmp_path: Path,
) -> None:
    """The database is away (nothing listens on its port): the command says so and exits 2;
    a kept password file is left as it was, and none is made."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    away = URL.create(
        "postgresql+psycopg", username="postgres", host="127.0.0.1", port=port, database="cts"
    )
    config = registry_config_for(away, tmp_path)
    secret = tmp_path / "admin-password"
    secret.write_text("the admin's kept password\n")
    for present in (True, False):
        if not present:
            secret.unlink()
        tried = run_command(["users", "first-admin", "--password-file", str(secret)], config)
        assert tried.returncode == 2
        assert "the registry cannot be asked" in tried.stderr
        assert tried.stdout == ""
        assert secret.exists() is present
    assert not secret.exists()
    secret.write_text("the admin's kept password\n")
    assert run_command(["users", "list"], config).returncode == 2
    assert secret.read_text() == "the admin's kept password\n"
