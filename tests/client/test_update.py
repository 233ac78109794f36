"""User-level update privacy: clipping to C, Gaussian noise per mode, and the server's norm bound."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from fedser.client.update import UpdateStats, privatize_update
from fedser.common.privacy import (exceeds_bound, global_norm, max_expected_norm, noise_energy_bounds,
                                   noise_shape, noise_shape_bounds, update_noise_std)
from fedser.common.errors import ConfigError, UpdateRejected


def _rng(seed=0):
    return np.random.default_rng(seed)


def _zeros(n_params, dtype=np.float32):
    # two arrays of different shapes, so noise is checked across the whole dict
    half = n_params // 2
    return {"encoder.weight": np.zeros((half // 10, 10), dtype), "head.bias": np.zeros(n_params - half, dtype)}


# -- clipping ---------------------------------------------------------------------------------


def test_clipping_scales_the_whole_update_to_c_on_a_hand_example():
    # Prepare: global norm sqrt(3^2 + 4^2) = 5 across two arrays
    delta = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
    # Execute
    out, st_ = privatize_update(delta, clip_norm=1.0, noise_multiplier=0.0, mode="none",
                                expected_clients=1, rng=_rng())
    # Assert
    np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [[0.8]], rtol=1e-6)
    assert st_ == UpdateStats(norm_before=5.0, norm_after_clip=1.0, scale=0.2, noise_std=0.0)


def test_update_inside_the_ball_is_left_unchanged():
    # Prepare
    delta = {"a": np.array([0.3, -0.4], np.float64)}
    # Execute
    out, st_ = privatize_update(delta, 10.0, 0.0, "none", 1, _rng())
    # Assert
    np.testing.assert_array_equal(out["a"], delta["a"])
    assert st_.scale == 1.0 and st_.norm_after_clip == pytest.approx(0.5)


def test_zero_update_stays_zero_without_noise():
    out, st_ = privatize_update({"w": np.zeros(4, np.float32)}, 1.0, 0.0, "local", 1, _rng())
    assert st_.norm_before == 0.0 and st_.scale == 1.0
    assert not out["w"].any()


def test_keys_shapes_and_dtypes_are_preserved_and_input_untouched():
    # Prepare
    delta = {"z": np.ones((2, 3), np.float32), "a": np.full(5, 2.0, np.float64)}
    before = {k: v.copy() for k, v in delta.items()}
    # Execute
    out, _ = privatize_update(delta, 0.5, 1.0, "local", 1, _rng())
    # Assert
    assert list(out) == ["z", "a"]
    assert out["z"].shape == (2, 3) and out["z"].dtype == np.float32 and out["a"].dtype == np.float64
    for k in delta:
        np.testing.assert_array_equal(delta[k], before[k])


@settings(max_examples=60, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=6),
                   elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)),
        min_size=1, max_size=3),
    clip=st.floats(1e-3, 1e3),
)
def test_property_norm_after_clip_is_min_of_norm_and_c(arrays, clip):
    # Prepare
    delta = {f"p{i}": a for i, a in enumerate(arrays)}
    norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays))  # slow oracle
    # Execute
    out, st_ = privatize_update(delta, clip, 0.0, "none", 1, _rng())
    # Assert: clipped norm, and the direction is kept
    assert global_norm(out) == pytest.approx(min(norm, clip), rel=1e-9, abs=1e-12)
    assert st_.norm_after_clip == pytest.approx(min(norm, clip), rel=1e-9, abs=1e-12)
    assert global_norm(out) <= clip * (1 + 1e-9)
    for k in delta:
        np.testing.assert_allclose(out[k], delta[k] * st_.scale, rtol=1e-12, atol=1e-300)


def test_float32_clipped_norm_stays_within_the_rounding_slack():
    # Prepare
    delta = {"w": _rng(3).normal(size=50_000).astype(np.float32)}
    # Execute
    out, _ = privatize_update(delta, 0.7, 0.0, "none", 1, _rng())
    # Assert
    assert not exceeds_bound(global_norm(out), max_expected_norm(0.7, 0.0, "none", 1, n_params=50_000))


# -- noise ------------------------------------------------------------------------------------

N = 100_000


def test_local_noise_std_is_z_times_c():
    # Prepare: a zero update, so the output is the noise alone
    z, c = 1.3, 0.7
    # Execute
    out, st_ = privatize_update(_zeros(N), c, z, "local", expected_clients=8, rng=_rng(1))
    noise = np.concatenate([v.ravel().astype(np.float64) for v in out.values()])
    # Assert: relative error of the std (sampling error ~0.2%) and a chi-square test of the variance
    assert st_.noise_std == pytest.approx(z * c)
    assert abs(noise.std() / (z * c) - 1) < 0.02
    assert abs(noise.mean()) < 5 * z * c / math.sqrt(N)
    chi2 = float(np.sum(noise**2)) / (z * c) ** 2
    p = 2 * min(stats.chi2.cdf(chi2, N), stats.chi2.sf(chi2, N))
    assert p > 1e-4


def test_noise_is_added_after_clipping():
    # Prepare: an update far outside the ball
    delta = {"w": np.full(N, 10.0, np.float64)}
    # Execute
    out, st_ = privatize_update(delta, 1.0, 0.5, "local", 1, _rng(2))
    # Assert: the mean is the clipped value, the spread is the noise
    clipped_value = 1.0 / math.sqrt(N)
    assert st_.norm_after_clip == pytest.approx(1.0)
    assert abs(out["w"].mean() - clipped_value) < 5 * 0.5 / math.sqrt(N)
    assert abs(out["w"].std() / 0.5 - 1) < 0.02


def test_distributed_noise_sums_to_z_times_c_over_m_clients():
    # Prepare
    z, c, m = 1.0, 2.0, 16
    # Execute: m devices privatize zero updates independently
    outs = [privatize_update(_zeros(N, np.float64), c, z, "distributed", m, _rng(100 + i)) for i in range(m)]
    total = sum(np.concatenate([v.ravel() for v in o.values()]) for o, _ in outs)
    one = np.concatenate([v.ravel() for v in outs[0][0].values()])
    # Assert: each carries z*C/sqrt(m); the sum carries z*C
    assert outs[0][1].noise_std == pytest.approx(z * c / math.sqrt(m))
    assert abs(one.std() / (z * c / math.sqrt(m)) - 1) < 0.02
    assert abs(total.std() / (z * c) - 1) < 0.02


def test_mode_none_adds_no_noise_whatever_z_is():
    delta = {"w": np.linspace(-1, 1, 101)}
    out, st_ = privatize_update(delta, 100.0, 3.0, "none", 4, _rng())
    np.testing.assert_array_equal(out["w"], delta["w"])
    assert st_.noise_std == 0.0


def test_frozen_arrays_get_no_noise_while_the_trained_ones_do():
    # Prepare: a head-only update; the encoder was not trained, so its delta is exactly zero.
    delta = {"encoder.weight": np.zeros((4, 3), np.float32), "heads.kws.weight": np.full(6, 3.0, np.float32)}
    # Execute
    out, st_ = privatize_update(delta, 1.0, 1.0, "local", 1, _rng(), frozen=["encoder.weight"])
    # Assert
    assert not out["encoder.weight"].any()
    assert st_.norm_before == pytest.approx(3.0 * math.sqrt(6)) and st_.noise_std == 1.0
    assert not np.allclose(out["heads.kws.weight"], 1.0 / math.sqrt(6), atol=1e-3)  # noised


@pytest.mark.parametrize("frozen, what", [(["encoder.weight"], "changed"), (["decoder.weight"], "not in the update")])
def test_a_frozen_array_that_moved_or_does_not_exist_is_refused_by_name(frozen, what):
    delta = {"encoder.weight": np.full(3, 0.1, np.float32), "heads.kws.weight": np.ones(2, np.float32)}
    with pytest.raises(UpdateRejected, match=f"{frozen[0]}: named frozen but {what}"):
        privatize_update(delta, 1.0, 1.0, "local", 1, _rng(), frozen=frozen)


def test_same_seed_same_noise():
    a, _ = privatize_update(_zeros(1000), 1.0, 1.0, "local", 1, _rng(7))
    b, _ = privatize_update(_zeros(1000), 1.0, 1.0, "local", 1, _rng(7))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# -- validation -------------------------------------------------------------------------------


def test_bad_settings_are_named_all_at_once():
    with pytest.raises(ConfigError) as err:
        privatize_update({"w": np.ones(3)}, clip_norm=0.0, noise_multiplier=-1.0, mode="central",
                         expected_clients=0, rng=np.random.RandomState(0))
    for named in ("clip_norm=0.0", "noise_multiplier=-1.0", "mode='central'", "expected_clients=0", "rng="):
        assert named in str(err.value)


def test_empty_update_is_a_config_error():
    with pytest.raises(ConfigError, match="non-empty"):
        privatize_update({}, 1.0, 1.0, "local", 1, _rng())


def test_non_finite_or_integer_arrays_are_rejected_by_name():
    delta = {"ok": np.ones(3), "nan": np.array([1.0, np.nan, np.inf]), "steps": np.array([1, 2])}
    with pytest.raises(UpdateRejected) as err:
        privatize_update(delta, 1.0, 1.0, "local", 1, _rng())
    reasons = " ".join(err.value.reasons)
    assert "nan: 2 non-finite" in reasons and "steps: dtype int64" in reasons and "ok" not in reasons


# -- the server's norm bound ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_honest_noised_updates_pass_the_bound_and_scaled_ones_fail(mode):
    # Prepare: updates well outside the ball, so every one is clipped to exactly C
    c, z, m, n = 1.0, 1.0, 10, 20_000
    bound = max_expected_norm(c, z, mode, m, n_params=n)
    norms, scaled = [], []
    for seed in range(20):
        delta = {"w": _rng(seed).normal(size=n).astype(np.float32)}
        out, _ = privatize_update(delta, c, z, mode, m, _rng(1000 + seed))
        norms.append(global_norm(out))
        scaled.append(global_norm({k: 2.0 * v for k, v in out.items()}))
    # Assert
    assert max(norms) <= bound
    assert min(scaled) > bound
    assert bound > c  # noise pushes honest updates past C by design


def test_bound_without_noise_is_c_and_a_doubled_update_fails_it():
    # Prepare
    delta = {"w": _rng(5).normal(size=1000)}
    out, _ = privatize_update(delta, 2.0, 0.0, "none", 1, _rng())
    # Execute
    bound = max_expected_norm(2.0, 0.0, "none", 1, n_params=1000)
    # Assert
    assert global_norm(out) <= bound < 2.0 * global_norm(out)
    assert bound == pytest.approx(2.0, rel=1e-4)


def test_bound_tracks_the_typical_norm_for_large_updates():
    # sqrt(C^2 + n s^2) is the typical norm; the tail allowance adds only a few percent at n = 1e5
    c, z, n = 1.0, 1.0, N
    typical = math.sqrt(c**2 + n * (z * c) ** 2)
    bound = max_expected_norm(c, z, "local", 1, n_params=n, tail=1e-6)
    assert typical < bound < 1.05 * typical
    assert max_expected_norm(c, z, "local", 1, n_params=n, tail=1e-9) > bound


def test_bound_validates_its_arguments():
    with pytest.raises(ConfigError) as err:
        max_expected_norm(1.0, 1.0, "local", 1, n_params=0, tail=1.5)
    assert "n_params=0" in str(err.value) and "tail=1.5" in str(err.value)


# -- the server's noise-shape check -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_honest_noised_updates_have_the_shape_of_noise_and_noise_free_ones_sized_like_it_do_not(mode):
    # Prepare: steps heavier-tailed than noise (Laplace weights), as training steps are, clipped to C
    c, z, m, n = 1.0, 1.0, 10, 20_000
    s = update_noise_std(c, z, mode, m)
    low, high = noise_shape_bounds(n, c, s)
    honest, crafted = [], []
    for seed in range(20):
        step = {"w": _rng(seed).laplace(size=n).astype(np.float32)}
        out, _ = privatize_update(step, c, z, mode, m, _rng(1000 + seed))
        honest.append(noise_shape(out, s))
        # the attacker's step, noise-free, at the norm an honest update has: the norm check passes it
        size = 0.999 * max_expected_norm(c, z, mode, m, n_params=n) / global_norm(step)
        crafted.append({k: v * np.float32(size) for k, v in step.items()})
    # Assert
    assert all(low <= h <= high for h in honest)
    assert all(not exceeds_bound(global_norm(a), max_expected_norm(c, z, mode, m, n_params=n)) for a in crafted)
    assert all(noise_shape(a, s) < low for a in crafted)
    flat = {"w": np.full(n, s, dtype=np.float32)}   # every weight one noise std: too even for noise
    assert noise_shape(flat, s) > high


def test_the_whole_clip_norm_on_one_weight_keeps_an_honest_update_inside_the_shape_bounds():
    # Prepare: the most concentrated signal an honest device can send, under the smallest noise
    c, z, m, n = 1.0, 0.5, 100, 5_000
    s = update_noise_std(c, z, "distributed", m)
    low, high = noise_shape_bounds(n, c, s)
    step = {"w": np.zeros(n, dtype=np.float32)}
    step["w"][0] = 50.0
    # Execute
    shapes = [noise_shape(privatize_update(step, c, z, "distributed", m, _rng(seed))[0], s) for seed in range(50)]
    # Assert
    assert all(low <= v <= high for v in shapes)


def test_pure_noise_leaves_the_shape_bounds_no_more_often_than_their_tail():
    # The bounds are conservative: at tail 0.2, fewer than 20 % of 300 pure-noise draws fall outside.
    n, s = 2_000, 0.3
    low, high = noise_shape_bounds(n, 1.0, s, tail=0.2)
    outside = sum(not low <= noise_shape([_rng(seed).normal(0.0, s, n)], s) <= high for seed in range(300))
    assert outside < 0.2 * 300


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_each_noised_array_carries_its_share_of_the_noise_and_an_unnoised_one_does_not(mode):
    # Prepare: the whole clipped step on the small array, the worst case for its bounds
    c, z, m = 1.0, 1.0, 10
    s = update_noise_std(c, z, mode, m)
    step = {"big": np.zeros(5_000, dtype=np.float32), "small": np.full(50, 10.0, dtype=np.float32)}
    for seed in range(50):
        out, _ = privatize_update(step, c, z, mode, m, _rng(seed))
        for name, a in out.items():
            low, high = noise_energy_bounds(a.size, c, s)
            # Assert
            assert low <= float(np.sum(a.astype(np.float64) ** 2)) / s**2 <= high, (name, seed)
    low, _ = noise_energy_bounds(5_000, c, s)
    assert low > 0   # so an array sent without its noise (zeros, or a step below it) is refused


def test_shape_functions_validate_their_arguments():
    with pytest.raises(ConfigError) as err:
        noise_shape_bounds(0, -1.0, math.nan, tail=1.0)
    for fragment in ("n_noisy=0", "clip_norm=-1.0", "noise_std=nan", "tail=1.0"):
        assert fragment in str(err.value)
    with pytest.raises(ConfigError, match="noise_std"):
        noise_shape({"w": np.ones(3)}, 0.0)
    with pytest.raises(ConfigError, match="no coordinates"):
        noise_shape({}, 1.0)
    with pytest.raises(ConfigError) as err:
        noise_energy_bounds(0, 1.0, -2.0)
    assert "n=0" in str(err.value) and "noise_std=-2.0" in str(err.value)


# -- the device round -------------------------------------------------------------------------


def _round_inputs(n=24, seed=0):
    import torch

    from fedser.common.data import TaskData
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model
    from fedser.common.params import state_to_arrays

    spec = FeatureSpec()
    cfg = ModelConfig(n_features=spec.n_features())
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    data = TaskData("kws", torch.randn(n, spec.n_features(), 51, generator=g),
                    torch.randint(0, 12, (n,), generator=g), [f"s{i % 3}" for i in range(n)])
    return spec, cfg, state_to_arrays(model), data


def _one_round(seed, dp=True, **settings_kw):
    from fedser.client.update import RoundSettings, train_round
    from fedser.common.models import build_model
    from fedser.common.params import arrays_to_state

    spec, cfg, global_arrays, data = _round_inputs()
    model = build_model(cfg)
    arrays_to_state(global_arrays, model)
    settings = RoundSettings(**{"epochs": 1, "batch_size": 8, "dp": dp, "noise_mode": "none",
                                "noise_multiplier": 0.0, "clip_norm": 1.0, **settings_kw})
    return train_round(model, global_arrays, {"kws": data}, spec, settings, sample_noise=1.0 if dp else None,
                       delta=1e-5, rng=_rng(), seed=seed)


def test_a_device_round_clips_what_it_sends_and_records_its_spend():
    # Execute
    result = _one_round(seed=3)
    # Assert: the update that leaves is the clipped local delta; the DP-SGD spend is reported.
    assert global_norm(result.sent) <= 1.0 + 1e-5
    assert result.stats.norm_before == pytest.approx(global_norm(result.local_delta))
    assert result.steps > 0 and len(result.losses) == 1
    assert [r.noise_multiplier for r in result.spend] == [1.0]


def test_a_device_never_reuses_its_dp_sgd_noise_but_a_simulation_can_repeat_a_round():
    # Execute: two rounds from the same model on the same data.
    fresh = [_one_round(seed=None).local_delta for _ in range(2)]
    seeded = [_one_round(seed=11).local_delta for _ in range(2)]
    # Assert: a device draws new, unpredictable randomness each round (the same noise twice would
    # let the two rounds' noise cancel); an explicit seed reproduces the round exactly.
    assert any(not np.array_equal(fresh[0][k], fresh[1][k]) for k in fresh[0])
    assert all(np.array_equal(seeded[0][k], seeded[1][k]) for k in seeded[0])


def test_under_adaptive_clipping_a_device_sends_its_bit_and_nothing_else_about_the_norm():
    # A fixed clip sends no bit.
    assert _one_round(seed=3, dp=False).clip_bit is None
    # Without bit noise the bit is exactly "norm <= C", on either side of the norm.
    norm = _one_round(seed=3, dp=False).stats.norm_before
    for clip, want in ((norm * 2, 1.0), (norm / 2, 0.0)):
        assert _one_round(seed=3, dp=False, clip_norm=clip, clip_count_std=0.0).clip_bit == want
    # With noise it is that bit plus Gaussian noise of the std the server asked for (from the round's rng).
    noised = _one_round(seed=3, dp=False, clip_norm=norm * 2, clip_count_std=0.5).clip_bit
    assert noised != 1.0 and abs(noised - 1.0) < 0.5 * 6


def test_an_instruction_with_a_bad_bit_noise_is_refused():
    from fedser.client.update import RoundSettings
    from fedser.common import keys

    base = {keys.LOCAL_EPOCHS: 1, keys.BATCH_SIZE: 8, keys.LEARNING_RATE: 0.01, keys.DP_MAX_GRAD_NORM: 1.0,
            keys.CLIP_NORM: 1.0, keys.NOISE_MULTIPLIER: 1.0, keys.NOISE_MODE: "local", keys.EXPECTED_CLIENTS: 3}
    assert RoundSettings.from_config(base).clip_count_std is None
    assert RoundSettings.from_config({**base, keys.CLIP_COUNT_STD: 0.25}).clip_count_std == 0.25
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=keys.CLIP_COUNT_STD):
            RoundSettings.from_config({**base, keys.CLIP_COUNT_STD: bad})
