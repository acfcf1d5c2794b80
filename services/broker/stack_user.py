"""``python -m services.broker.stack_user``: the RabbitMQ account of one stack, made by
start.sh so that no service uses ``guest``.

    python -m services.broker.stack_user --user cts --prefix cts \
        --password-file storage/run/secrets/rabbitmq-password
    python -m services.broker.stack_user --user cts --remove      (stop.sh: the account goes)

The password is read from ``--password-file``, or made (random, 256 bits) and saved there
(0600) the first time; the account is created with it, or given it again, and may touch only
the stack's own exchanges and queues (``<prefix>.*``) and publish through the default exchange
(replies go to a queue by name). Its tag ``management`` lets it sign in to the console.

Two ways to reach the broker as its administrator, tried in turn: the management API on
127.0.0.1:15672 as ``guest`` (which RabbitMQ admits from loopback only; a tenth of a second),
then ``rabbitmqctl`` (root or the rabbitmq user on the broker's host: it needs the Erlang
cookie; seconds, an Erlang node per call). When neither works
the command says why and exits 2: start.sh then stops, naming the ways out (an account
made by the broker's administrator, or ``--broker-guest``). Finally it signs in with the new
account, so a wrong account is found here, not by every service.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions

from services.broker.storage import write_atomically

RABBITMQCTL_TIMEOUT_S = 60
MANAGEMENT_URL = "http://127.0.0.1:15672/api"
USAGE_ERROR = 2


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ's three regular expressions of one account on one virtual host."""

    configure: str
    write: str
    read: str


def stack_permissions(prefix: str) -> Permissions:
    """Only ``<prefix>.*`` (queues and exchanges of this stack), and publishing through the
    default exchange, which RabbitMQ's permissions call ``amq.default``."""
    own = f"^{re.escape(prefix)}\\."
    return Permissions(configure=own, write=f"{own}|^amq\\.default$", read=own)


def password_from(path: Path) -> str:
    """The saved password, or a new one saved (0600, atomically) on first use."""
    if path.is_file():
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    write_atomically(path, f"{password}\n".encode())  # mkstemp: 0600
    return password


def _rabbitmqctl(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        raise OSError("rabbitmqctl is not installed here")
    return subprocess.run(
        [tool, "--quiet", *arguments],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RABBITMQCTL_TIMEOUT_S,
    )


def with_rabbitmqctl(user: str, password: str, vhost: str, permissions: Permissions) -> None:
    """Through rabbitmqctl; the password goes on standard input, never on a command line."""
    added = _rabbitmqctl("add_user", user, stdin=f"{password}\n")
    if added.returncode != 0:
        if "already exists" not in added.stdout + added.stderr:
            raise OSError(f"rabbitmqctl add_user: {(added.stderr or added.stdout).strip()}")
        changed = _rabbitmqctl("change_password", user, stdin=f"{password}\n")
        if changed.returncode != 0:
            raise OSError(f"rabbitmqctl change_password: {changed.stderr.strip()}")
    for step in (
        ("set_permissions", "-p", vhost, user, *_regexes(permissions)),
        ("set_user_tags", user, "management"),
    ):
        done = _rabbitmqctl(*step)
        if done.returncode != 0:
            raise OSError(f"rabbitmqctl {step[0]}: {done.stderr.strip()}")


def _regexes(permissions: Permissions) -> tuple[str, str, str]:
    return permissions.configure, permissions.write, permissions.read


def with_management_api(
    user: str, password: str, vhost: str, permissions: Permissions, base_url: str
) -> None:
    """Through the management API, as guest (loopback only, RabbitMQ's default)."""
    name = urllib.parse.quote(user, safe="")
    _call_api(base_url, "PUT", f"users/{name}", {"password": password, "tags": "management"})
    configure, write, read = _regexes(permissions)
    _call_api(
        base_url,
        "PUT",
        f"permissions/{urllib.parse.quote(vhost, safe='')}/{name}",
        {"configure": configure, "write": write, "read": read},
    )


def _call_api(base_url: str, method: str, path: str, body: dict[str, str] | None = None) -> None:
    request = urllib.request.Request(
        f"{base_url}/{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def remove(user: str, base_url: str) -> list[str]:
    """The account gone (the stack stopped); the reasons of each way that failed."""
    failures: list[str] = []
    try:
        _call_api(base_url, "DELETE", f"users/{urllib.parse.quote(user, safe='')}")
        return []
    except (OSError, urllib.error.URLError) as error:
        failures.append(f"management API {base_url} as guest: {error}")
    try:
        removed = _rabbitmqctl("delete_user", user)
        if removed.returncode == 0:
            return []
        failures.append(f"rabbitmqctl delete_user: {removed.stderr.strip()}")
    except (OSError, subprocess.SubprocessError) as error:
        failures.append(f"rabbitmqctl: {error}")
    return failures


def sign_in(host: str, port: int, vhost: str, user: str, password: str) -> None:
    parameters = pika.ConnectionParameters(
        host=host,
        port=port,
        virtual_host=vhost,
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=1,
        socket_timeout=10,
    )
    pika.BlockingConnection(parameters).close()


def provision(arguments: argparse.Namespace) -> list[str]:
    """The account made or renewed; the reasons of each way that failed (empty: done)."""
    password = password_from(arguments.password_file)
    permissions = stack_permissions(arguments.prefix)
    failures: list[str] = []
    try:
        with_management_api(
            arguments.user, password, arguments.vhost, permissions, arguments.management_url
        )
        return []
    except (OSError, urllib.error.URLError) as error:
        failures.append(f"management API {arguments.management_url} as guest: {error}")
    try:
        with_rabbitmqctl(arguments.user, password, arguments.vhost, permissions)
        return []
    except (OSError, subprocess.SubprocessError) as error:
        failures.append(f"rabbitmqctl: {error}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.broker.stack_user")
    parser.add_argument("--user", required=True)
    parser.add_argument("--prefix", help="rabbitmq.queue_prefix of the stack")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--remove", action="store_true", help="remove the account")
    parser.add_argument("--vhost", default="/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--management-url", default=MANAGEMENT_URL)
    arguments = parser.parse_args(argv)
    if arguments.remove:
        failures = remove(arguments.user, arguments.management_url)
        if failures:
            print("the RabbitMQ account stays:", *failures, sep="\n  ", file=sys.stderr)
        return USAGE_ERROR if failures else 0
    if arguments.prefix is None or arguments.password_file is None:
        parser.error("--prefix and --password-file make an account")
    failures = provision(arguments)
    if failures:
        print("cannot make the RabbitMQ account:", *failures, sep="\n  ", file=sys.stderr)
        return USAGE_ERROR
    try:
        sign_in(
            arguments.host,
            arguments.port,
            arguments.vhost,
            arguments.user,
            password_from(arguments.password_file),
        )
    except pika.exceptions.AMQPError as error:
        print(f"the RabbitMQ account {arguments.user} cannot sign in: {error!r}", file=sys.stderr)
        return USAGE_ERROR
    print(f"RabbitMQ account {arguments.user}: may use {arguments.prefix}.* on {arguments.vhost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
