"""``fedser demo`` refuses contradictory or out-of-range options before it starts anything."""
from __future__ import annotations

import pytest

from fedser.tools.cli import main


@pytest.mark.parametrize("extra, message", [
    (["--public", "0.9"], "--public 0.9: expected a share in [0, 1) that leaves speakers for devices"),
    (["--public", "-0.1"], "--public -0.1"),
    (["--public", "0", "--train-scope", "norms"], "--train-scope norms needs public speech"),
    (["--threads", "-1"], "--threads -1"),
    (["--tiers", "1.0,0.3"], "each tier must be 1.0, 0.5 or 0.25"),
])
def test_bad_options_are_named_and_nothing_is_made(tmp_path, capsys, extra, message):
    out = tmp_path / "runs" / "demo"
    rc = main(["demo", "--out", str(out), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()   # no corpus synthesized, no run directory
