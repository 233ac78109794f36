"""The device owner's privacy policy: parsed from the node config, and what it lets through."""
from __future__ import annotations

import pytest

from fedser.client.device import DeviceSettings
from fedser.client.policy import PrivacyPolicy
from fedser.client.update import RoundSettings
from fedser.common.errors import ConfigError


def test_the_default_policy_requires_dp_sgd_and_nothing_else():
    # Prepare
    policy = PrivacyPolicy()
    # Execute / Assert
    assert policy.violations(RoundSettings()) == []
    assert "without DP-SGD" in policy.violations(RoundSettings(dp=False))[0]
    assert policy.violations(RoundSettings(noise_mode="none", noise_multiplier=0.0)) == []


def test_an_owner_can_demand_user_level_noise_and_limit_what_trains():
    # Prepare
    policy = PrivacyPolicy(min_update_noise=1.0, train_scopes=("heads",))
    # Execute
    none = policy.violations(RoundSettings(noise_mode="none", scope="heads"))
    weak = policy.violations(RoundSettings(noise_mode="local", noise_multiplier=0.5, scope="heads"))
    wide = policy.violations(RoundSettings(noise_mode="local", noise_multiplier=1.0, scope="all"))
    ok = policy.violations(RoundSettings(noise_mode="distributed", noise_multiplier=1.2, scope="heads"))
    # Assert
    assert len(none) == 1 and "no user-level noise" in none[0]
    assert len(weak) == 1 and "0.5" in weak[0] and "minimum 1" in weak[0]
    assert len(wide) == 1 and "'all'" in wide[0]
    assert ok == []


def test_the_dp_noise_floor_is_the_higher_of_server_and_device():
    policy = PrivacyPolicy(min_dp_noise=1.5)
    assert policy.dp_noise_floor(0.0) == 1.5 and policy.dp_noise_floor(2.0) == 2.0


def test_node_config_sets_the_policy_and_round_trips():
    # Prepare
    wanted = PrivacyPolicy(require_dp=False, min_dp_noise=0.8, min_update_noise=1.0, train_scopes=("norms", "heads"))
    # Execute
    settings = DeviceSettings.from_node_config({"data": "/d", **wanted.to_node_config()})
    from_strings = DeviceSettings.from_node_config({"data": "/d", "require-dp": "false", "train-scopes": "heads"})
    # Assert
    assert settings.policy == wanted
    assert from_strings.policy == PrivacyPolicy(require_dp=False, train_scopes=("heads",))
    assert DeviceSettings.from_node_config({"data": "/d"}).policy == PrivacyPolicy()


def test_a_bad_policy_is_refused_naming_every_problem():
    with pytest.raises(ConfigError) as info:
        DeviceSettings.from_node_config({"data": "/d", "require-dp": "maybe", "min-dp-noise": -1,
                                         "min-update-noise": "x", "train-scopes": "all,everything"})
    message = str(info.value)
    assert all(k in message for k in ("require-dp", "min-dp-noise", "min-update-noise", "train-scopes"))


def test_simulated_devices_take_their_dp_requirement_from_the_run(tmp_path):
    # Prepare: a partition folder with one device manifest.
    (tmp_path / "device-0").mkdir()
    (tmp_path / "device-0" / "data.csv").write_text("path,label,speaker,task,offset,duration\n")
    run = {"partitions-dir": str(tmp_path), "partition-require-dp": False}
    # Execute
    relaxed = DeviceSettings.from_node_config({"partition-id": 0}, run)
    strict = DeviceSettings.from_node_config({"partition-id": 0}, {"partitions-dir": str(tmp_path)})
    # Assert
    assert relaxed.policy.require_dp is False and strict.policy.require_dp is True
