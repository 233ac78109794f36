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


def test_report_of_a_run_without_a_server_test_set_shows_the_devices_evaluation(tmp_path):
    # A test bed's server has no held-out speakers: the devices' federated evaluation is what there is.
    import json

    from fedser.tools.commands.demo import report

    rows = [{"round": i + 1, "kws-accuracy": k, "kws-uar": k / 2, "emotion-accuracy": None, "seconds": 1.0}
            for i, k in enumerate([0.2, 0.4])]
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": rows, "summary": {}}))

    text = report(tmp_path)

    assert "evaluated by the devices on utterances they held out (federated evaluation" in text
    assert "| kws | 0.400 | 0.200 | 0.200 -> 0.400 |" in text and "| emotion |" not in text
    assert "kws rose every round (0.200 to 0.400)" in text


@pytest.mark.parametrize(("settings", "summary", "device_eps", "says"), [
    ({"dp": True, "noise_mode": "none"}, {"user-epsilon": float("inf"), "user-delta": 1e-5}, 7.98,
     ["each utterance is protected with epsilon <= 7.98", "no user-level guarantee",
      "this run adds no user-level noise", "no secure aggregation"]),
    ({"dp": True, "noise_mode": "distributed"}, {"user-epsilon": 3.2, "user-delta": 1e-5}, 7.98,
     ["each person (all of a device's utterances) is protected with epsilon 3.20",
      "sqrt(m) times smaller than on their sum"]),
    ({"dp": False, "noise_mode": "none"}, {"user-epsilon": float("inf"), "user-delta": 1e-5}, 0.0,
     ["no DP-SGD on the devices: single utterances are not protected", "no user-level guarantee"]),
    ({"dp": True, "noise_mode": "local"}, {"user-epsilon": 5.0, "user-delta": 1e-5}, 7.98,
     ["protected with epsilon 5.00", "each update carries the full user-level noise (local mode)"]),
    ({"dp": True, "noise_mode": "distributed", "secure_aggregation": True, "secure_aggregation_threshold": 0.6},
     {"user-epsilon": 3.2, "user-delta": 1e-5}, 7.98,
     ["the server sees only the sum of each round's updates", "fewer than 60% of a round's devices",
      "holds against the server operator too"]),
])
def test_demo_report_says_plainly_which_guarantee_holds(tmp_path, settings, summary, device_eps, says):
    import json

    from fedser.tools.commands.demo import report

    rows = [{"round": 1, "server-kws-accuracy": 0.5, "server-kws-uar": 0.5, "max-device-epsilon": device_eps,
             "seconds": 1.0}]
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": rows, "summary": summary}))
    (tmp_path / "run_settings.json").write_text(json.dumps(settings))

    text = report(tmp_path)

    assert "What this run guarantees:" in text
    for phrase in says:
        assert phrase in text, phrase
