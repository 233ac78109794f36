"""Flower record conversions: round trips, and refusals of anything but named float32 arrays."""
from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedser.common import keys
from fedser.common.errors import ConfigError
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig
from fedser.common.records import arrays_to_record, model_from_config, model_to_config, record_to_arrays


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "encoder.stem.conv.weight": rng.standard_normal((4, 3, 2)).astype(np.float32),
        "encoder.stem.norm.bias": rng.standard_normal(4).astype(np.float32),
        "heads.kws.weight": rng.standard_normal((12, 8)).astype(np.float32).T,  # non-contiguous view
        "scalar": np.array(1.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def test_arrays_round_trip_through_an_array_record_keeps_names_order_shapes_and_values():
    # Prepare
    arrays = _arrays()
    # Execute
    record = arrays_to_record(arrays)
    back = record_to_arrays(record)
    # Assert
    assert isinstance(record, ArrayRecord)
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == np.float32
        assert back[name].shape == a.shape
        np.testing.assert_array_equal(back[name], a)


def test_arrays_to_record_counts_the_bytes_of_the_payload():
    # Prepare
    arrays = {"w": np.zeros((100, 10), dtype=np.float32)}
    # Execute
    record = arrays_to_record(arrays)
    # Assert: at least the raw float32 payload travels (4 bytes per element)
    assert record.count_bytes() >= 100 * 10 * 4


@pytest.mark.parametrize("bad", [
    np.zeros(3, dtype=np.float64),
    np.zeros(3, dtype=np.float16),
    np.zeros(3, dtype=np.int32),
    np.array(["a", "b"]),
    [0.0, 1.0],
])
def test_arrays_to_record_refuses_anything_but_float32_arrays_naming_the_array(bad):
    # Prepare
    arrays = {"good": np.zeros(3, dtype=np.float32), "bad.one": bad}
    # Execute / Assert
    with pytest.raises(ConfigError, match="bad.one") as info:
        arrays_to_record(arrays)
    assert "good" not in str(info.value).split("not:")[-1]


def test_record_to_arrays_keeps_a_foreign_dtype_for_the_validator_to_see():
    # Prepare: a client may build its record by hand, bypassing arrays_to_record
    record = ArrayRecord({"w": Array(np.ones((2, 2), dtype=np.float64))})
    # Execute
    back = record_to_arrays(record)
    # Assert
    assert back["w"].dtype == np.float64


def test_model_config_round_trip_through_a_config_record():
    # Prepare: non-default values everywhere, so a dropped field shows
    model_config = ModelConfig(encoder="crnn", n_features=32, width=0.5, n_emotions=7, n_keywords=10,
                               dropout=0.2, group_size=2, min_units=4, cmn=False)
    spec = FeatureSpec(kinds=("mfcc", "chroma"), n_mfcc=20, n_chroma=12, hop_length=320, emotion_seconds=2.0)
    # Execute
    config = ConfigRecord(model_to_config(model_config, spec))
    got_model, got_spec = model_from_config(config)
    # Assert
    assert got_model == model_config
    assert got_spec == spec
    assert all(isinstance(config[k], str) for k in (keys.MODEL_CONFIG, keys.FEATURE_SPEC))
    assert json.loads(config[keys.MODEL_CONFIG])["encoder"] == "crnn"


def test_model_from_config_accepts_a_plain_dict():
    # Prepare
    config = model_to_config(ModelConfig(), FeatureSpec())
    # Execute
    got_model, got_spec = model_from_config(dict(config))
    # Assert
    assert (got_model, got_spec) == (ModelConfig(), FeatureSpec())


@pytest.mark.parametrize("drop", [[keys.MODEL_CONFIG], [keys.FEATURE_SPEC], [keys.MODEL_CONFIG, keys.FEATURE_SPEC]])
def test_model_from_config_names_every_missing_key(drop):
    # Prepare
    config = model_to_config(ModelConfig(), FeatureSpec())
    for k in drop:
        del config[k]
    # Execute / Assert
    with pytest.raises(ConfigError) as info:
        model_from_config(config)
    for k in drop:
        assert k in str(info.value)


def test_model_from_config_rejects_an_invalid_model_config():
    # Prepare: a width the model cannot have
    config = model_to_config(ModelConfig(), FeatureSpec())
    bad = json.loads(config[keys.MODEL_CONFIG])
    bad["width"] = -1.0
    config[keys.MODEL_CONFIG] = json.dumps(bad)
    # Execute / Assert
    with pytest.raises(ConfigError, match="width"):
        model_from_config(config)


@pytest.mark.parametrize("theirs, says", [
    (keys.PROTOCOL_VERSION + 1, "the server runs the newer fedser"),
    (keys.PROTOCOL_VERSION - 1, "the device runs the newer fedser"),
    (None, "update the server"),
    ("one", "expected an integer"),
])
def test_an_instruction_from_another_protocol_version_is_refused_with_who_to_update(theirs, says):
    # Prepare
    config = model_to_config(ModelConfig(), FeatureSpec())
    if theirs is None:
        del config[keys.PROTOCOL]
    else:
        config[keys.PROTOCOL] = theirs

    # Execute / Assert
    with pytest.raises(ConfigError, match=says):
        model_from_config(config)
