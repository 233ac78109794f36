"""Shared helpers of the deploy tests: the compose files and the modules beside them.

deploy/ is not a package (it ships beside the compose files, not in the wheel): its modules are
imported the way ``fedser testbed`` imports them, from the folder, by bare name.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from fedser.tools.commands.testbed import deploy_module

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BASE = DEPLOY / "docker-compose.yml"
DEV = DEPLOY / "docker-compose.dev.yml"


@pytest.fixture(scope="session")
def compose():
    """``deploy/compose.py``: reading compose files."""
    return deploy_module("compose", DEPLOY)


@pytest.fixture(scope="session")
def netns():
    """``deploy/netns.py``: the namespace sandbox."""
    return deploy_module("netns", DEPLOY)


@pytest.fixture(scope="session")
def deploy_testbed():
    """``deploy/testbed.py``: the compose files, overlay, environment and engine of ``fedser testbed``."""
    return deploy_module("testbed", DEPLOY)
