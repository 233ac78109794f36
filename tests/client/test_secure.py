"""The device's side of secure aggregation refuses what would reveal a secret or break the sum."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

from fedser.client import secure
from fedser.common import keys, secagg
from fedser.common.secagg import SecAggError

NODES = [1, 2, 3]


def _setup(states: dict[int, RecordDict], rnd: int = 1) -> dict[int, dict]:
    cfg = {keys.SERVER_ROUND: rnd, keys.SECAGG_STAGE: "setup", keys.SECAGG_NODES: NODES, keys.SECAGG_THRESHOLD: 2,
           keys.SECAGG_CLIP_RANGE: 4.0}
    return {n: dict(secure.handle_stage(cfg, states[n], n)) for n in NODES}


def _share_cfg(public: dict[int, dict], rnd: int = 1) -> dict:
    return {keys.SERVER_ROUND: rnd, keys.SECAGG_STAGE: "share-keys", keys.SECAGG_NODES: NODES,
            keys.SECAGG_ENC_KEYS: [public[n][keys.SECAGG_ENC_KEYS] for n in NODES],
            keys.SECAGG_MASK_KEYS: [public[n][keys.SECAGG_MASK_KEYS] for n in NODES]}


def _through_masking(states: dict[int, RecordDict]) -> dict[int, np.ndarray]:
    """Every device to its masked input of the vector [n, n, n]."""
    cfg = _share_cfg(_setup(states))
    shared = {n: dict(secure.handle_stage(cfg, states[n], n)) for n in NODES}
    masked = {}
    for n in NODES:
        srcs = [m for m in NODES if m != n]
        cts = [shared[m][keys.SECAGG_CIPHERTEXTS][shared[m][keys.SECAGG_DSTS].index(n)] for m in srcs]
        secure.receive_shares({keys.SERVER_ROUND: 1, keys.SECAGG_SRCS: srcs, keys.SECAGG_CIPHERTEXTS: cts},
                              states[n], n)
        masked[n] = secure.masked_input(states[n], n, np.full(3, float(n)))
    return masked


@pytest.fixture
def states():
    return {n: RecordDict() for n in NODES}


def test_a_stage_out_of_order_is_refused(states):
    with pytest.raises(SecAggError, match="out of order"):
        secure.handle_stage({keys.SERVER_ROUND: 1, keys.SECAGG_STAGE: "unmask", keys.SECAGG_ACTIVE: NODES},
                            states[1], 1)
    public = _setup(states, rnd=1)
    with pytest.raises(SecAggError, match="needs round 2"):
        secure.handle_stage(_share_cfg(public, rnd=2), states[1], 1)


def test_a_cohort_without_this_device_or_with_a_bad_threshold_is_refused(states):
    base = {keys.SERVER_ROUND: 1, keys.SECAGG_STAGE: "setup", keys.SECAGG_CLIP_RANGE: 4.0}
    with pytest.raises(SecAggError, match="must list this device"):
        secure.handle_stage({**base, keys.SECAGG_NODES: [2, 3], keys.SECAGG_THRESHOLD: 2}, states[1], 1)
    with pytest.raises(SecAggError, match="at least 2"):
        secure.handle_stage({**base, keys.SECAGG_NODES: NODES, keys.SECAGG_THRESHOLD: 1}, states[1], 1)


def test_keys_that_are_not_the_devices_own_or_repeat_are_refused(states):
    public = _setup(states)
    swapped = _share_cfg(public)
    swapped[keys.SECAGG_MASK_KEYS] = swapped[keys.SECAGG_MASK_KEYS][::-1]
    with pytest.raises(SecAggError, match="not the ones it made"):
        secure.handle_stage(swapped, states[1], 1)
    repeated = _share_cfg(public)
    repeated[keys.SECAGG_ENC_KEYS] = [repeated[keys.SECAGG_ENC_KEYS][0]] * 2 + [repeated[keys.SECAGG_ENC_KEYS][2]]
    with pytest.raises(SecAggError, match="same public key"):
        secure.handle_stage(repeated, states[3], 3)


def test_the_masked_inputs_sum_to_the_quantized_sum_and_each_alone_is_noise(states):
    masked = _through_masking(states)
    with np.errstate(over="ignore"):
        total = sum(masked.values()) - sum(secagg.prg(states[n][secure.STATE]["seed"], 3) for n in NODES)
    np.testing.assert_allclose(secagg.dequantize_sum(total, 4.0, 3), [6.0, 6.0, 6.0], atol=1e-5)
    assert all(masked[n].max() > 2**40 for n in NODES)   # nothing near the quantized value n


def test_unmask_reveals_no_secret_for_a_device_listed_as_both_delivered_and_dropped(states):
    _through_masking(states)
    cfg = {keys.SERVER_ROUND: 1, keys.SECAGG_STAGE: "unmask", keys.SECAGG_ACTIVE: [1, 2], keys.SECAGG_DEAD: [2]}
    with pytest.raises(SecAggError, match="both as delivered and as dropped"):
        secure.handle_stage(cfg, states[1], 1)


def test_unmask_with_fewer_deliveries_than_the_threshold_is_refused(states):
    _through_masking(states)
    cfg = {keys.SERVER_ROUND: 1, keys.SECAGG_STAGE: "unmask", keys.SECAGG_ACTIVE: [1], keys.SECAGG_DEAD: [2, 3]}
    with pytest.raises(SecAggError, match="fewer than the threshold 2"):
        secure.handle_stage(cfg, states[1], 1)


def test_unmask_answers_once_with_seed_shares_for_delivered_and_key_shares_for_dropped(states):
    _through_masking(states)
    cfg = {keys.SERVER_ROUND: 1, keys.SECAGG_STAGE: "unmask", keys.SECAGG_ACTIVE: [1, 2], keys.SECAGG_DEAD: [3]}
    reply = secure.handle_stage(cfg, states[1], 1)
    assert reply[keys.SECAGG_NODES] == [1, 2, 3] and len(reply[keys.SECAGG_SHARES]) == 3
    assert secure.STATE not in states[1]
    with pytest.raises(SecAggError, match="out of order"):
        secure.handle_stage(cfg, states[1], 1)


def test_a_ciphertext_that_does_not_open_leaves_out_that_share_but_not_the_mask(states):
    cfg = _share_cfg(_setup(states))
    shared = {n: dict(secure.handle_stage(cfg, states[n], n)) for n in NODES}
    cts = [shared[2][keys.SECAGG_CIPHERTEXTS][shared[2][keys.SECAGG_DSTS].index(1)], b"garbage"]
    secure.receive_shares({keys.SERVER_ROUND: 1, keys.SECAGG_SRCS: [2, 3], keys.SECAGG_CIPHERTEXTS: cts}, states[1], 1)
    held = states[1][secure.STATE]
    assert held["share-of"] == [1, 2] and held["masked-with"] == [2, 3]


def test_senders_outside_the_cohort_are_refused(states):
    cfg = _share_cfg(_setup(states))
    for n in NODES:
        secure.handle_stage(cfg, states[n], n)
    with pytest.raises(SecAggError, match="other devices of the cohort"):
        secure.receive_shares({keys.SERVER_ROUND: 1, keys.SECAGG_SRCS: [2, 9], keys.SECAGG_CIPHERTEXTS: [b"a", b"b"]},
                              states[1], 1)


def test_share_keys_listing_a_device_not_announced_at_setup_is_refused(states):
    # Prepare: device 1 was told at setup that its neighbourhood is {1, 2}
    cfg = {keys.SERVER_ROUND: 1, keys.SECAGG_STAGE: "setup", keys.SECAGG_NODES: [1, 2], keys.SECAGG_THRESHOLD: 2,
           keys.SECAGG_CLIP_RANGE: 4.0}
    public = {n: dict(secure.handle_stage({**cfg, keys.SECAGG_NODES: [1, 2] if n < 3 else [2, 3]}, states[n], n))
              for n in NODES}
    # Execute / Assert: share-keys then lists device 3 too; device 1 shares nothing
    with pytest.raises(SecAggError, match=r"devices \[3\] were not in the cohort announced at setup"):
        secure.handle_stage(_share_cfg(public), states[1], 1)
