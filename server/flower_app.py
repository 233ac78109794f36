"""The Flower App declaration that ``flwr run`` submits.

Installed copies of fedser have no ``pyproject.toml``, so the app folder handed to
``flwr run`` is generated here: the component paths plus the run-config defaults taken
from ``RunSettings`` (the single source of those defaults; a test holds the repository's
``[tool.flwr.app.config]`` to the same values).
"""
from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

from .settings import RunSettings

SERVER_APP = "fedser.server.app:app"
CLIENT_APP = "fedser.client.app:app"


def run_config_defaults() -> dict[str, object]:
    out: dict[str, object] = {}
    for f in fields(RunSettings):
        out[f.name.replace("_", "-")] = "" if f.default is MISSING else f.default
    return out


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app_dir(dest: str | Path, version: str = "0.1.0") -> Path:
    """Write a minimal Flower App folder (only pyproject.toml) and return it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    lines = ["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", 'name = "fedser"', f'version = "{version}"', "", "[tool.flwr.app]",
             'publisher = "fedser"', "", "[tool.flwr.app.components]", f'serverapp = "{SERVER_APP}"',
             f'clientapp = "{CLIENT_APP}"', "", "[tool.flwr.app.config]"]
    lines += [f"{k} = {_toml(v)}" for k, v in run_config_defaults().items()]
    (dest / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return dest
