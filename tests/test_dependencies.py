"""Each image's dependency set covers what its service imports, and constraints.txt pins every
package the tests ran with: the Dockerfiles install exactly that (pyproject.toml's common list
and the image's extra, scripts/image_requirements.py, pip -c constraints.txt)."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
from image_requirements import image_requirements  # noqa: E402 - a script, not a package

FIRST_PARTY = {"services", "convertation", "training", "visualisation", "synthetic", "benchmarks"}
# Each image: its extra, its Dockerfile and the modules its processes start from.
IMAGES = {
    "adapter": ("Dockerfile.adapter.yaml", ["services.adapter.__main__", "services.adapter.healthcheck"]),
    # Both also run the registry's upgrade (compose's registry-upgrade, the init containers).
    "frontend": (
        "Dockerfile.frontend.yaml",
        ["services.frontend.__main__", "services.registry.__main__"],
    ),
    "listener": (
        "Dockerfile.dicom-listener.yaml",
        [
            "services.dicom_listener.__main__",
            "services.dicom_listener.healthcheck",
            "services.registry.__main__",
        ],
    ),
    "batch": ("Dockerfile.inference.yaml", ["services.batch.__main__"]),
}  # fmt: skip


# Imports an image may lack on purpose: the command that makes them says which extra to
# install (a ConfigurationError), and the image stays lighter. Each names its importer.
OPTIONAL_IMPORTS = {
    # python -m services.registry export-reviews writes parquet: the train extra.
    ("pyarrow", "services.registry.review_export"),
}


def module_file(name: str) -> Path | None:
    path = PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def third_party_imports(entry: str) -> dict[str, str]:
    """Top-level names of every third-party module that ``entry`` may import, through the
    project's own modules (imports inside functions too); each with one module importing it."""
    found: dict[str, str] = {}
    pending, seen = [entry], set()
    while pending:
        module = pending.pop()
        path = module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]  # packages run first
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in names:
                top = name.split(".")[0]
                if top in FIRST_PARTY:
                    pending.append(name)
                elif top not in sys.stdlib_module_names:
                    found.setdefault(top, module)
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def requirements_closure(requirements: tuple[str, ...]) -> frozenset[str]:
    """The distributions those requirements install (as installed here), with their extras."""
    closure: set[str] = set()
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        name = canonical(requirement.name)
        if name in closure and not requirement.extras:
            continue
        closure.add(name)
        for text in metadata.requires(requirement.name) or []:
            needed = Requirement(text)
            wanted = {"extra": ""}, *({"extra": extra} for extra in requirement.extras)
            if needed.marker is None or any(needed.marker.evaluate(env) for env in wanted):
                pending.append(needed)
    return frozenset(closure)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_image_installs_what_its_service_imports(image: str) -> None:
    providers = metadata.packages_distributions()
    installed = requirements_closure(tuple(image_requirements([image])))
    _dockerfile, entries = IMAGES[image]
    missing = {}
    for entry in entries:
        for top, importer in third_party_imports(entry).items():
            distributions = {canonical(name) for name in providers.get(top, [])}
            assert distributions, f"{top} (imported by {importer}) is not installed here"
            if not distributions & installed and (top, importer) not in OPTIONAL_IMPORTS:
                missing[top] = importer
    assert not missing, f"the {image} image lacks the packages of {missing}"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_dockerfile_installs_its_own_set_at_the_tested_versions(image: str) -> None:
    dockerfile, _entries = IMAGES[image]
    text = (PROJECT_ROOT / dockerfile).read_text()
    assert f"python scripts/image_requirements.py {image} " in text
    assert "-c constraints.txt" in text
    assert "COPY pyproject.toml constraints.txt" in text


def test_the_images_do_not_carry_what_they_do_not_need() -> None:
    """The point of one set per image: the frontend has no model runtime, the listener no
    web framework, the batch no broker client."""
    frontend = requirements_closure(tuple(image_requirements(["frontend"])))
    listener = requirements_closure(tuple(image_requirements(["listener"])))
    batch = requirements_closure(tuple(image_requirements(["batch"])))
    assert not {"onnxruntime", "simpleitk", "tritonclient"} & frontend
    assert not {"gradio", "fastapi", "onnxruntime"} & listener
    assert "pika" not in batch


def test_constraints_pin_every_package_at_the_installed_version() -> None:
    pins = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = version
    extras = ["batch", "adapter", "frontend", "listener", "convert", "dev", "train"]
    for name in requirements_closure(tuple(image_requirements(extras))):
        if name == "chest-ct-screening":
            continue
        assert name in pins, f"{name} is not in constraints.txt: bash scripts/write_constraints.sh"
        assert pins[name] == metadata.version(name), (
            f"constraints.txt pins {name}=={pins[name]}, {metadata.version(name)} is installed"
        )
