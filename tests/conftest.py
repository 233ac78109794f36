"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Slow end-to-end modules first: under pytest-xdist (``--dist loadfile``) each module runs
    on one worker, and the long ones then overlap with the many short ones instead of ending last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def fedser_home(monkeypatch, tmp_path_factory) -> Path:
    """Every test gets its own fedser home (device identity, ledgers, caches), never ``~/.fedser``;
    tests that start agents pass their own in the processes' environment."""
    home = tmp_path_factory.mktemp("fedser-home")
    monkeypatch.setenv("FEDSER_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real development corpus beside the project; skips the test when it is absent."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real corpus not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A tiny espeak-ng corpus (4 speakers; RAVDESS + Speech Commands layouts), made once per session."""
    from fedser.tools import synth

    out = tmp_path_factory.mktemp("tiny-corpus")
    synth.synthesize_corpus(out, n_speakers=4, statements=1, repetitions=2, command_repetitions=1,
                            unknown_words=("bed", "cat"), unknown_repetitions=1, noise_seconds=5.0,
                            progress=False)
    return out
