"""Reproducible installs: one constraints file pins everything, every route installs through it,
and every package fedser imports is declared."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "tools")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pins() -> dict[str, list[str]]:
    pins: dict[str, list[str]] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, rest = line.partition("==")
            pins.setdefault(name.strip().lower().replace("_", "-"), []).append(rest.split(";")[0].strip())
    return pins


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for reqs in project["optional-dependencies"].values():
        names |= {_name(r) for r in reqs}
    return names - {"fedser"}


def test_constraints_pin_every_declared_package_and_flower_on_its_grpc_line():
    # Prepare
    pins = _pins()

    # Assert
    missing = sorted(_declared() - set(pins))
    assert not missing, f"declared but not pinned in constraints.txt: {missing} (run `make lock`)"
    assert all(len(v) >= 1 and all(re.fullmatch(r"[\w.+!-]+", x) for x in v) for v in pins.values())
    assert pins["flwr"] == ["1.39.0"] or all(v.startswith("1.39.") for v in pins["flwr"])
    assert pins["torch"] == ["2.11.0"] and pins["torchaudio"] == ["2.11.0"]


def test_the_installed_environment_is_the_pinned_one():
    # Prepare
    pins = _pins()

    # Assert: what pytest runs under was installed through constraints.txt.
    for name in ("flwr", "opacus", "numpy", "grpcio", "scikit-learn", "librosa"):
        installed = version(name).split("+")[0]
        assert installed in pins[name], (name, installed, pins[name])


def test_every_install_route_uses_the_constraints_file():
    # Prepare
    makefile = (REPO / "Makefile").read_text()
    ci = (REPO / ".ci" / "run").read_text()

    # Assert
    assert re.search(r"pip install [^\n]*-c constraints\.txt[^\n]*\.\[dev\]", makefile)
    assert re.search(r"^\$\(STAMP\): [^\n]*constraints\.txt", makefile, re.M), "a new pin reinstalls"
    assert "make test" in ci
    for role in ("server", "client"):
        assert "-c constraints.txt" in (REPO / "deploy" / f"Dockerfile.{role}").read_text()
    assert "-c constraints.txt" in (REPO / "README.md").read_text()


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the fedser files that import it, for modules outside the standard library."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "fedser":
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_package_fedser_imports_is_declared():
    # Prepare
    declared = _declared()
    distributions = packages_distributions()

    # Execute
    undeclared = {}
    for module, files in _third_party_imports().items():
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(files)

    # Assert
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
