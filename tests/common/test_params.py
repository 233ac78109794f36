"""Tests of fedser.common.params: model state <-> named float32 arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from fedser.common.errors import ConfigError
from fedser.common.models import ENCODERS, ModelConfig, build_model
from fedser.common.params import StateMismatch, arrays_to_state, state_to_arrays

N_FEATURES = ModelConfig().n_features  # rows of the default features


def _model(encoder: str = "crnn", seed: int = 0, width: float = 1.0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(encoder=encoder, width=width))


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_round_trip_through_arrays(encoder):
    # Prepare: two differently initialised models
    source, target = _model(encoder, seed=0), _model(encoder, seed=1)
    # Execute
    arrays = state_to_arrays(source)
    arrays_to_state(arrays, target)
    # Assert
    back = state_to_arrays(target)
    assert list(back) == list(arrays) == list(source.state_dict())
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    x = torch.randn(2, N_FEATURES, 101)
    source.eval()
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(x, "emotion"), source(x, "emotion"), rtol=0, atol=0)


def test_arrays_are_float32_copies():
    # Prepare
    m = _model()
    # Execute
    arrays = state_to_arrays(m)
    arrays["heads.kws.bias"][:] = 7.0
    # Assert
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert not torch.any(m.heads["kws"].bias == 7.0)


def test_state_to_arrays_accepts_a_state_dict_and_an_opacus_wrapper():
    m = _model()
    from_model = state_to_arrays(m)
    from_state = state_to_arrays(m.state_dict())
    from_wrapper = state_to_arrays(GradSampleModule(m))
    assert list(from_state) == list(from_wrapper) == list(from_model)
    assert all(np.array_equal(from_wrapper[k], from_model[k]) for k in from_model)


def test_arrays_to_state_loads_into_an_opacus_wrapper():
    source, target = _model(seed=0), _model(seed=1)
    arrays_to_state(state_to_arrays(source), GradSampleModule(target))
    assert torch.equal(target.encoder.gru.weight_hh_l0, source.encoder.gru.weight_hh_l0)


def test_arrays_to_state_names_every_problem_and_loads_nothing():
    # Prepare
    m = _model()
    before = state_to_arrays(m)
    arrays = {k: v + 1.0 for k, v in before.items()}
    del arrays["heads.kws.bias"]
    arrays["encoder.gru.weight_hh_l0"] = np.zeros((3, 3), np.float32)
    arrays["heads.emotion.bias"] = np.full(9, np.nan, np.float32)
    arrays["decoder.weight"] = np.zeros(2, np.float32)
    # Execute
    with pytest.raises(StateMismatch) as info:
        arrays_to_state(arrays, m)
    # Assert
    message = str(info.value)
    assert "missing heads.kws.bias" in message
    assert "unexpected decoder.weight" in message
    assert "encoder.gru.weight_hh_l0: expected shape (288, 96), got (3, 3)" in message
    assert "heads.emotion.bias: contains NaN or Inf" in message
    assert isinstance(info.value, ConfigError)
    after = state_to_arrays(m)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_arrays_from_another_width_are_refused():
    half = state_to_arrays(_model(width=0.5))
    with pytest.raises(StateMismatch, match="expected shape"):
        arrays_to_state(half, _model(width=1.0))


def test_non_numeric_values_are_refused():
    m = _model("cnn")
    arrays = state_to_arrays(m)
    arrays["heads.kws.bias"] = np.array(["a"] * 12)
    with pytest.raises(StateMismatch, match="heads.kws.bias: not a numeric array"):
        arrays_to_state(arrays, m)


def test_state_to_arrays_rejects_other_types():
    with pytest.raises(TypeError, match="list"):
        state_to_arrays([1, 2, 3])
