"""Run settings: kebab-case keys, strict type conversion, validation, and the app declaration."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedser.common.errors import ConfigError
from fedser.server.flower_app import CLIENT_APP, SERVER_APP, run_config_defaults, write_app_dir
from fedser.server.settings import RunSettings

REPO = Path(__file__).resolve().parents[2]


def test_kebab_case_keys_map_onto_fields_with_their_types():
    # Prepare
    cfg = {"run-dir": "/tmp/run", "num-server-rounds": "7", "min-clients": 3, "fraction-train": "0.5",
           "noise-mode": "local", "dp": "false", "resume": "yes", "clip-norm": 1, "round-timeout": 30,
           "user-delta": 1e-6, "kws-corpus": "/data/sc"}
    # Execute
    s = RunSettings.from_run_config(cfg)
    # Assert
    assert s.run_dir == "/tmp/run"
    assert s.num_server_rounds == 7 and isinstance(s.num_server_rounds, int)
    assert s.min_clients == 3 and s.fraction_train == 0.5
    assert s.noise_mode == "local"
    assert s.dp is False and s.resume is True
    assert s.clip_norm == 1.0 and isinstance(s.clip_norm, float)
    assert s.round_timeout == 30.0 and s.user_delta == 1e-6 and s.kws_corpus == "/data/sc"
    assert s.batch_size == RunSettings.__dataclass_fields__["batch_size"].default  # untouched default


def test_keys_that_are_not_settings_are_ignored():
    # Execute
    s = RunSettings.from_run_config({"run-dir": "r", "some-flower-key": "x"})
    # Assert
    assert s.run_dir == "r" and not hasattr(s, "some_flower_key")


def test_the_run_directory_is_required():
    # Execute / Assert
    with pytest.raises(ConfigError, match="run-dir is required"):
        RunSettings.from_run_config({"num-server-rounds": 2})
    with pytest.raises(ConfigError, match="run-dir is required"):
        RunSettings.from_run_config({"run-dir": ""})


def test_every_conversion_error_is_collected_into_one_message():
    # Prepare: four bad values and a missing run-dir
    cfg = {"num-server-rounds": "three", "clip-norm": "wide", "dp": "maybe", "batch-size": 2.5}
    # Execute
    with pytest.raises(ConfigError) as info:
        RunSettings.from_run_config(cfg)
    # Assert
    text = str(info.value)
    for fragment in ("num-server-rounds='three'", "clip-norm='wide'", "dp='maybe'", "batch-size=2.5",
                     "run-dir is required"):
        assert fragment in text


@pytest.mark.parametrize("key, raw", [
    ("dp", "flase"),           # a typo is not False
    ("resume", 2),
    ("num-server-rounds", 2.5),  # not silently 2
    ("min-clients", True),       # a bool is not a count
    ("clip-norm", False),
    ("seed", "1.0"),
])
def test_values_are_not_guessed(key, raw):
    # Execute / Assert
    with pytest.raises(ConfigError, match=key):
        RunSettings.from_run_config({"run-dir": "r", key: raw})


@pytest.mark.parametrize("raw, expected", [(True, True), ("TRUE", True), ("1", True), ("no", False), (0, False)])
def test_bool_spellings(raw, expected):
    # Execute / Assert
    assert RunSettings.from_run_config({"run-dir": "r", "dp": raw}).dp is expected


def test_an_integral_float_is_an_int():
    # Execute / Assert (TOML written by tools may say 3.0)
    assert RunSettings.from_run_config({"run-dir": "r", "num-server-rounds": 3.0}).num_server_rounds == 3


@pytest.mark.parametrize("key, value, fragment", [
    ("num-server-rounds", 0, "num-server-rounds"),
    ("min-clients", 0, "min-clients"),
    ("fraction-train", 0.0, "fraction-train"),
    ("fraction-train", 1.5, "fraction-train"),
    ("evaluate-every", -1, "evaluate-every"),
    ("noise-mode", "central", "noise-mode"),
    ("clip-norm", 0.0, "clip-norm"),
    ("clip-norm", float("inf"), "clip-norm"),
    ("clip-quantile", 1.0, "clip-quantile"),
    ("clip-quantile", -0.5, "clip-quantile"),
    ("clip-learning-rate", 0.0, "clip-learning-rate"),
    ("clip-learning-rate", float("nan"), "clip-learning-rate"),
    ("noise-multiplier", -0.1, "noise-multiplier"),
    ("noise-multiplier", float("nan"), "noise-multiplier"),
    ("dp-noise-multiplier", -1.0, "dp-noise-multiplier"),
    ("user-delta", 0.0, "user-delta"),
    ("user-delta", 1.0, "user-delta"),
    ("local-epochs", 0, "local-epochs"),
    ("batch-size", 0, "batch-size"),
    ("total-clients", -1, "total-clients"),
    ("learning-rate", 0.0, "learning-rate"),
    ("dp-max-grad-norm", -1.0, "dp-max-grad-norm"),
    ("round-timeout", 0.0, "round-timeout"),
    ("kws-pretrain-epochs", 0, "kws-pretrain-epochs"),
    ("train-scope", "encoder", "train-scope"),
])
def test_values_out_of_range_are_refused_naming_the_setting(key, value, fragment):
    # Execute / Assert
    with pytest.raises(ConfigError, match=fragment):
        RunSettings.from_run_config({"run-dir": "r", key: value})


def test_range_problems_are_collected_together():
    # Execute
    with pytest.raises(ConfigError) as info:
        RunSettings.from_run_config({"run-dir": "r", "num-server-rounds": 0, "noise-mode": "x", "user-delta": 2})
    # Assert
    text = str(info.value)
    assert "num-server-rounds" in text and "noise-mode" in text and "user-delta" in text


def test_head_only_training_needs_a_pretrained_encoder():
    for scope in ("heads", "norms"):
        with pytest.raises(ConfigError, match=f"train-scope={scope} needs kws-corpus or public-corpus"):
            RunSettings.from_run_config({"run-dir": "r", "train-scope": scope})
    RunSettings.from_run_config({"run-dir": "r", "train-scope": "heads", "kws-corpus": "/data/public"}).validate()


def test_the_defaults_validate():
    # Execute / Assert: every default is itself a valid setting
    RunSettings(run_dir="r").validate()


# ---------------------------------------------------------------- the Flower App declaration


def _repo_app() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]


def test_the_repository_pyproject_run_config_equals_the_settings_defaults():
    # Prepare
    declared = _repo_app()["config"]
    # Execute
    defaults = run_config_defaults()
    # Assert: same keys, same values, same types (1 and 1.0 would pass ==, not the type check)
    assert declared == defaults
    assert {k: type(v) for k, v in declared.items()} == {k: type(v) for k, v in defaults.items()}


def test_the_run_config_defaults_cover_every_setting_in_kebab_case():
    # Execute
    defaults = run_config_defaults()
    # Assert
    assert list(defaults) == [f.name.replace("_", "-") for f in dataclasses.fields(RunSettings)]
    assert defaults["run-dir"] == ""   # required: no default path


def test_the_repository_pyproject_names_the_fedser_components():
    # Execute
    components = _repo_app()["components"]
    # Assert
    assert components == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}


def test_write_app_dir_writes_a_pyproject_with_the_same_config_and_components(tmp_path):
    # Execute
    dest = write_app_dir(tmp_path / "app", version="1.2.3")
    with open(dest / "pyproject.toml", "rb") as f:
        doc = tomllib.load(f)
    # Assert
    assert dest == tmp_path / "app"
    app = doc["tool"]["flwr"]["app"]
    assert app["config"] == run_config_defaults() == _repo_app()["config"]
    assert {k: type(v) for k, v in app["config"].items()} == {k: type(v) for k, v in run_config_defaults().items()}
    assert app["components"] == _repo_app()["components"]
    assert doc["project"]["name"] == "fedser" and doc["project"]["version"] == "1.2.3"
    assert app["publisher"] == _repo_app()["publisher"]


def test_the_written_defaults_with_a_run_dir_are_valid_settings(tmp_path):
    # Prepare
    dest = write_app_dir(tmp_path)
    with open(dest / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    # Execute
    s = RunSettings.from_run_config({**config, "run-dir": str(tmp_path / "run")})
    # Assert
    assert s == RunSettings(run_dir=str(tmp_path / "run"))


def test_clip_adapts_only_under_user_level_noise():
    base = {"run-dir": "r"}
    assert RunSettings.from_run_config(base).adapts_clip                      # the defaults: z = 1, local
    assert not RunSettings.from_run_config({**base, "noise-mode": "none"}).adapts_clip
    assert not RunSettings.from_run_config({**base, "noise-multiplier": 0.0}).adapts_clip
    assert not RunSettings.from_run_config({**base, "clip-quantile": 0.0}).adapts_clip
