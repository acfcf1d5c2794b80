"""Reviews and data-quality flags in the registry, on SQLite and the real PostgreSQL: every
review kept, the latest on the study's row, filters for unreviewed studies and for a flag."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_support import BACKEND_PARAMETERS, open_registry
from test_registry import report, result, submission

from services.core.quality import QualityFlag
from services.registry import Registry, Review, StudyFilter


@pytest.fixture(params=BACKEND_PARAMETERS)
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    with open_registry(request.param, tmp_path) as opened:
        yield opened


def finished(registry: Registry, task_id: str, flags: list[QualityFlag] | None = None) -> None:
    registry.record_submission(submission(task_id))
    flagged = report().model_copy(update={"quality_flags": flags or []})
    registry.record_result(result(task_id, flagged))


def test_every_review_is_kept_and_the_latest_is_on_the_row(registry: Registry) -> None:
    finished(registry, "t1")
    first = Review(task_id="t1", reviewer="dr.a", agrees=True, comment="fine")
    assert registry.record_review(first)
    second = Review(
        task_id="t1",
        reviewer="dr.b",
        agrees=False,
        pathology=False,
        findings={"Lung nodule": False, "Emphysema": True},
        comment="the nodule is a vessel",
    )
    assert registry.record_review(second)
    kept = registry.reviews("t1")
    assert [(r.reviewer, r.agrees, r.pathology) for r in kept] == [
        ("dr.a", True, None),
        ("dr.b", False, False),
    ]
    assert kept[1].findings == {"Lung nodule": False, "Emphysema": True}
    assert kept[1].reviewed_at is not None
    row = registry.study("t1")
    assert row is not None
    assert row.review is not None
    assert (row.review.reviewer, row.review.agrees, row.review.pathology) == ("dr.b", False, False)


def test_a_study_without_a_result_cannot_be_reviewed(registry: Registry) -> None:
    registry.record_submission(submission("queued"))
    assert not registry.record_review(Review(task_id="queued", reviewer="dr.a", agrees=True))
    assert not registry.record_review(Review(task_id="nothing", reviewer="dr.a", agrees=True))
    assert registry.reviews("queued") == []


def test_the_listing_filters_unreviewed_studies_and_quality_flags(registry: Registry) -> None:
    finished(registry, "clean")
    finished(registry, "gappy", [QualityFlag.INTERPOLATED, QualityFlag.SERIES_CHOSEN])
    finished(registry, "tilted", [QualityFlag.GANTRY_TILT])
    registry.record_review(Review(task_id="tilted", reviewer="dr.a", agrees=True))

    def listed(wanted: StudyFilter) -> set[str]:
        return {row.task_id for row in registry.list_studies(wanted).items}

    assert listed(StudyFilter(reviewed=False)) == {"clean", "gappy"}
    assert listed(StudyFilter(reviewed=True)) == {"tilted"}
    interpolated = StudyFilter(quality_flags=[QualityFlag.INTERPOLATED])
    assert listed(interpolated) == {"gappy"}
    either = StudyFilter(quality_flags=[QualityFlag.GANTRY_TILT, QualityFlag.SERIES_CHOSEN])
    assert listed(either) == {"gappy", "tilted"}
    row = registry.study("gappy")
    assert row is not None
    assert row.quality_flags == [QualityFlag.INTERPOLATED, QualityFlag.SERIES_CHOSEN]
