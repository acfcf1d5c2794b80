"""The training commands' log sinks keep tracebacks free of local variables."""

from __future__ import annotations

import sys

from loguru import logger

from training.logs import configure_console, log_file


def _log_a_failure(study_embedding: str) -> None:
    try:
        raise ValueError(len(study_embedding))
    except ValueError:
        logger.exception("failed")


def test_training_log_sinks_print_no_local_variables(tmp_path, capsys):
    """loguru's ``diagnose=True`` would print the frame's variables (here an embedding's
    values) under the traceback; the training sinks must not."""
    secret = "0.0312,-0.0117,0.0871"
    with log_file(tmp_path / "train.log"):
        _log_a_failure(secret)
    written = (tmp_path / "train.log").read_text()
    assert "ValueError" in written
    assert secret not in written
    configure_console()
    try:
        _log_a_failure(secret)
        console = capsys.readouterr().err
    finally:
        logger.remove()  # the console sink holds pytest's capture stream
        logger.add(sys.__stderr__)
    assert "ValueError" in console
    assert secret not in console
