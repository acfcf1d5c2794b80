"""What every section of the configuration shares: strictness, paths, backoff."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import SplitResult, urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[3]
# DICOM Application Entity titles: 1-16 characters, no backslash or control characters.
AE_TITLE_PATTERN = r"^[^\\\x00-\x1f]{1,16}$"


class Section(BaseModel):
    """A part of the configuration: an unknown key is an error, never ignored."""

    model_config = ConfigDict(extra="forbid")


def resolve_path(path: Path) -> Path:
    """Relative paths in the config are relative to the project root, not the working directory."""
    return path if path.is_absolute() else PROJECT_ROOT / path


def _resolve_optional(path: Path | None) -> Path | None:
    return None if path is None else resolve_path(path)


# A file the configuration may name (a secret, a certificate, a log), resolved like every path.
OptionalPath = Annotated[Path | None, AfterValidator(_resolve_optional)]


def http_url_parts(value: str, *, credentials_go: str) -> SplitResult:
    """The parts of an http:// or https:// URL with a host and no user or password in it
    (``credentials_go`` says where they go instead); a ValueError otherwise."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"no credentials in the URL: {credentials_go}")
    return parts


class Backoff(Section):
    """The waits between attempts of one retry: initial_s, then doubling, never more than
    maximum_s; optionally giving up before a wait would pass give_up_after_s
    (services/core/retry.py runs every retry of the services with one of these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_s: float = Field(gt=0, description="the first wait")
    maximum_s: float = Field(gt=0, description="the longest wait")
    give_up_after_s: float | None = Field(
        None, gt=0, description="null: retry until the service stops"
    )

    @model_validator(mode="after")
    def _ordered(self) -> Backoff:
        if self.maximum_s < self.initial_s:
            raise ValueError(
                f"maximum_s ({self.maximum_s}) must not be below initial_s ({self.initial_s})"
            )
        return self
