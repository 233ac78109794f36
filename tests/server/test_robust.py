"""The coordinate-wise trimmed mean: what a minority of devices can and cannot do to the step."""
from __future__ import annotations

import numpy as np
import pytest

from fedser.common.models import ModelConfig, build_model, head_of
from fedser.common.params import state_to_arrays
from fedser.common.slicing import slice_index, slice_state
from fedser.server.aggregation import ClientUpdate, aggregate, full_index
from fedser.server.robust import trimmed_mean_aggregate

GLOBAL = {"encoder.w": np.zeros((4, 3), np.float32), "heads.kws.bias": np.zeros(3, np.float32),
          "heads.emotion.bias": np.zeros(2, np.float32)}


def _update(node, value, heads=("emotion", "kws"), n=10):
    delta = {k: np.full(v.shape, value, np.float32) for k, v in GLOBAL.items()}
    return ClientUpdate(node, delta, full_index(GLOBAL), n, set(heads), 1.0)


def test_one_flipped_and_scaled_update_among_ten_does_not_set_the_step():
    # Prepare: nine honest devices step +1e-3; one steps -1000 and claims a million examples.
    updates = [_update(i, 1e-3) for i in range(9)] + [_update(9, -1000.0, n=1_000_000)]
    # Execute
    robust, _ = trimmed_mean_aggregate(GLOBAL, updates, head_of, trim=0.2)
    plain, _ = aggregate(GLOBAL, updates, head_of)
    # Assert: plain FedAvg follows the liar; the trimmed mean moves as the honest devices did.
    assert plain["encoder.w"].max() < -50
    for name, value in robust.items():
        np.testing.assert_allclose(value, 1e-3, rtol=1e-5, err_msg=name)


def test_without_trimming_it_is_the_unweighted_mean_of_the_devices_that_trained_each_element():
    # Prepare: two devices with both heads, one with the KWS head only.
    updates = [_update(0, 1.0), _update(1, 2.0), _update(2, 6.0, heads=("kws",))]
    # Execute
    out, stats = trimmed_mean_aggregate(GLOBAL, updates, head_of, trim=0.0)
    # Assert
    np.testing.assert_allclose(out["encoder.w"], 3.0)
    np.testing.assert_allclose(out["heads.kws.bias"], 3.0)
    np.testing.assert_allclose(out["heads.emotion.bias"], 1.5)   # the KWS-only device did not train it
    assert stats.coverage["heads.emotion.bias"].max() == 2 and stats.num_updates == 3


def test_width_tiers_average_each_element_over_the_devices_whose_slice_holds_it():
    # Prepare: a real model; devices of width 1.0 (+1) and 0.5 (+3), three of each.
    cfg = ModelConfig()
    g = state_to_arrays(build_model(cfg))
    updates = []
    for i, (width, value) in enumerate([(1.0, 1.0)] * 3 + [(0.5, 3.0)] * 3):
        sub = {k: np.full(v.shape, value, np.float32) for k, v in slice_state(g, cfg, width).items()}
        updates.append(ClientUpdate(i, sub, slice_index(cfg, width), 10, {"emotion", "kws"}, width))
    # Execute
    out, _ = trimmed_mean_aggregate(g, updates, head_of, trim=0.0)
    # Assert: inside the half slice all six devices count (mean 2); outside it only the wide ones (1).
    name = "encoder.convs.0.conv.weight"
    ix = slice_index(cfg, 0.5)[name]
    step = out[name] - g[name]
    np.testing.assert_allclose(step[ix], 2.0, rtol=1e-5)
    outside = np.ones(step.shape, bool)
    outside[ix] = False
    np.testing.assert_allclose(step[outside], 1.0, rtol=1e-5)


@pytest.mark.parametrize("trim", [-0.1, 0.5, "x"])
def test_a_bad_trim_share_is_refused(trim):
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean_aggregate(GLOBAL, [_update(0, 1.0)], head_of, trim=trim)
