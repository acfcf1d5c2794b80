"""The shapes of the study view's data as the page's script reads them (static/study*.js):
typed, so that a field renamed on one side is a type error on the other's side of the
contract, not a blank on screen."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class Headline(TypedDict):
    headline: str
    detail: str  # the numbers behind it, shown one click away


class FindingLine(TypedDict):
    label: str
    probability: float
    threshold: float
    positive: bool


class ChestCheckLines(TypedDict):
    verdict: Headline
    lines: list[str]
    tags: list[str]
    numbers: list[list[str]]


class ReviewLine(TypedDict):
    who: str
    when: str
    verdict: str
    findings: list[str]
    comment: str


class OtherStudy(TypedDict):
    key: str
    date: str
    badge: str
    reviewed: bool
    badge_text: str
    description: str
    finding: str


class SeriesLine(TypedDict):
    text: str
    selected: bool
    reason: str


class Preview(TypedDict):
    url: str
    caption: str


class Download(TypedDict):
    url: str
    name: str
    kind: str


class StudyDocument(TypedDict):
    key: str
    title: str
    badge: str
    badge_text: str
    call: str
    call_note: str
    call_detail: str
    fraction: float | None
    flags: list[str]
    patient: list[list[str]]
    identity: list[list[str]]
    findings: list[FindingLine]
    warnings: list[Headline]
    notes: list[str]
    chest_check: ChestCheckLines | None
    quality: list[list[str]]
    series: list[SeriesLine]
    demo: bool
    model: str
    # The viewer's JSON as the adapter wrote it (services/adapter/viewer_data.py) plus its URL.
    viewer: dict[str, Any] | None
    previews: list[Preview]
    downloads: list[Download]
    patient_studies: list[OtherStudy]
    reviews: list[ReviewLine]
    may_review: bool
    has_call: bool  # False: Not analysed or Failed, nothing to agree or disagree with
    finding_labels: list[str]
    viewer_missing: NotRequired[str]
