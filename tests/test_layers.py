"""The four floors and the one-way rule (docs/architecture.md): common is the contract, client and
server never import each other, only tools may import all three, and nothing imports tools."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = ("common", "client", "server", "tools")
ALLOWED = {
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "tools": {"common", "client", "server", "tools"},
}


def _fedser_imports(path: Path, floor: str) -> set[str]:
    """The fedser floors ``path`` imports (absolute ``fedser.X`` imports and relative ones)."""
    floors = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                floors.add(floor)   # relative imports stay inside the package
                continue
            names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedser" and len(parts) > 1:
                floors.add(parts[1])
    return floors


@pytest.mark.parametrize("floor", FLOORS)
def test_each_floor_imports_only_the_floors_below_it(floor):
    # Execute
    broken = {str(p.relative_to(REPO)): sorted(_fedser_imports(p, floor) - ALLOWED[floor])
              for p in sorted((REPO / floor).rglob("*.py"))}

    # Assert
    assert not {k: v for k, v in broken.items() if v}, f"{floor}/ imports a floor it may not"


def test_nothing_outside_tools_imports_tools():
    # Execute
    importers = [str(p.relative_to(REPO)) for floor in ("common", "client", "server", "deploy")
                 for p in (REPO / floor).rglob("*.py") if "tools" in _fedser_imports(p, floor)]

    # Assert
    assert importers == []


def test_the_rule_sees_a_broken_import(tmp_path):
    # Prepare: a common module that imports the server, as a mistake would.
    bad = tmp_path / "bad.py"
    bad.write_text("from fedser.server.strategy import HeteroFedAvg\nimport fedser.tools.cli\n")

    # Execute / Assert
    assert _fedser_imports(bad, "common") - ALLOWED["common"] == {"server", "tools"}
