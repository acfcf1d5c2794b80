"""Print the requirements of one image: pyproject.toml's common dependencies and the named
extras (an extra that names this project's own extras is expanded), one per line.

    python scripts/image_requirements.py adapter > requirements.txt
    pip install -r requirements.txt -c constraints.txt

The Dockerfiles run it before the code is copied in, so a change of code reuses the layer.
Standard library only: it runs in a bare python image.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def image_requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    own = re.compile(rf"^{re.escape(project['name'])}\[(?P<extras>[^\]]+)\]$")
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    requirements: list[str] = list(project["dependencies"])
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        seen.add(extra)
        for requirement in optional[extra]:
            match = own.match(requirement)
            if match:
                pending.extend(name.strip() for name in match["extras"].split(","))
            elif requirement not in requirements:
                requirements.append(requirement)
    return requirements


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python scripts/image_requirements.py EXTRA [EXTRA ...]")
    print("\n".join(image_requirements(sys.argv[1:])))
