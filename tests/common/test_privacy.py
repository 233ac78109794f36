"""Accounting maths: epsilon from recorded histories, noise for a budget, the user-level accountant."""
from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedser.common.errors import ConfigError
from fedser.common.privacy import (
    CALIBRATION_ORDERS,
    SpendRecord,
    UserLevelAccountant,
    epsilon_of,
    noise_for_budget,
    update_noise_std,
)

DELTA = 1e-5


# -- SpendRecord ------------------------------------------------------------------------------


def test_spend_record_round_trips_through_dict_and_json():
    # Prepare
    rec = SpendRecord(1.1, 0.02, 150)
    # Execute
    back = SpendRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    # Assert
    assert back == rec
    assert rec.as_tuple() == (1.1, 0.02, 150)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 1}, "noise_multiplier=-1.0"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1}, "sample_rate=0.0"),
    ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}, "sample_rate=1.5"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5}, "steps=2.5"),
    ({"noise_multiplier": float("nan"), "sample_rate": 0.1, "steps": 1}, "noise_multiplier=nan"),
])
def test_spend_record_rejects_values_out_of_range_naming_them(kwargs, named):
    # Execute / Assert
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        SpendRecord(**kwargs)


def test_spend_record_from_dict_names_missing_keys():
    with pytest.raises(ConfigError, match="steps"):
        SpendRecord.from_dict({"noise_multiplier": 1.0, "sample_rate": 0.1})


# -- epsilon_of -------------------------------------------------------------------------------


