"""Shared fixtures: paths to the real DICOM data and reference files in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "dicom"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"the shared DICOM fixtures are missing: expected {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"the shared reference data is missing: expected {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_model_repository(tmp_path_factory) -> Path:
    """A demo model repository of the tiny CTViT config, built once per session (seconds).

    Target shape (24, 40, 40) at (15, 9, 9) mm: the contract's field of view, coarse voxels.
    """
    import subprocess

    from convertation.build_cli import demo_build_command

    repository = tmp_path_factory.mktemp("tiny_model_repository")
    command = demo_build_command(
        repository, ctvit_config=PROJECT_ROOT / "tests" / "data" / "ctvit_tiny.json"
    )
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        pytest.fail(f"building the tiny model repository failed:\n{completed.stderr[-4000:]}")
    return repository


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for a module's browser tests (tests/worklist_page.py)."""
    from worklist_page import chromium

    with chromium() as launched:
        yield launched
