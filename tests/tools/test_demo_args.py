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


def test_demo_report_says_whether_held_out_accuracy_rose_round_over_round(tmp_path):
    import json

    from fedser.tools.commands.demo import report

    rows = [{"round": i + 1, "server-kws-accuracy": k, "server-kws-uar": k, "server-emotion-accuracy": e,
             "server-emotion-uar": e, "seconds": 1.0} for i, (k, e) in enumerate([(0.5, 0.4), (0.6, 0.45), (0.7, 0.42)])]
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": rows, "summary": {}}))

    text = report(tmp_path)

    assert "| kws | 0.700 | 0.700 | 0.500 -> 0.600 -> 0.700 |" in text
    assert "kws rose every round (0.500 to 0.700)" in text
    assert "emotion rose from 0.400 to 0.420, not every round" in text
