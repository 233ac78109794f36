"""The secure-aggregation primitives: masks that cancel, shares that rebuild (and refuse), quantization."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedser.common import secagg
from fedser.common.errors import ConfigError


@pytest.fixture(scope="module")
def pairs():
    return [secagg.KeyPair.new() for _ in range(3)]


def test_two_devices_agree_the_same_mask_seed_and_their_masks_cancel(pairs):
    a, b = pairs[0], pairs[1]
    seed = secagg.mask_seed(a.private, b.public)
    # Assert: the same from both sides, and +mask plus -mask is 0 mod 2**64
    assert seed == secagg.mask_seed(b.private, a.public) and len(seed) == 32
    with np.errstate(over="ignore"):
        total = secagg.pairwise_mask(1, 2, seed, 1000) + secagg.pairwise_mask(2, 1, seed, 1000)
    assert not total.any()


def test_masks_use_every_bit_of_the_seed():
    # Flower's pseudo_rand_gen folds a seed to 32 bits; two seeds alike in those must still differ here
    one, other = bytes(32), bytes(28) + (1).to_bytes(4, "little")
    assert not np.array_equal(secagg.prg(one, 8), secagg.prg(bytes(31) + b"\x01", 8))
    assert not np.array_equal(secagg.prg(one, 8), secagg.prg(other, 8))


def test_any_threshold_of_the_shares_rebuilds_the_secret_and_fewer_do_not(pairs):
    secret = pairs[0].private
    shares = secagg.split(secret, 3, 5)
    check = lambda s: secagg.public_key_of(s) == pairs[0].public
    # Execute / Assert
    assert secagg.reconstruct(shares[2:], 3, check) == secret
    assert secagg.reconstruct([shares[0], shares[3], shares[4]], 3, check) == secret
    assert secagg.reconstruct(shares[:2], 3, check) is None


def test_a_corrupted_or_malformed_share_is_outvoted_when_enough_good_ones_remain():
    seed = bytes(range(32))
    shares = secagg.split(seed, 3, 5)
    corrupted = shares[1][:4] + bytes(b ^ 0xFF for b in shares[1][4:])
    check = lambda s: secagg.commitment(s) == secagg.commitment(seed)
    # Execute / Assert: one corrupted and one malformed (wrong length, not bytes) among good ones
    assert secagg.reconstruct([shares[0], corrupted, shares[2], b"x" * 7, 42, shares[4]], 3, check) == seed
    # with only two good shares left the secret is out of reach, and no wrong one is returned
    assert secagg.reconstruct([shares[0], corrupted, shares[2]], 3, check) is None


def test_many_shares_are_tried_in_random_subsets_and_still_find_the_secret():
    seed = bytes(range(32))
    shares = secagg.split(seed, 6, 14)          # C(14, 6) = 3003 subsets, more than MAX_SUBSETS
    shares[0] = shares[0][:4] + bytes(len(shares[0]) - 4)
    found = secagg.reconstruct(shares, 6, lambda s: s == seed, rng=random.Random(0))
    assert found == seed and math.comb(14, 6) > secagg.MAX_SUBSETS


def test_sealed_shares_open_only_for_their_addressee_and_name_their_route(pairs):
    a, b, c = pairs
    sealed = secagg.seal(a.private, b.public, 1, 2, b"seed-share", b"key-share")
    assert secagg.unseal(b.private, a.public, 1, 2, sealed) == (b"seed-share", b"key-share")
    with pytest.raises(secagg.SecAggError, match="do not decrypt"):
        secagg.unseal(c.private, a.public, 1, 3, sealed)
    with pytest.raises(secagg.SecAggError, match="say 1 to 2"):
        secagg.unseal(b.private, a.public, 3, 2, sealed)   # the server claims another sender


def test_quantization_is_unbiased_and_its_sum_dequantizes_to_the_float_sum():
    rng = np.random.default_rng(0)
    vectors = [rng.normal(0, 0.5, 5000) for _ in range(4)]
    clip_range = 4.0
    total = sum(secagg.quantize(v, clip_range) for v in vectors)
    got = secagg.dequantize_sum(total, clip_range, 4)
    # each element is off by less than one quantization step per vector
    assert np.max(np.abs(got - sum(vectors))) < 4 * 2 * clip_range / secagg.TARGET_RANGE
    assert secagg.in_range(total, 4) and not secagg.in_range(total + np.uint64(4 * secagg.TARGET_RANGE), 4)


def test_the_clamp_range_covers_a_clipped_update_its_noise_and_the_clip_bit():
    assert secagg.clamp_range(2.0, 0.1, None) == pytest.approx(2.8)
    assert secagg.clamp_range(0.1, 0.01, 0.5) == pytest.approx(5.0)   # the bit's range dominates


@pytest.mark.parametrize(("cohort", "fraction", "threshold"), [(2, 0.6, 2), (3, 0.6, 2), (10, 0.6, 6), (100, 0.6, 60),
                                                                (3, 1.0, 3)])
def test_the_threshold_is_a_share_of_the_cohort_never_below_two(cohort, fraction, threshold):
    assert secagg.threshold_for(cohort, fraction) == threshold


def test_a_threshold_fraction_outside_zero_one_is_named():
    with pytest.raises(ConfigError, match="fraction in"):
        secagg.threshold_for(5, 1.5)


def test_a_layout_flattens_and_unflattens_padded_arrays_with_the_bit_last():
    layout = secagg.Layout.of({"a": (2, 3), "frozen": (4,), "b": (5,)}, {"a", "b"}, with_bit=True)
    padded = {"a": np.arange(6.0).reshape(2, 3), "b": -np.arange(5.0)}
    vector = layout.flatten(padded, 0.75)
    arrays, bit = layout.unflatten(vector)
    assert layout.names == ("a", "b") and layout.size == 12 and bit == 0.75
    np.testing.assert_array_equal(arrays["a"], padded["a"])
    np.testing.assert_array_equal(arrays["b"], padded["b"])


def test_only_p384_public_keys_are_accepted(pairs):
    assert secagg.is_public_key(pairs[0].public)
    assert not secagg.is_public_key(b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    assert not secagg.is_public_key(pairs[0].private)


def test_a_private_key_travels_as_its_scalar_and_comes_back_whole(pairs):
    scalar = secagg.private_scalar(pairs[1].private)
    rebuilt = secagg.private_from_scalar(scalar)
    assert len(scalar) == 48 and secagg.public_key_of(rebuilt) == pairs[1].public
    assert secagg.mask_seed(rebuilt, pairs[0].public) == secagg.mask_seed(pairs[1].private, pairs[0].public)
    assert secagg.private_from_scalar(b"") is None and secagg.public_key_of(None) is None


@pytest.mark.parametrize("n, degree", [(10, 4), (11, 2), (25, 8), (7, 6), (7, 0), (5, 40)])
def test_neighbourhoods_are_symmetric_of_one_size_and_complete_at_degree_0_or_round_the_ring(n, degree):
    cohort = list(range(100, 100 + n))
    near = secagg.neighbourhoods(cohort, degree, random.Random(n))
    size = n if degree == 0 or degree >= n - 1 else degree + 1
    assert sorted(near) == cohort
    for node, hood in near.items():
        assert node in hood and len(hood) == size == len(set(hood)) and hood == sorted(hood)
        assert all(node in near[peer] for peer in hood)   # a pairwise mask needs both ends


def test_neighbourhoods_follow_a_random_ring():
    cohort = list(range(40))
    first, second = (secagg.neighbourhoods(cohort, 4, random.Random(s)) for s in (1, 2))
    assert first != second
    # not the cohort's own order: device 0 is not simply joined to 1, 2, 38 and 39
    assert any(first[n] != sorted({(n + d) % 40 for d in range(-2, 3)}) for n in cohort)


@pytest.mark.parametrize("degree", [1, 3, -2, True, 2.0])
def test_a_neighbour_count_that_cannot_make_a_ring_is_named(degree):
    with pytest.raises(ConfigError, match="secure-aggregation-neighbours must be 0"):
        secagg.neighbourhoods([1, 2, 3, 4], degree, random.Random(0))
