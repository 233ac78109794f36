"""The user-level noise multiplier of one aggregation, on cases computed by hand."""
from __future__ import annotations

import math

import pytest

from fedser.common.privacy import update_noise_std
from fedser.server.user_privacy import Contribution, round_noise_multiplier

BOTH = frozenset({"emotion", "kws"})
C = 2.0   # clipping bound
Z = 1.3   # configured noise multiplier


def client(weight=1.0, width=1.0, heads=BOTH, std=1.0) -> Contribution:
    return Contribution(weight=float(weight), width=width, heads=frozenset(heads), noise_std=std)


@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_m_equal_clients_with_distributed_noise_carry_exactly_z(m):
    # Prepare: each adds z*C/sqrt(m), so the sum carries z*C
    std = update_noise_std(C, Z, "distributed", m)
    clients = [client(weight=10, std=std) for _ in range(m)]
    # Execute
    z = round_noise_multiplier(clients, C)
    # Assert
    assert z == pytest.approx(Z, rel=1e-12)


@pytest.mark.parametrize("m", [1, 3, 9])
def test_m_equal_clients_with_local_noise_carry_z_times_sqrt_m(m):
    # Prepare: each adds the full z*C
    std = update_noise_std(C, Z, "local", m)
    clients = [client(weight=4, std=std) for _ in range(m)]
    # Execute
    z = round_noise_multiplier(clients, C)
    # Assert
    assert z == pytest.approx(Z * math.sqrt(m), rel=1e-12)


def test_unequal_weights_make_the_heaviest_client_the_worst_case():
    # Prepare: weights 1 and 3, noise std s each. V = (1 + 9) s^2; the heavy client's ratio is
    # sqrt(10) s / (3 C), the light one's sqrt(10) s / C.
    s = 0.7
    clients = [client(weight=1, std=s), client(weight=3, std=s)]
    # Execute
    z = round_noise_multiplier(clients, C)
    # Assert
    assert z == pytest.approx(math.sqrt(10) * s / (3 * C), rel=1e-12)


def test_mixed_tiers_count_only_clients_at_least_as_wide_as_each_client():
    # Prepare: A (1.0, n=3), B (0.5, n=1), C (0.25, n=1), std s each.
    # A's outer band is trained by A alone: sqrt(9 s^2) / (3 C) = s / C.
    # B's band by A and B: sqrt(9 + 1) s / C; C's band by all three: sqrt(11) s / C.
    # Counting every client for A would give sqrt(11) s / (3 C) instead.
    s = 0.5
    clients = [client(weight=3, width=1.0, std=s), client(weight=1, width=0.5, std=s),
               client(weight=1, width=0.25, std=s)]
    # Execute
    z = round_noise_multiplier(clients, C)
    # Assert
    assert z == pytest.approx(s / C, rel=1e-12)
    assert z < math.sqrt(11) * s / (3 * C)


def test_a_narrow_client_is_covered_by_every_wider_client():
    # Prepare: one heavy narrow client among light wide ones; its band is covered by all four
    # (sqrt(3 * 1 + 36) s / (6 C)) while each wide client's outer band only by the three wide
    # ones (sqrt(3) s / C), so the narrow client is the worst case.
    s = 1.0
    clients = [client(weight=1, width=1.0, std=s) for _ in range(3)] + [client(weight=6, width=0.25, std=s)]
    # Execute
    z = round_noise_multiplier(clients, C)
    # Assert
    assert z == pytest.approx(math.sqrt(39) * s / (6 * C), rel=1e-12)


def test_a_head_nobody_else_trained_is_covered_by_its_own_noise_only():
    # Prepare: A trains both heads, B and C only the emotion head; equal weights and noise.
    # Encoder and emotion head: sqrt(3) s / C. A's KWS head: s / C.
    s = 0.8
    clients = [client(heads={"emotion", "kws"}, std=s), client(heads={"emotion"}, std=s),
               client(heads={"emotion"}, std=s)]
    # Execute
    z = round_noise_multiplier(clients, C)
    # Assert
    assert z == pytest.approx(s / C, rel=1e-12)


def test_a_head_shared_by_everyone_does_not_lower_the_encoder_figure():
    # Prepare: the same three clients, all with both heads
    s = 0.8
    clients = [client(std=s) for _ in range(3)]
    # Execute
    z = round_noise_multiplier(clients, C)
    # Assert
    assert z == pytest.approx(math.sqrt(3) * s / C, rel=1e-12)


def test_no_noise_means_no_user_level_guarantee():
    # Prepare
    clients = [client(std=update_noise_std(C, Z, "none", 3)) for _ in range(3)]
    # Execute
    z = round_noise_multiplier(clients, C)
    # Assert
    assert z == 0.0


def test_a_round_without_contributions_releases_nothing():
    # Execute / Assert
    assert round_noise_multiplier([], C) == math.inf