@pytest.mark.parametrize(("accountant", "stock"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_matches_a_stock_opacus_accountant_stepped_the_same_way(accountant, stock):
    # Prepare: an independent party steps a stock accountant through the same mechanism
    history = [SpendRecord(1.0, 0.01, 300), SpendRecord(1.5, 0.02, 200)]
    reference = stock()
    for rec in history:
        for _ in range(rec.steps):
            reference.step(noise_multiplier=rec.noise_multiplier, sample_rate=rec.sample_rate)
    # Execute
    eps = epsilon_of(history, DELTA, accountant=accountant)
    # Assert
    assert eps == pytest.approx(reference.get_epsilon(DELTA), rel=1e-6)


def test_repeated_rdp_epsilons_stay_exactly_opacus_figures():
    # Prepare: histories that share (z, q) pairs, so later calls reuse earlier pairs' RDP curves
    histories = [[SpendRecord(1.0, 0.01, 300)], [SpendRecord(1.0, 0.01, 300), SpendRecord(1.5, 0.02, 7)],
                 [SpendRecord(1.5, 0.02, 70)], [SpendRecord(1.0, 0.01, 3)]] * 2
    for orders in (None, CALIBRATION_ORDERS):
        for history in histories:
            stock = RDPAccountant()
            stock.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in history]
            # Execute
            eps = epsilon_of(history, DELTA, orders=orders)
            # Assert
            assert eps == stock.get_epsilon(DELTA, alphas=None if orders is None else list(orders))


def test_epsilon_reference_figures():
    # Prepare: a textbook DP-SGD setting
    history = [SpendRecord(1.0, 0.01, 1000)]
    # Execute
    rdp = epsilon_of(history, DELTA, "rdp")
    prv = epsilon_of(history, DELTA, "prv")
    # Assert: RDP is a looser upper bound than the numerically tight PRV
    assert rdp == pytest.approx(2.10, abs=0.01)
    assert prv == pytest.approx(1.84, abs=0.02)
    assert prv < rdp


def test_epsilon_of_split_history_equals_the_merged_one():
    # Prepare
    split = [SpendRecord(1.0, 0.01, 400), SpendRecord(2.0, 0.05, 10), SpendRecord(1.0, 0.01, 600)]
    merged = [SpendRecord(1.0, 0.01, 1000), SpendRecord(2.0, 0.05, 10)]
    # Execute / Assert
    assert epsilon_of(split, DELTA) == pytest.approx(epsilon_of(merged, DELTA), rel=1e-12)


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    eps = [epsilon_of([SpendRecord(1.0, 0.01, s)], DELTA) for s in (10, 100, 1000)]
    assert eps[0] < eps[1] < eps[2]
    assert epsilon_of([SpendRecord(2.0, 0.01, 1000)], DELTA) < eps[2]


def test_empty_history_spends_nothing_and_no_noise_spends_infinity():
    assert epsilon_of([], DELTA) == 0.0
    assert epsilon_of([SpendRecord(0.0, 0.01, 0)], DELTA) == 0.0
    assert epsilon_of([SpendRecord(1.0, 0.01, 10), SpendRecord(0.0, 0.01, 1)], DELTA) == math.inf
    assert epsilon_of([SpendRecord(0.0, 0.01, 1)], DELTA, "prv") == math.inf


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"delta": 0.0}, "delta=0.0"),
    ({"delta": 1.0}, "delta=1.0"),
    ({"delta": DELTA, "accountant": "gdp"}, "accountant='gdp'"),
])
def test_epsilon_of_rejects_bad_settings(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        epsilon_of([SpendRecord(1.0, 0.01, 1)], **kwargs)


def test_noise_for_budget_reaches_the_target_within_tolerance():
    # Execute
    z = noise_for_budget(2.0, DELTA, sample_rate=0.01, steps=1000)
    # Assert: at most the target, and not wastefully below it
    eps = epsilon_of([SpendRecord(z, 0.01, 1000)], DELTA)
    assert 2.0 - 0.011 <= eps <= 2.0
    assert epsilon_of([SpendRecord(z * 0.97, 0.01, 1000)], DELTA) > 2.0


def test_noise_for_budget_names_an_unreachable_budget():
    # RDP conversion has a floor near log(1/delta)/62, so epsilon 0.01 is out of reach at any noise
    with pytest.raises(ConfigError, match="epsilon=0.01"):
        noise_for_budget(0.01, DELTA, sample_rate=1.0, steps=10)


def test_noise_for_budget_validates_all_arguments_at_once():
    with pytest.raises(ConfigError) as err:
        noise_for_budget(-1.0, 2.0, sample_rate=0.0, steps=0)
    for named in ("target_epsilon=-1.0", "delta=2.0", "sample_rate=0.0", "steps=0"):
        assert named in str(err.value)


# -- UserLevelAccountant ----------------------------------------------------------------------


def test_user_level_accountant_uses_clients_per_round_over_all_clients():
    # Prepare
    acc = UserLevelAccountant(noise_multiplier=1.0, clients_per_round=10, total_clients=1000)
    # Execute
    acc.step()
    acc.step(rounds=99)
    # Assert
    assert acc.rounds == 100
    assert acc.sample_rate == 0.01
    assert acc.epsilon(DELTA) == pytest.approx(epsilon_of([SpendRecord(1.0, 0.01, 100)], DELTA))


def test_user_level_accountant_state_round_trips_through_json():
    # Prepare
    acc = UserLevelAccountant(1.3, 5, 50, accountant="prv")
    acc.step(rounds=7)
    acc.step(noise_multiplier=0.9)  # a distributed round with fewer replies than expected
    # Execute
    state = json.loads(json.dumps(acc.state_dict()))
    back = UserLevelAccountant(1.0, 1, 1)
    back.load_state_dict(state)
    # Assert
    assert back.state_dict() == acc.state_dict()
    assert back.rounds == 8
    assert back.epsilon(DELTA) == pytest.approx(acc.epsilon(DELTA))


def test_user_level_accountant_load_rejects_incomplete_state():
    acc = UserLevelAccountant(1.0, 1, 2)
    with pytest.raises(ConfigError, match="history"):
        acc.load_state_dict({"noise_multiplier": 1.0})


def test_user_level_accountant_without_noise_reports_infinite_epsilon():
    # Prepare
    acc = UserLevelAccountant(noise_multiplier=0.0, clients_per_round=3, total_clients=10)
    # Execute
    before = acc.epsilon(DELTA)
    acc.step()
    summary = acc.summary(DELTA)
    # Assert: nothing released yet spends nothing; one round without noise has no guarantee
    assert before == 0.0
    assert summary["epsilon"] == math.inf
    assert "no user-level noise" in summary["note"]


@pytest.mark.parametrize(("args", "named"), [
    ((-0.5, 1, 10), "noise_multiplier=-0.5"),
    ((1.0, 11, 10), "clients_per_round=11 must be in [1, total_clients=10]"),
    ((1.0, 0, 10), "clients_per_round=0"),
    ((1.0, 1, 0), "total_clients=0"),
])
def test_user_level_accountant_validates_arguments(args, named):
    with pytest.raises(ConfigError) as err:
        UserLevelAccountant(*args)
    assert named in str(err.value)


def test_user_level_accountant_step_rejects_zero_rounds():
    with pytest.raises(ConfigError, match="rounds=0"):
        UserLevelAccountant(1.0, 1, 10).step(rounds=0)


def test_update_noise_std_formula():
    assert update_noise_std(0.5, 2.0, "local", 9) == pytest.approx(1.0)
    assert update_noise_std(0.5, 2.0, "distributed", 9) == pytest.approx(1.0 / 3.0)
    assert update_noise_std(0.5, 2.0, "none", 9) == 0.0
    with pytest.raises(ConfigError, match="mode='central'"):
        update_noise_std(0.5, 2.0, "central", 9)



# -- adaptive clipping ---------------------------------------------------------------------------


@pytest.mark.parametrize("z, m", [(1.0, 3), (1.0, 18), (1.0, 100), (0.5, 1000), (2.0, 40)])
def test_adaptive_clipping_raises_the_update_noise_so_the_round_stays_at_z(z, m):
    from fedser.common.privacy import AdaptiveClip, combined_noise_multiplier

    z_u, sigma = AdaptiveClip.update_noise(z, m), AdaptiveClip.count_noise(z, m)
    assert sigma == max(m / 20, z)                       # Andrew et al.'s m/20, never below z
    assert z < z_u <= z / math.sqrt(0.75) + 1e-12        # at most 15.5 % more noise on the update
    assert combined_noise_multiplier(z_u, sigma) == pytest.approx(z, rel=1e-12)
    # A round with fewer bits than planned carries less count noise, so it is accounted lower.
    assert combined_noise_multiplier(z_u, sigma * math.sqrt(0.5)) < z


def test_no_user_noise_means_no_bit_noise_and_no_guarantee():
    from fedser.common.privacy import AdaptiveClip, combined_noise_multiplier, count_bit_std

    assert AdaptiveClip.update_noise(0.0, 10) == 0.0 and AdaptiveClip.count_noise(0.0, 10) == 0.0
    assert count_bit_std(1.0, "none", 10) == 0.0
    assert combined_noise_multiplier(0.0, 5.0) == 0.0 and combined_noise_multiplier(1.0, 0.0) == 0.0


def test_bit_noise_per_device_follows_the_noise_mode():
    from fedser.common.privacy import count_bit_std

    assert count_bit_std(1.0, "local", 100) == pytest.approx(5.0)          # each bit alone: all of it
    assert count_bit_std(1.0, "distributed", 100) == pytest.approx(0.5)    # the sum of 100: 5.0


def test_adaptive_clip_steps_geometrically_and_tracks_a_quantile_through_noise():
    import numpy as np

    from fedser.common.privacy import AdaptiveClip

    clip = AdaptiveClip(2.0, quantile=0.5, learning_rate=0.2)
    assert clip.step([1.0, 1.0]) == pytest.approx(2.0 * math.exp(-0.2 * 0.5))   # all within: C shrinks
    assert clip.step([]) == pytest.approx(2.0 * math.exp(-0.1))                  # no bits: C stays
    # Norms log-normal around 0.3 (so the median is 0.3), 50 devices a round, noised bits.
    rng = np.random.default_rng(0)
    for q in (0.5, 0.9):
        clip = AdaptiveClip(5.0, quantile=q, learning_rate=0.2)
        for _ in range(300):
            norms = 0.3 * np.exp(rng.normal(0.0, 0.5, 50))
            clip.step((norms <= clip.clip_norm) + rng.normal(0.0, 2.5 / math.sqrt(50), 50))
        want = 0.3 * math.exp(0.5 * {0.5: 0.0, 0.9: 1.2816}[q])
        assert clip.clip_norm == pytest.approx(want, rel=0.25)


@pytest.mark.parametrize("kwargs, named", [
    ({"clip_norm": 0.0}, "clip_norm"), ({"clip_norm": 1.0, "quantile": 1.0}, "quantile"),
    ({"clip_norm": 1.0, "quantile": 0.0}, "quantile"), ({"clip_norm": 1.0, "learning_rate": -0.1}, "learning_rate"),
])
def test_adaptive_clip_names_bad_settings(kwargs, named):
    from fedser.common.privacy import AdaptiveClip

    with pytest.raises(ConfigError, match=named):
        AdaptiveClip(**kwargs)
