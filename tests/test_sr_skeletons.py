"""The SR skeletons made early (services/sr/document.py, skeletons_made), which the batch's SR
files and the adapter's model stage both collect before their SRs are written."""

from __future__ import annotations

from concurrent.futures import Future

from loguru import logger

from services.sr import document as sr_document


def test_a_skeleton_that_failed_early_is_left_to_be_made_again_when_written() -> None:
    """skeletons_made (the batch's and the adapter's early skeletons): a skeleton whose
    making raised, or a study without DICOM evidence (None), is left out, so that
    write_structured_reports makes it again, where its error is reported; the warning names
    the error's kind only (its text may quote header values)."""
    made, failed, without_evidence = Future(), Future(), Future()
    skeleton = object()
    made.set_result(skeleton)
    failed.set_exception(ValueError("PatientName DOE^JANE cannot be encoded"))
    without_evidence.set_result(None)
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        kept = sr_document.skeletons_made({1: made, 2: failed, 3: without_evidence})
    finally:
        logger.remove(sink)
    assert kept == {1: skeleton}
    assert len(messages) == 1
    assert "skeleton 2 not made early: ValueError" in messages[0]
    assert "DOE" not in messages[0]
