"""Tests of fedser.common.slicing: HeteroFL nested slices of the global model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedser.common.errors import ConfigError
from fedser.common.models import ENCODERS, ModelConfig, build_model
from fedser.common.params import arrays_to_state, state_to_arrays
from fedser.common.slicing import (
    _dim_index,
    slice_index,
    slice_state,
)

N_FEATURES = ModelConfig().n_features  # rows of the default features

ENCODER_NAMES = sorted(ENCODERS)
TIERS = (1.0, 0.5, 0.25)
# Tiers plus arbitrary widths; every one builds a real model, so keep the set small.
widths = st.sampled_from(TIERS + (0.75, 0.4, 0.1))
hyp = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _global_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    # Distinct values everywhere, so a wrong index cannot pass by accident.
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in build_model(cfg).state_dict().items()}


# --------------------------------------------------------------------------- hand examples


def test_dim_index_takes_the_first_units_of_each_block():
    assert _dim_index(12, 6, 3).tolist() == [0, 1, 4, 5, 8, 9]
    assert _dim_index(8, 4, 1).tolist() == [0, 1, 2, 3]
    assert _dim_index(5, 5, 1).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError):
        _dim_index(12, 5, 3)


def test_crnn_half_width_indices_by_hand():
    # Prepare: crnn at 1.0 has convs 32, 48 and GRU hidden 96; at 0.5: 16, 24 and 48.
    cfg = ModelConfig(encoder="crnn")
    # Execute
    index = slice_index(cfg, 0.5)
    # Assert
    rows, cols, taps = index["encoder.convs.0.conv.weight"]
    assert rows.ravel().tolist() == list(range(16))
    assert cols.ravel().tolist() == list(range(N_FEATURES))  # features never scale
    assert taps.ravel().tolist() == list(range(5))  # neither do kernels
    rows, cols = index["encoder.gru.weight_hh_l0"]  # (3 * 96, 96): r, z, n gates
    assert rows.ravel().tolist() == list(range(0, 48)) + list(range(96, 144)) + list(range(192, 240))
    assert cols.ravel().tolist() == list(range(48))
    rows, cols = index["encoder.gru.weight_ih_l0"]  # (3 * 96, 48 conv channels)
    assert cols.ravel().tolist() == list(range(24))
    (bias,) = index["encoder.gru.bias_hh_l0"]
    assert bias.tolist() == list(range(0, 48)) + list(range(96, 144)) + list(range(192, 240))
    rows, cols = index["heads.kws.weight"]  # (12, [mean 96 | std 96])
    assert rows.ravel().tolist() == list(range(12))  # class counts never scale
    assert cols.ravel().tolist() == list(range(48)) + list(range(96, 144))
    (bias,) = index["heads.emotion.bias"]
    assert bias.tolist() == list(range(9))


def test_cnn_quarter_width_of_a_tiny_config_by_hand():
    # Prepare: channels (16, 24, 32, 48) -> (8, 8, 8, 12) at 0.25 with group size 4, at least 8.
    cfg = ModelConfig(encoder="cnn", n_features=3, n_emotions=2, n_keywords=2)
    # Execute
    index = slice_index(cfg, 0.25)
    state = slice_state(_global_state(cfg), cfg, 0.25)
    # Assert
    assert [a.ravel().tolist() for a in index["encoder.stem.conv.weight"]] == [list(range(8)), [0, 1, 2], [0, 1, 2]]
    assert [a.ravel().tolist() for a in index["encoder.blocks.2.conv1.weight"]] == [
        list(range(12)),
        list(range(8)),
        list(range(9)),
    ]
    assert index["encoder.blocks.0.norm1.weight"][0].tolist() == list(range(8))
    assert state["heads.kws.weight"].shape == (2, 24)
    assert state["encoder.blocks.0.conv2.weight"].shape == (8, 8, 9)


def test_index_arrays_are_read_only():
    (bias,) = slice_index(ModelConfig(encoder="cnn", n_features=40), 0.5)["encoder.stem.norm.bias"]
    with pytest.raises(ValueError):
        bias[0] = 3


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("encoder", ENCODER_NAMES)
def test_slicing_at_the_global_width_is_identity(encoder):
    cfg = ModelConfig(encoder=encoder)
    g = _global_state(cfg)
    out = slice_state(g, cfg, 1.0)
    assert list(out) == list(g)
    assert all(np.array_equal(out[k], g[k]) for k in g)


@hyp
@given(encoder=st.sampled_from(ENCODER_NAMES), w1=widths, w2=widths)
def test_slices_nest(encoder, w1, w2):
    # Prepare
    w2, w1 = sorted((w1, w2))
    cfg = ModelConfig(encoder=encoder)
    g = _global_state(cfg)
    # Execute
    via_w1 = slice_state(slice_state(g, cfg, w1), cfg.scaled(w1), w2)
    direct = slice_state(g, cfg, w2)
    # Assert
    assert list(via_w1) == list(direct)
    assert all(np.array_equal(via_w1[k], direct[k]) for k in direct)


@hyp
@given(encoder=st.sampled_from(ENCODER_NAMES), width=widths)
def test_sub_state_loads_strictly_and_runs(encoder, width):
    # Prepare
    cfg = ModelConfig(encoder=encoder)
    sub = build_model(cfg.scaled(width)).eval()
    # Execute
    arrays_to_state(slice_state(_global_state(cfg), cfg, width), sub)
    with torch.no_grad():
        logits = sub(torch.randn(2, N_FEATURES, 33), "kws")
    # Assert
    assert logits.shape == (2, 12)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("encoder", ENCODER_NAMES)
@pytest.mark.parametrize("width", [0.5, 0.25])
def test_global_model_zero_outside_the_slice_computes_the_sub_model(encoder, width):
    # Oracle for the block layout: with every element outside the slice set to zero,
    # the extra channels / GRU units stay exactly zero and the heads ignore them, so
    # the wide model must compute what the narrow one does. A slice that took the
    # first 3h rows of a GRU weight, or the first 2c embedding columns, would fail.
    # Prepare
    torch.manual_seed(1)
    cfg = ModelConfig(encoder=encoder, dropout=0.0)
    sub = build_model(cfg.scaled(width)).eval()
    sub_arrays = state_to_arrays(sub)
    zeros = {k: np.zeros_like(v) for k, v in _global_state(cfg).items()}
    wide = build_model(cfg).eval()
    for name, ix in slice_index(cfg, width).items():
        zeros[name][ix] = sub_arrays[name]
    arrays_to_state(zeros, wide)
    x = torch.randn(3, N_FEATURES, 101)
    # Execute
    with torch.no_grad():
        got = {t: wide(x, t) for t in ("emotion", "kws")}
        want = {t: sub(x, t) for t in ("emotion", "kws")}
    # Assert
    for t in got:
        torch.testing.assert_close(got[t], want[t], rtol=1e-4, atol=1e-5)


def test_coverage_counts_match_the_number_of_sliced_elements():
    cfg = ModelConfig(encoder="crnn")
    for width in TIERS:
        index = slice_index(cfg, width)
        sub = build_model(cfg.scaled(width)).state_dict()
        assert {k: int(np.prod([np.size(a) for a in ix])) for k, ix in index.items()} == {
            k: v.numel() for k, v in sub.items()}


# --------------------------------------------------------------------------- errors


def test_width_above_the_global_width_is_refused():
    with pytest.raises(ConfigError, match="width"):
        slice_index(ModelConfig(width=0.5), 1.0)
    with pytest.raises(ConfigError, match="width"):
        slice_index(ModelConfig(), 0.0)


def test_slice_state_names_every_bad_entry():
    # Prepare
    cfg = ModelConfig(encoder="cnn", n_features=40)
    g = _global_state(cfg)
    del g["heads.kws.bias"]
    g["encoder.stem.norm.weight"] = np.zeros(3, np.float32)
    g["extra"] = np.zeros(1, np.float32)
    # Execute
    with pytest.raises(ConfigError) as info:
        slice_state(g, cfg, 0.5)
    # Assert
    message = str(info.value)
    assert "missing heads.kws.bias" in message
    assert "unexpected extra" in message
    assert "encoder.stem.norm.weight" in message and "(16,)" in message
