"""services/core/logging_setup.library_warnings_hidden: the blocks that hide library warnings
(pydicom's and highdicom's quote DICOM header values). The adapter's preparation thread and
its SR-skeleton thread can each be in one at once; with plain warnings.catch_warnings the
block that ends first restores the filters of before while the other still runs."""

from __future__ import annotations

import threading
import warnings

from services.core.logging_setup import library_warnings_hidden


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
