"""services/core/logging_setup.library_warnings_hidden: the blocks that hide library warnings
(pydicom's and highdicom's quote DICOM header values). The adapter's preparation thread and
its SR-skeleton thread can each be in one at once; with plain warnings.catch_warnings the
block that ends first restores the filters of before while the other still runs. And what
every entry point does with a warning that gets through (log_python_warning)."""

from __future__ import annotations

import threading
import warnings

from loguru import logger

from services.core.logging_setup import library_warnings_hidden, log_python_warning


def test_blocks_in_two_threads_run_one_at_a_time_and_leave_the_filters_as_they_were() -> None:
    first_inside, first_may_end, second_inside = (threading.Event() for _ in range(3))

    def first() -> None:
        with library_warnings_hidden():
            first_inside.set()
            first_may_end.wait(10)

    def second() -> None:
        with library_warnings_hidden():
            second_inside.set()

    filters_before = list(warnings.filters)
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert first_inside.wait(10)
    threads[1].start()
    assert not second_inside.wait(0.3)  # waits for the first block to end
    first_may_end.set()
    for thread in threads:
        thread.join(10)
    assert second_inside.is_set()
    assert list(warnings.filters) == filters_before


def test_a_library_warning_inside_a_block_is_not_shown() -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with library_warnings_hidden():
            warnings.warn("Patient's Name 'DOE^JANE' has one component", UserWarning, stacklevel=1)
        warnings.warn("after the block", UserWarning, stacklevel=1)
    assert [str(warning.message) for warning in shown] == ["after the block"]


def test_a_dicom_library_s_warning_is_logged_without_its_text() -> None:
    """pydicom's and highdicom's warnings quote header values: the batch and the services log
    their kind and source file only (another thread may have restored the filters that hide
    them)."""

    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        log_python_warning(
            "Invalid value for VR PN: 'DOE^JANE^^^^'",
            UserWarning,
            "/venv/lib/python3.11/site-packages/highdicom/sr/sop.py",
            100,
        )
        log_python_warning("a numpy warning", RuntimeWarning, "/venv/numpy/core/x.py", 1)
    finally:
        logger.remove(sink)
    assert lines[0].strip() == "UserWarning from sop.py (its text is not logged)"
    assert "DOE" not in "".join(lines)
    assert lines[1].strip() == "RuntimeWarning: a numpy warning"
