"""configs/config.yaml, generated from the models: every setting, its default and its
description. ``python -m services.core.config [--write]`` prints or writes it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel

from services.core.config.base import Backoff, Section
from services.core.config.loading import DEFAULT_CONFIG_PATH, Settings

YAML_HEADER = """\
# One configuration for every service, generated from services/core/config/ (the one
# place the defaults live): `python -m services.core.config --write`. Copy it and edit what
# your deployment needs. Any leaf can be overridden from the environment:
# CTS__<SECTION>__<KEY>=value (e.g. CTS__RABBITMQ__HOST=broker); lists and mappings in
# YAML flow style (CTS__DICOM__ALLOWED_CALLING_AE_TITLES='[ORTHANC]').
# Relative paths are relative to the project root.
"""
COMMENT_COLUMN = 40


def _yaml_scalar(value: object) -> str:
    if isinstance(value, Path):
        value = value.as_posix()
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False)
        .strip()
        .removesuffix("...")
        .strip()
    )


def _is_subsection(annotation: object) -> bool:
    """A section inside a section (dicom.tls) is written as a block with its own comments;
    a Backoff stays one line (its three numbers read best together)."""
    return (
        isinstance(annotation, type)
        and issubclass(annotation, Section)
        and not issubclass(annotation, Backoff)
    )


def _section_lines(section_type: type[BaseModel], indent: str) -> list[str]:
    lines = []
    for name, field in section_type.model_fields.items():
        if _is_subsection(field.annotation):
            assert isinstance(field.annotation, type)
            heading = f"{indent}{name}:"
            if field.description:
                heading = f"{heading.ljust(COMMENT_COLUMN - 1)} # {field.description}"
            lines.append(heading)
            lines.extend(_section_lines(field.annotation, indent + "  "))
            continue
        default = field.get_default(call_default_factory=True)
        entry = f"{indent}{name}: {_yaml_scalar(default)}"
        if field.description:
            entry = f"{entry.ljust(COMMENT_COLUMN - 1)} # {field.description}"
        lines.append(entry)
    return lines


def default_config_yaml() -> str:
    """configs/config.yaml: every setting with its default and its description."""
    lines = [YAML_HEADER.rstrip()]
    for section_name, section_field in Settings.model_fields.items():
        section_type = section_field.annotation
        assert isinstance(section_type, type)
        assert issubclass(section_type, BaseModel)
        lines.append("")
        lines.append(f"{section_name}:")
        lines.extend(_section_lines(section_type, "  "))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.core.config", description=__doc__)
    parser.add_argument(
        "--write", action="store_true", help=f"write {DEFAULT_CONFIG_PATH} (default: print it)"
    )
    arguments = parser.parse_args(argv)
    text = default_config_yaml()
    if arguments.write:
        DEFAULT_CONFIG_PATH.write_text(text)
    else:
        sys.stdout.write(text)
    return 0
