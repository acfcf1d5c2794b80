"""Who is looking: a browser's random session token until sign-in names the user.

    <root>/frontend/browser_state_secret     key that encrypts the token in the browser
    <root>/frontend/downloads/<viewer key>/  files made for one viewer (their xlsx)

A browser keeps only its token (gr.BrowserState, localStorage). The worklist itself is the
department's, in the registry; a viewer's own part is what they hid (``hidden_studies``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from pathlib import Path
from typing import TypeGuard

from services.broker.storage import write_atomically

FRONTEND_DIR = "frontend"
DOWNLOADS_DIR = "downloads"
_SESSION_TOKEN = re.compile(r"^[0-9a-f]{32}$")


def is_session_token(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and bool(_SESSION_TOKEN.match(value))


def new_session_token() -> str:
    return uuid.uuid4().hex


def stored_secret(path: Path) -> str:
    """A random key kept in a 0600 file (made on first use), so that what it protects
    survives restarts and is shared by the frontends of one storage."""
    if not path.exists():
        write_atomically(path, secrets.token_urlsafe(32).encode())
        path.chmod(0o600)
    return path.read_text().strip()


def browser_state_secret(storage_root: Path) -> str:
    """The key that encrypts the session token in the browser."""
    return stored_secret(Path(storage_root) / FRONTEND_DIR / "browser_state_secret")


def downloads_dir(storage_root: Path, viewer: str) -> Path:
    """Where files made for one viewer go; named by a hash (no user name on disk)."""
    key = hashlib.sha256(viewer.encode()).hexdigest()[:24]
    return Path(storage_root) / FRONTEND_DIR / DOWNLOADS_DIR / key
