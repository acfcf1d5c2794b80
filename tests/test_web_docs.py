"""The README says what the code does: the permissions table of "Security" is the one in
services/core/access.py, the public paths it names are the gate's, and "The study registry"
names every table of the registry's schema and the worklist's refresh as the code has them."""

from __future__ import annotations

import re

from services.core.access import PERMISSIONS, Permission, Role
from services.core.config import PROJECT_ROOT
from services.frontend.app import REFRESH_SECONDS
from services.frontend.auth.gate import PUBLIC_PATHS
from services.registry.models import Base

README = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")


def readme_permissions() -> dict[Role, set[Permission]]:
    table = README.split("<!-- permissions:", 1)[1].split("<!-- /permissions -->", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    header = [cell.strip() for cell in table.splitlines()[1].strip("|").split("|")]
    roles = [Role(name) for name in header[1:]]
    granted: dict[Role, set[Permission]] = {role: set() for role in roles}
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        found = re.match(r"`([a-z_]+)`", cells[0])
        assert found, line
        for role, cell in zip(roles, cells[1:], strict=True):
            assert cell in ("yes", "no"), line
            if cell == "yes":
                granted[role].add(Permission(found.group(1)))
    return granted


def test_the_readme_permissions_table_is_the_code_s() -> None:
    documented = readme_permissions()
    assert set(documented) == set(Role)
    assert {role: frozenset(rights) for role, rights in documented.items()} == PERMISSIONS
    rows = README.split("<!-- permissions:", 1)[1].split("<!-- /permissions -->", 1)[0]
    assert rows.count("| `") == len(Permission)  # every permission has its row


def test_the_public_paths_are_the_ones_the_readme_names() -> None:
    section = README.split("## Security", 1)[1].split("\n## ", 1)[0]
    for path in ("/sign-in", "/healthz"):
        assert path in PUBLIC_PATHS
        assert f"`{path}`" in section


def test_the_registry_section_names_every_table_and_the_refresh() -> None:
    table = README.split("<!-- registry tables:", 1)[1].split("<!-- /registry tables -->", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE)
    assert sorted(documented) == sorted([*Base.metadata.tables, "alembic_version"])
    section = README.split("### The study registry", 1)[1].split("\n### ", 1)[0]
    assert REFRESH_SECONDS == 1.0
    assert "the page asks every second" in section
    assert "`REFRESH_SECONDS`" in section


def test_every_published_port_has_its_row_in_the_ports_table() -> None:
    """Each port a compose file publishes, and the remote stack's database, is in "Ports and
    who may use them" with what guards it."""
    table = README.split("### Ports and who may use them", 1)[1].split("\n#", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| ")]
    published = {
        int(port)
        for name in ("compose.base.yaml", "compose.local.yaml", "compose.remote.yaml")
        for port in re.findall(
            r'- "\$\{CTS_BIND_ADDRESS:-127\.0\.0\.1\}:\$\{CTS_\w+_PORT:-(\d+)\}:\d+"',
            (PROJECT_ROOT / name).read_text(encoding="utf-8"),
        )
    }
    assert {9090, 3000, 7860, 11112} <= published  # the pattern still reads the files
    for port in published | {5432}:
        assert any(re.search(rf"\b{port}\b", cell) or covers(cell, port) for cell in first_cells), (
            port
        )


def covers(cell: str, port: int) -> bool:
    """A row of a range of ports ("8000-8002")."""
    return any(int(low) <= port <= int(high) for low, high in re.findall(r"(\d+)-(\d+)", cell))
