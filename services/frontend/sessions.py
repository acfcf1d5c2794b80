"""Browser sessions kept on the server: which studies each browser uploaded.

    <root>/sessions/<session token>.json     the session's tasks, in submission order
    <root>/sessions/<session token>/         files made for that session (its xlsx)
    <root>/frontend/browser_state_secret     key of the browser-side session token

A browser keeps only its random session token (gr.BrowserState, localStorage); the rest is
on the server, so a page reload or a frontend restart shows the same studies.
"""

from __future__ import annotations

import re
import secrets
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import TypeGuard

from pydantic import BaseModel, ConfigDict, Field

from services.broker.storage import write_atomically

SESSIONS_DIR = "sessions"
FRONTEND_DIR = "frontend"
_SESSION_TOKEN = re.compile(r"^[0-9a-f]{32}$")


class SessionTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str
    original_filename: str
    submitted_at: datetime
    # sha256 of the uploaded bytes (a zip, or the sorted hashes of loose files): the same
    # upload again in this session is a duplicate.
    content_sha256: str | None = None
    # Set on a duplicate: the task whose result it shows (nothing was queued for it).
    duplicate_of: str | None = None
    # Tasks waiting in the queue when this one was queued (FIFO: never more ahead of it later).
    queued_behind: int | None = None


class SessionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[SessionTask] = Field(default_factory=list)


def is_session_token(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and bool(_SESSION_TOKEN.match(value))


def new_session_token() -> str:
    return uuid.uuid4().hex


class SessionStore:
    """Session records as JSON files under ``<storage root>/sessions``."""

    def __init__(self, storage_root: Path) -> None:
        self.storage_root = Path(storage_root)
        self.directory = self.storage_root / SESSIONS_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def browser_state_secret(self) -> str:
        """The key that encrypts the session token in the browser; kept so tokens survive restarts."""
        path = self.storage_root / FRONTEND_DIR / "browser_state_secret"
        if not path.exists():
            write_atomically(path, secrets.token_urlsafe(32).encode())
            path.chmod(0o600)
        return path.read_text().strip()

    def _path(self, token: str) -> Path:
        if not is_session_token(token):
            raise ValueError("invalid session token")
        return self.directory / f"{token}.json"

    def files_dir(self, token: str) -> Path:
        """Where files made for this session go (its xlsx)."""
        self._path(token)  # validates the token
        return self.directory / token

    def read(self, token: str) -> SessionRecord:
        try:
            return SessionRecord.model_validate_json(self._path(token).read_bytes())
        except (FileNotFoundError, ValueError):
            return SessionRecord()

    def append(self, token: str, tasks: list[SessionTask]) -> None:
        with self._lock:
            record = self.read(token)
            record.tasks.extend(tasks)
            write_atomically(self._path(token), record.model_dump_json(indent=2).encode())

    def remove(self, token: str, task_id: str) -> bool:
        """Take a task off the session's list (its result stays in storage); False if absent."""
        with self._lock:
            record = self.read(token)
            kept = [task for task in record.tasks if task.task_id != task_id]
            if len(kept) == len(record.tasks):
                return False
            record.tasks = kept
            write_atomically(self._path(token), record.model_dump_json(indent=2).encode())
            return True
