"""read_studies parses only HEADER_KEYWORDS: every tag the code reads must be among them."""

from __future__ import annotations

import ast
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_dict

from services.core.dicom import HEADER_KEYWORDS, read_studies
from services.core.schemas import IntakeSummary

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Read from places read_studies does not restrict: the file meta (group 0002) and the items
# of a listed sequence (read in full).
NOT_DATA_SET_TAGS = {"CodeMeaning"}


def _keywords_named_in(path: Path) -> set[str]:
    """DICOM keywords written as string literals or as attributes of a header in one file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
        elif isinstance(node, ast.Attribute) and "header" in ast.unparse(node.value):
            names.add(node.attr)
    return {
        name
        for name in names
        if name and name in keyword_dict and keyword_dict[name] >> 16 != 0x0002
    } - NOT_DATA_SET_TAGS


def test_every_tag_the_pipeline_reads_is_parsed():
    core = PROJECT_ROOT / "services" / "core"
    # The SR's evidence is taken from the same headers (services/sr/evidence.py).
    evidence = PROJECT_ROOT / "services" / "sr" / "evidence.py"
    named: dict[str, list[str]] = {}
    for path in [*sorted(core.rglob("*.py")), evidence]:
        for keyword in _keywords_named_in(path):
            named.setdefault(keyword, []).append(path.name)
    missing = {keyword: files for keyword, files in named.items() if keyword not in HEADER_KEYWORDS}
    assert not missing, f"add these to services.core.dicom.headers.HEADER_KEYWORDS: {missing}"
    # The scan is not vacuous: it finds the tags the geometry needs.
    assert {"ImagePositionPatient", "RescaleSlope", "ProtocolName", "SOPInstanceUID"} <= set(named)


def test_header_keywords_are_dicom_keywords():
    for keyword in HEADER_KEYWORDS:
        assert keyword in keyword_dict, keyword
        dictionary_VR(keyword_dict[keyword])  # raises for an unknown tag


@pytest.mark.parametrize(
    "fixture",
    [
        "chest_ct_lung_dx_a0002",
        "abdomen_ct_jpeg2000",
        "ct_scout_and_dose_screens",
        "head_ct_gantry_tilt",
        "mr_brain_t1",
    ],
)
def test_parsed_values_equal_a_full_read(fixtures_dir, fixture):
    folder = fixtures_dir / fixture
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    studies = read_studies(files, IntakeSummary())
    instances = [inst for study in studies for series in study.series for inst in series.instances]
    assert instances
    for instance in instances:
        full = pydicom.dcmread(instance.path, stop_before_pixels=True, force=True)
        for keyword in HEADER_KEYWORDS:
            assert (keyword in instance.header) == (keyword in full), keyword
            if keyword in full:
                assert instance.header[keyword].value == full[keyword].value, keyword
        # Nothing else was parsed: private vendor blocks are skipped.
        assert all(element.keyword in HEADER_KEYWORDS for element in instance.header)
