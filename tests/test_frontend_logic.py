"""The frontend's pure helpers (tests/test_frontend.py drives the service with the real broker)."""

from __future__ import annotations

import pytest

from services.broker.schemas import QueueTopology
from services.frontend.service import (
    FrontendService,
    frontend_instance_id,
    is_session_token,
    safe_file_name,
)


def test_file_names_and_ids_are_safe() -> None:
    assert safe_file_name("../../etc/passwd") == "passwd"
    assert safe_file_name("C:\\studies\\Ivanov Ivan.zip") == "Ivanov_Ivan.zip"
    assert safe_file_name("...") == "upload"
    identifier = frontend_instance_id("127.0.0.1", 7860)
    assert identifier.endswith("-7860")
    QueueTopology().reply_queue(identifier)  # a valid queue name part
    assert is_session_token(FrontendService.new_session_token())
    assert not is_session_token("../sessions/x")


def test_auth_setting_is_parsed_strictly() -> None:
    from services.frontend.__main__ import parse_auth

    assert parse_auth(None) is None
    assert parse_auth("radiologist:s3cret:with-colon") == ("radiologist", "s3cret:with-colon")
    for bad in ("no-colon", ":password", "user:"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad)
