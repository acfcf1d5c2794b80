"""The one rule for a test that cannot run here (a Debian tool, a plugin, network namespaces):
in CI (``CI`` set, as .ci/run does) that is a failure, since CI installs everything
(scripts/ensure_services.sh) and runs as root; on a developer's machine the test skips and
says what is missing. Not a test module."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def missing_precondition(message: str) -> NoReturn:
    """Fail in CI, skip elsewhere, with ``message`` saying what is missing and what brings it."""
    if in_ci():
        pytest.fail(f"precondition missing in CI: {message}")
    pytest.skip(message)


def require(reason_missing: str | None) -> None:
    """Go on when ``reason_missing`` is None, else see missing_precondition."""
    if reason_missing is not None:
        missing_precondition(reason_missing)
