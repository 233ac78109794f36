"""Shared helpers of the deploy tests: the compose files and the network-namespace runner."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BASE = DEPLOY / "docker-compose.yml"
DEV = DEPLOY / "docker-compose.dev.yml"


def _load_runner():
    # deploy/ is not a package (it ships beside the compose files, not in the wheel).
    spec = importlib.util.spec_from_file_location("netns_runner", DEPLOY / "netns_runner.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns_runner"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def runner():
    return _load_runner()
