"""HeteroFedAvg on Flower Messages built in-process: a fake Grid routes each instruction to a fake device."""
from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode, SType
from flwr.supercore.task_identity import TaskIdentity

from fedser.common import keys
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model, head_of
from fedser.common.params import state_to_arrays
from fedser.common.privacy import update_noise_std
from fedser.common.records import arrays_to_record, model_from_config, record_to_arrays
from fedser.common.slicing import slice_state
from fedser.server.strategy import HeteroFedAvg, NodeProfile, RoundOutcome

SPEC = FeatureSpec()
MODEL = ModelConfig(n_features=SPEC.n_features())
CLIP = 1.0
Z = 1.0
BOTH = ("emotion", "kws")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a running ServerApp need the identity Flower's runtime sets."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def make_global_arrays() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return state_to_arrays(build_model(MODEL))


@pytest.fixture(scope="module")
def global_arrays() -> dict[str, np.ndarray]:
    return make_global_arrays()


# ---------------------------------------------------------------- fakes


@dataclass
class FakeDevice:
    """Answers the three instructions as a well-behaved fedser device would, unless told otherwise.

    Its update is the constant ``value`` in every element it was sent (so the L2 norm is
    ``value * sqrt(elements)``), scaled to L2 norm ``step`` when ``value`` is None, plus the
    user-level noise the instruction asks for (unless ``noise`` is False).
    """

    tier: float = 1.0
    heads: tuple[str, ...] = BOTH
    n: int = 10
    step: float = 0.5
    value: float | None = None
    profile_error: int | None = None
    train_error: int | None = None
    corrupt: Callable[[dict, dict], object] | None = None
    eval_metrics: dict | None = None
    noise: bool = True
    queries: int = 0
    instructions: list[Message] = field(default_factory=list)

    def __call__(self, msg: Message) -> Message:
        self.instructions.append(msg)
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            self.queries += 1
            if self.profile_error is not None:
                return Message(Error(code=self.profile_error, reason="declined (no data): empty folder"), reply_to=msg)
            return Message(RecordDict({keys.METRICS: MetricRecord({
                keys.TIER: self.tier, keys.HEADS: keys.heads_to_mask(self.heads), keys.NUM_EXAMPLES: self.n,
                keys.EPSILON: 0.0})}), reply_to=msg)
        if kind == MessageType.TRAIN:
            if self.train_error is not None:
                reason = keys.DECLINE_CODES.get(self.train_error, "crashed")
                return Message(Error(code=self.train_error, reason=f"declined ({reason}): test"), reply_to=msg)
            cfg = msg.content[keys.CONFIG]
            sent = record_to_arrays(msg.content[keys.ARRAYS])
            size = sum(a.size for a in sent.values())
            value = self.value if self.value is not None else self.step / math.sqrt(size)
            norm = value * math.sqrt(size)
            if keys.CLIP_COUNT_STD in cfg and norm > cfg[keys.CLIP_NORM]:
                value *= cfg[keys.CLIP_NORM] / norm   # runs that adapt C: clipped as a fedser device clips
            arrays = {k: np.full(a.shape, value, dtype=np.float32) for k, a in sent.items()}
            std = update_noise_std(cfg[keys.CLIP_NORM], cfg[keys.NOISE_MULTIPLIER], cfg[keys.NOISE_MODE],
                                   cfg[keys.EXPECTED_CLIENTS])
            if std > 0 and self.noise:   # what a device adds on top of its clipped update
                rng = np.random.default_rng(len(self.instructions))
                arrays = {k: (v + rng.normal(0.0, std, v.shape)).astype(np.float32) for k, v in arrays.items()}
            metrics = {keys.NUM_EXAMPLES: self.n, keys.HEADS: keys.heads_to_mask(self.heads), keys.TIER: self.tier,
                       keys.MODEL_VERSION: int(cfg[keys.MODEL_VERSION]), keys.LOSS: 1.5, keys.EPSILON: 0.75}
            if keys.CLIP_COUNT_STD in cfg:   # adaptive clipping: the noised bit "norm <= C" before clipping
                bit_rng = np.random.default_rng(1000 + len(self.instructions))
                metrics[keys.CLIP_BIT] = float(norm <= cfg[keys.CLIP_NORM]) + \
                    float(bit_rng.normal(0.0, cfg[keys.CLIP_COUNT_STD]))
            content = None
            if self.corrupt is not None:
                content = self.corrupt(arrays, metrics)
            if content is None:
                record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
                content = RecordDict({keys.ARRAYS: record, keys.METRICS: MetricRecord(metrics)})
            return Message(content, reply_to=msg)
        return Message(RecordDict({keys.METRICS: MetricRecord(self.eval_metrics or {keys.NUM_EXAMPLES: 0})}),
                       reply_to=msg)


class FakeGrid:
    """The two Grid calls HeteroFedAvg uses, routed to in-process devices."""

    def __init__(self, devices: dict[int, FakeDevice]):
        self.devices = devices
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.devices)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            replies.append(self.devices[m.metadata.dst_node_id](m))
        return replies


def make_strategy(n_nodes: int, noise_mode: str = "distributed", **kwargs) -> HeteroFedAvg:
    return HeteroFedAvg(MODEL, SPEC, clip_norm=CLIP, noise_multiplier=Z, noise_mode=noise_mode,
                        train_settings={keys.LOCAL_EPOCHS: 1, keys.BATCH_SIZE: 8, keys.LEARNING_RATE: 0.01,
                                        keys.DP_ENABLED: False, "num-rounds": 5, "timeout": 5.0},
                        min_train_nodes=n_nodes, min_available_nodes=n_nodes, min_evaluate_nodes=n_nodes,
                        **kwargs)


def train_round(strategy, grid, rnd, arrays):
    """configure_train -> devices -> aggregate_train; returns (new record or None, metrics, replies)."""
    messages = list(strategy.configure_train(rnd, arrays_to_record(arrays), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    new, metrics = strategy.aggregate_train(rnd, replies)
    return new, metrics, replies


def three_tiers(**bad) -> dict[int, FakeDevice]:
    """Nodes 1 (width 1.0, both heads), 2 (0.5, KWS only) and 3 (0.25, emotion only)."""
    return {1: FakeDevice(tier=1.0, heads=BOTH, n=10),
            2: FakeDevice(tier=0.5, heads=("kws",), n=20, **bad),
            3: FakeDevice(tier=0.25, heads=("emotion",), n=5)}


# ---------------------------------------------------------------- configure_train


def test_configure_train_sends_each_node_the_slice_of_the_tier_its_profile_reported(global_arrays):
    # Prepare
    grid = FakeGrid(three_tiers())
    strategy = make_strategy(3)
    strategy.model_version, strategy.kws_head_version = 4, 2
    # Execute
    messages = list(strategy.configure_train(2, arrays_to_record(global_arrays), ConfigRecord(), grid))
    # Assert
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    for m in messages:
        node = m.metadata.dst_node_id
        tier = grid.devices[node].tier
        sent = record_to_arrays(m.content[keys.ARRAYS])
        expected = slice_state(global_arrays, MODEL, tier)
        assert list(sent) == list(expected)
        for k in expected:
            np.testing.assert_array_equal(sent[k], expected[k])
        cfg = m.content[keys.CONFIG]
        assert cfg[keys.TIER] == tier
        assert cfg[keys.CLIP_NORM] == CLIP and cfg[keys.NOISE_MULTIPLIER] == Z
        assert cfg[keys.NOISE_MODE] == "distributed" and cfg[keys.EXPECTED_CLIENTS] == 3
        assert cfg[keys.ROUNDS_LEFT] == 4            # rounds 2, 3, 4, 5 of 5
        assert cfg[keys.SERVER_ROUND] == 2
        assert cfg[keys.MODEL_VERSION] == 4 and cfg[keys.KWS_HEAD_VERSION] == 2
        assert cfg[keys.LOCAL_EPOCHS] == 1 and cfg[keys.BATCH_SIZE] == 8 and cfg[keys.DP_ENABLED] is False
        assert "timeout" not in cfg and "num-rounds" not in cfg
        assert model_from_config(cfg) == (MODEL, SPEC)
    assert strategy.outcome.sampled == 3 and strategy.outcome.declined == []
    assert strategy.outcome.bytes_sent == sum(m.content[keys.ARRAYS].count_bytes() for m in messages)


def test_the_profile_query_goes_once_to_each_node(global_arrays):
    # Prepare
    grid = FakeGrid(three_tiers())
    strategy = make_strategy(3)
    # Execute
    train_round(strategy, grid, 1, global_arrays)
    train_round(strategy, grid, 2, global_arrays)
    # Assert
    assert [d.queries for d in grid.devices.values()] == [1, 1, 1]
    queries = [m for m in grid.sent if m.metadata.message_type == MessageType.QUERY]
    assert all(model_from_config(m.content[keys.CONFIG]) == (MODEL, SPEC) for m in queries)
    assert strategy.profiles[2] == NodeProfile(tier=0.5, heads=["kws"], num_examples=20, epsilon=0.75)


def test_nodes_that_declined_the_profile_are_not_sent_training_and_are_asked_again(global_arrays):
    # Prepare
    grid = FakeGrid(three_tiers(profile_error=keys.DECLINE_NO_DATA))
    strategy = make_strategy(3)
    # Execute
    messages = list(strategy.configure_train(1, arrays_to_record(global_arrays), ConfigRecord(), grid))
    # Assert
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 3]
    assert [n for n, _ in strategy.outcome.declined] == [2]
    assert "no data" in strategy.outcome.declined[0][1]
    assert strategy.profiles[2].declined
    assert all(m.content[keys.CONFIG][keys.EXPECTED_CLIENTS] == 2 for m in messages)
    # Execute: the device found its data; the next round profiles it again and trains it
    grid.devices[2].profile_error = None
    messages = list(strategy.configure_train(2, arrays_to_record(global_arrays), ConfigRecord(), grid))
    # Assert
    assert grid.devices[2].queries == 2
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    assert strategy.profiles[2].declined is None


@pytest.mark.parametrize("metrics, fragment", [
    ({keys.TIER: 0.3, keys.HEADS: 1, keys.NUM_EXAMPLES: 5}, "unknown tier"),
    ({keys.HEADS: 1, keys.NUM_EXAMPLES: 5}, "profile"),                           # no tier
    ({keys.TIER: [0.5], keys.HEADS: 1, keys.NUM_EXAMPLES: 5}, "profile"),         # a list, not a number
    ({keys.TIER: 0.5, keys.HEADS: float("nan"), keys.NUM_EXAMPLES: 5}, "profile"),
])
def test_a_malformed_profile_is_a_decline_not_a_crash(global_arrays, metrics, fragment):
    # Prepare
    devices = three_tiers()
    good_query = devices[2].__call__

    def bad_query(msg):
        if msg.metadata.message_type == MessageType.QUERY:
            return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=msg)
        return good_query(msg)

    grid = FakeGrid({**devices, 2: bad_query})
    strategy = make_strategy(3)
    # Execute
    messages = list(strategy.configure_train(1, arrays_to_record(global_arrays), ConfigRecord(), grid))
    # Assert
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 3]
    assert strategy.outcome.declined and strategy.outcome.declined[0][0] == 2
    assert fragment in strategy.outcome.declined[0][1]


# ---------------------------------------------------------------- aggregate_train: rejections


def _set(key, value):
    def corrupt(arrays, metrics):
        metrics[key] = value
    return corrupt


def _drop_metric(key):
    def corrupt(arrays, metrics):
        del metrics[key]
    return corrupt


def _first_encoder(arrays):
    return next(k for k in arrays if head_of(k) is None and arrays[k].ndim == 3)


def _nan(arrays, metrics):
    arrays[_first_encoder(arrays)].flat[3] = np.nan


def _inf(arrays, metrics):
    arrays["heads.kws.bias"][0] = -np.inf


def _unknown_key(arrays, metrics):
    arrays["encoder.backdoor.weight"] = np.zeros(4, dtype=np.float32)


def _missing_key(arrays, metrics):
    del arrays["heads.kws.bias"]


def _wrong_shape(arrays, metrics):
    k = _first_encoder(arrays)
    arrays[k] = np.zeros(arrays[k].shape[:-1] + (arrays[k].shape[-1] + 1,), dtype=np.float32)


def _full_width_slice(arrays, metrics):
    # the 0.5 node sends the full-width array (twice the output channels) instead of its slice
    k = _first_encoder(arrays)
    arrays[k] = np.zeros((2 * arrays[k].shape[0],) + arrays[k].shape[1:], dtype=np.float32)


def _float64(arrays, metrics):
    k = "heads.kws.weight"
    arrays[k] = arrays[k].astype(np.float64)


def _huge(arrays, metrics):
    for k in arrays:
        arrays[k] *= 1e4


def _no_metrics(arrays, metrics):
    return RecordDict({keys.ARRAYS: arrays_to_record(arrays)})


def _no_arrays(arrays, metrics):
    return RecordDict({keys.METRICS: MetricRecord(metrics)})


def _arrays_in_a_config_record(arrays, metrics):
    return RecordDict({keys.ARRAYS: ConfigRecord({"w": 1.0}), keys.METRICS: MetricRecord(metrics)})


def _metrics_in_an_array_record(arrays, metrics):
    return RecordDict({keys.ARRAYS: arrays_to_record(arrays), keys.METRICS: arrays_to_record(arrays)})


CORRUPTIONS = [
    pytest.param(_nan, "NaN/Inf", id="nan"),
    pytest.param(_inf, "NaN/Inf", id="inf"),
    pytest.param(_unknown_key, "unknown array", id="unknown-key"),
    pytest.param(_missing_key, "missing array", id="missing-key"),
    pytest.param(_wrong_shape, "has shape", id="wrong-shape"),
    pytest.param(_full_width_slice, "for this tier", id="slice-of-another-tier"),
    pytest.param(_float64, "dtype float64", id="wrong-dtype"),
    pytest.param(_huge, "exceeds the bound", id="norm-above-bound"),
    pytest.param(_set(keys.MODEL_VERSION, 2), "stale update", id="stale-version"),
    pytest.param(_set(keys.MODEL_VERSION, 4), "newer than", id="future-version"),
    pytest.param(_set(keys.TIER, 1.0), "claims tier", id="tier-mismatch"),
    pytest.param(_set(keys.TIER, [0.5]), "tier", id="tier-not-a-number"),
    pytest.param(_set(keys.HEADS, 8), "heads mask", id="unknown-head-bit"),
    pytest.param(_set(keys.NUM_EXAMPLES, 0), "num_examples", id="no-examples"),
    pytest.param(_set(keys.LOSS, [1.0, 2.0]), "loss", id="loss-not-a-number"),
    pytest.param(_set(keys.EPSILON, [0.5]), "epsilon", id="epsilon-not-a-number"),
    pytest.param(_drop_metric(keys.MODEL_VERSION), "model version", id="no-model-version"),
    pytest.param(_no_metrics, "malformed reply", id="no-metrics"),
    pytest.param(_no_arrays, "malformed reply", id="no-arrays"),
    pytest.param(_arrays_in_a_config_record, "malformed reply", id="arrays-of-the-wrong-kind"),
    pytest.param(_metrics_in_an_array_record, "malformed reply", id="metrics-of-the-wrong-kind"),
]


@pytest.mark.parametrize("corrupt, fragment", CORRUPTIONS)
def test_a_bad_reply_is_rejected_logged_and_never_touches_the_model(global_arrays, caplog, corrupt, fragment):
    # Prepare: model version 3; node 2 (the 0.5 tier) replies with a damaged update
    grid = FakeGrid(three_tiers(corrupt=corrupt))
    strategy = make_strategy(3)
    strategy.model_version = 3
    messages = list(strategy.configure_train(1, arrays_to_record(global_arrays), ConfigRecord(), grid))
    twin = copy.deepcopy(strategy)
    replies = grid.send_and_receive(messages)
    good = [r for r in replies if r.metadata.src_node_id != 2]
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedser.server"):
        new, metrics = strategy.aggregate_train(1, replies)
    expected, _ = twin.aggregate_train(1, good)
    # Assert: rejected with a reason, logged, and the model is what the good replies alone give
    assert [n for n, _ in strategy.outcome.rejected] == [2]
    assert fragment in strategy.outcome.rejected[0][1]
    assert strategy.rejections[-1]["round"] == 1 and strategy.rejections[-1]["node"] == 2
    assert any("node 2" in r.getMessage() and fragment in r.getMessage() for r in caplog.records)
    assert strategy.outcome.used == 2 and metrics["updates"] == 2
    got, want = record_to_arrays(new), record_to_arrays(expected)
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert strategy.model_version == 4
    # the good replies did move the model, so the comparison above is not vacuous
    assert any(not np.array_equal(got[k], global_arrays[k]) for k in got)


def test_every_reason_of_one_reply_is_kept(global_arrays):
    # Prepare: NaN, a stale version and a tier mismatch at once
    def corrupt(arrays, metrics):
        _nan(arrays, metrics)
        metrics[keys.MODEL_VERSION] = -1
        metrics[keys.TIER] = 0.25

    grid = FakeGrid(three_tiers(corrupt=corrupt))
    strategy = make_strategy(3)
    # Execute
    train_round(strategy, grid, 1, global_arrays)
    # Assert
    reasons = strategy.rejections[-1]["reasons"]
    assert any("NaN/Inf" in r for r in reasons)
    assert any("model version" in r for r in reasons)
    assert any("claims tier" in r for r in reasons)


def test_a_reply_within_the_allowed_staleness_is_aggregated(global_arrays):
    # Prepare
    grid = FakeGrid(three_tiers(corrupt=_set(keys.MODEL_VERSION, 2)))
    strategy = make_strategy(3, max_staleness=1)
    strategy.model_version = 3
    # Execute
    train_round(strategy, grid, 1, global_arrays)
    # Assert
    assert strategy.outcome.rejected == [] and strategy.outcome.used == 3


def test_a_second_reply_from_one_node_is_rejected(global_arrays):
    # Prepare
    grid = FakeGrid(three_tiers())
    strategy = make_strategy(3)
    messages = list(strategy.configure_train(1, arrays_to_record(global_arrays), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    twin = copy.deepcopy(strategy)
    # Execute
    new, _ = strategy.aggregate_train(1, replies + [r for r in replies if r.metadata.src_node_id == 3])
    expected, _ = twin.aggregate_train(1, replies)
    # Assert
    assert [n for n, _ in strategy.outcome.rejected] == [3]
    assert strategy.outcome.used == 3
    got, want = record_to_arrays(new), record_to_arrays(expected)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_a_reply_from_a_node_that_was_not_instructed_is_rejected(global_arrays):
    # Prepare
    devices = three_tiers()
    grid = FakeGrid(devices)
    strategy = make_strategy(3)
    messages = list(strategy.configure_train(1, arrays_to_record(global_arrays), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    stranger = Message(RecordDict({keys.CONFIG: ConfigRecord({})}), message_type=MessageType.TRAIN, dst_node_id=99)
    stray = Message(replies[0].content, reply_to=stranger)
    # Execute
    strategy.aggregate_train(1, replies + [stray])
    # Assert
    assert strategy.outcome.rejected == [(99, "reply from a node that was not sent a training instruction")]
    assert strategy.outcome.used == 3


# ---------------------------------------------------------------- declines, failures, versions


def test_error_replies_are_counted_as_declined_or_failed_and_budget_declines_mark_the_profile(global_arrays):
    # Prepare: 4 nodes; 2 is out of budget, 3 has no data any more, 4 crashed
    devices = {1: FakeDevice(tier=1.0), 2: FakeDevice(tier=0.5, train_error=keys.DECLINE_BUDGET),
               3: FakeDevice(tier=0.25, train_error=keys.DECLINE_NO_DATA),
               4: FakeDevice(tier=1.0, train_error=ErrorCode.CLIENT_APP_RAISED_EXCEPTION)}
    grid = FakeGrid(devices)
    strategy = make_strategy(4)
    # Execute
    new, _, _ = train_round(strategy, grid, 1, global_arrays)
    # Assert
    out = strategy.outcome
    assert sorted(n for n, _ in out.declined) == [2, 3]
    assert [n for n, _ in out.failed] == [4]
    assert out.rejected == [] and out.used == 1 and new is not None
    assert "privacy budget" in strategy.profiles[2].declined
    assert strategy.profiles[3].declined is None      # no data now; its profile is not a budget decline
    assert strategy.profiles[4].declined is None
    # Execute: the next round asks the out-of-budget node again before training it
    train_round(strategy, grid, 2, global_arrays)
    # Assert
    assert [d.queries for d in devices.values()] == [1, 2, 1, 1]


def test_versions_advance_only_when_something_was_aggregated_and_kws_only_with_a_kws_contributor(global_arrays):
    # Prepare: round 1 has only emotion devices, round 2 adds a KWS device
    devices = {1: FakeDevice(tier=1.0, heads=("emotion",)), 2: FakeDevice(tier=0.5, heads=("emotion",))}
    grid = FakeGrid(devices)
    strategy = make_strategy(2)
    # Execute: round 1
    new, metrics, _ = train_round(strategy, grid, 1, global_arrays)
    after_1 = record_to_arrays(new)
    # Assert: the model moved, the KWS head (which the fake devices also sent deltas for) did not
    assert (strategy.model_version, strategy.kws_head_version) == (1, 0)
    assert strategy.outcome.kws_contributors == 0 and strategy.outcome.emotion_contributors == 2
    for k in after_1:
        if head_of(k) == "kws":
            np.testing.assert_array_equal(after_1[k], global_arrays[k])
    assert not np.array_equal(after_1["heads.emotion.weight"], global_arrays["heads.emotion.weight"])
    # Execute: round 2 with a KWS device
    devices[2].heads = ("kws",)
    train_round(strategy, grid, 2, after_1)
    # Assert
    assert (strategy.model_version, strategy.kws_head_version) == (2, 1)
    assert strategy.outcome.kws_contributors == 1
    # Execute: round 3 where every device declines
    for d in devices.values():
        d.train_error = keys.DECLINE_BUDGET
    new3, metrics3, _ = train_round(strategy, grid, 3, after_1)
    # Assert
    assert new3 is None and metrics3["updates"] == 0
    assert (strategy.model_version, strategy.kws_head_version) == (2, 1)


def test_an_all_rejected_round_leaves_the_model_unchanged_and_does_not_crash(global_arrays):
    # Prepare: every device sends NaN
    devices = three_tiers()
    for d in devices.values():
        d.corrupt = _nan
    grid = FakeGrid(devices)
    strategy = make_strategy(3)
    strategy.model_version, strategy.kws_head_version = 5, 2
    # Execute
    new, metrics, _ = train_round(strategy, grid, 1, global_arrays)
    # Assert
    assert new is None and metrics["updates"] == 0
    assert (strategy.model_version, strategy.kws_head_version) == (5, 2)
    assert sorted(n for n, _ in strategy.outcome.rejected) == [1, 2, 3]
    assert strategy.outcome.used == 0 and strategy.outcome.noise_multiplier == math.inf
    # the next round trains on the unchanged model
    for d in devices.values():
        d.corrupt = None
    messages = list(strategy.configure_train(2, arrays_to_record(global_arrays), ConfigRecord(), grid))
    assert all(m.content[keys.CONFIG][keys.MODEL_VERSION] == 5 for m in messages)


def test_no_replies_at_all_is_an_empty_round():
    # Prepare
    grid = FakeGrid(three_tiers())
    strategy = make_strategy(3)
    torch.manual_seed(0)
    arrays = state_to_arrays(build_model(MODEL))
    strategy.configure_train(1, arrays_to_record(arrays), ConfigRecord(), grid)
    # Execute
    new, metrics = strategy.aggregate_train(1, [])
    # Assert
    assert new is None and metrics["updates"] == 0 and strategy.model_version == 0


# ---------------------------------------------------------------- the aggregate itself


def test_full_width_replies_give_the_example_weighted_mean_delta(global_arrays):
    # Prepare: no user-level noise, so the bound is C; deltas are constants 0.001 and 0.003, weights 1 and 3
    devices = {1: FakeDevice(n=1, value=0.001), 2: FakeDevice(n=3, value=0.003)}
    grid = FakeGrid(devices)
    strategy = HeteroFedAvg(MODEL, SPEC, clip_norm=10.0, noise_multiplier=0.0, noise_mode="none",
                            train_settings={}, min_train_nodes=2, min_available_nodes=2, weight_cap=4)
    # Execute
    new, _, _ = train_round(strategy, grid, 1, global_arrays)
    # Assert: every element moves by (1 * 0.001 + 3 * 0.003) / 4 = 0.0025
    got = record_to_arrays(new)
    for k, g in global_arrays.items():
        np.testing.assert_allclose(got[k], g + np.float32(0.0025), rtol=0, atol=1e-6)
    assert strategy.outcome.noise_multiplier == 0.0   # no noise: no user-level guarantee


def test_the_round_noise_multiplier_reflects_the_clients_that_actually_contributed(global_arrays):
    # Prepare: three equal full-width devices are sent training with distributed noise for m = 3
    devices = {i: FakeDevice(n=10) for i in (1, 2, 3)}
    grid = FakeGrid(devices)
    strategy = make_strategy(3)
    # Execute: all three contribute
    train_round(strategy, grid, 1, global_arrays)
    z_all = strategy.outcome.noise_multiplier
    # Execute: one drops out after being sent the instruction
    devices[3].train_error = ErrorCode.NODE_UNAVAILABLE
    train_round(strategy, grid, 2, global_arrays)
    z_two = strategy.outcome.noise_multiplier
    # Assert: z with all m; with two of three, the sum only carries sqrt(2/3) of it
    assert z_all == pytest.approx(Z, rel=1e-9)
    assert z_two == pytest.approx(Z * math.sqrt(2 / 3), rel=1e-9)


def test_received_bytes_device_epsilon_and_loss_are_reported(global_arrays):
    # Prepare
    grid = FakeGrid(three_tiers())
    strategy = make_strategy(3)
    # Execute
    _, _, replies = train_round(strategy, grid, 1, global_arrays)
    # Assert
    out = strategy.outcome
    assert out.bytes_received == sum(r.content[keys.ARRAYS].count_bytes() for r in replies)
    assert out.max_device_epsilon == 0.75 and out.train_loss == 1.5


# ---------------------------------------------------------------- state


def test_state_dict_round_trips_through_json(global_arrays):
    # Prepare: a round with a budget decline and a rejection, so every part of the state is filled
    devices = three_tiers(corrupt=_nan)
    devices[3].train_error = keys.DECLINE_BUDGET
    grid = FakeGrid(devices)
    strategy = make_strategy(3)
    train_round(strategy, grid, 1, global_arrays)
    state = strategy.state_dict()
    # Execute
    restored = make_strategy(3)
    restored.load_state_dict(json.loads(json.dumps(state)))
    # Assert
    assert restored.state_dict() == state
    assert restored.model_version == 1 and restored.kws_head_version == 1
    assert restored.profiles == strategy.profiles and all(isinstance(k, int) for k in restored.profiles)
    assert restored.rejections == strategy.rejections and restored.rejections[0]["node"] == 2
    # Execute: a restored strategy does not profile known nodes again (only the one out of budget)
    devices[3].train_error = None
    messages = list(restored.configure_train(2, arrays_to_record(global_arrays), ConfigRecord(), grid))
    # Assert
    assert [d.queries for d in devices.values()] == [1, 1, 2]
    assert all(m.content[keys.CONFIG][keys.MODEL_VERSION] == 1 for m in messages)


# ---------------------------------------------------------------- evaluation


def test_configure_evaluate_sends_the_full_model_to_every_node(global_arrays):
    # Prepare
    grid = FakeGrid(three_tiers())
    strategy = make_strategy(3)
    record = arrays_to_record(global_arrays)
    # Execute
    messages = list(strategy.configure_evaluate(1, record, ConfigRecord(), grid))
    # Assert
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    for m in messages:
        assert m.metadata.message_type == MessageType.EVALUATE
        sent = record_to_arrays(m.content[keys.ARRAYS])
        assert all(sent[k].shape == global_arrays[k].shape for k in global_arrays)
        assert model_from_config(m.content[keys.CONFIG]) == (MODEL, SPEC)


def test_aggregate_evaluate_weights_each_task_by_the_examples_that_have_it(global_arrays):
    # Prepare
    devices = {1: FakeDevice(eval_metrics={"emotion-n": 10, "emotion-accuracy": 0.5, "emotion-uar": 0.4}),
               2: FakeDevice(eval_metrics={"emotion-n": 30, "emotion-accuracy": 0.9, "emotion-uar": 0.8,
                                           "kws-n": 5, "kws-accuracy": 1.0, "kws-uar": 1.0}),
               3: FakeDevice(eval_metrics={keys.NUM_EXAMPLES: 0})}
    grid = FakeGrid(devices)
    strategy = make_strategy(3)
    replies = grid.send_and_receive(strategy.configure_evaluate(1, arrays_to_record(global_arrays),
                                                                ConfigRecord(), grid))
    failed = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"), reply_to=replies[0])
    # Execute
    result = strategy.aggregate_evaluate(1, replies + [failed])
    # Assert
    assert result["emotion-accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert result["emotion-uar"] == pytest.approx((10 * 0.4 + 30 * 0.8) / 40)
    assert result["kws-accuracy"] == pytest.approx(1.0)
    assert result["emotion-n"] == 40 and result["kws-n"] == 5


def test_constructor_arguments_are_validated_together():
    # Execute / Assert
    with pytest.raises(ValueError) as info:
        HeteroFedAvg(MODEL, SPEC, clip_norm=0.0, noise_multiplier=-1.0, noise_mode="central", train_settings={},
                     fraction_train=0.0, min_train_nodes=0, max_staleness=-1)
    text = str(info.value)
    for fragment in ("clip_norm", "noise_mode", "noise_multiplier", "fraction_train", "min_train_nodes",
                     "max_staleness"):
        assert fragment in text


# ---------------------------------------------------------------- adversarial replies: nothing ends the run


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"shape": shape, "fortran_order": False, "descr": descr})
    return buffer.getvalue()


def _with_array(make: Callable[[str, np.ndarray], Array]):
    """A corruption that sends the first encoder array as ``make(name, honest_array)``."""
    def corrupt(arrays, metrics):
        record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        name = _first_encoder(arrays)
        record[name] = make(name, arrays[name])
        return RecordDict({keys.ARRAYS: record, keys.METRICS: MetricRecord(metrics)})
    return corrupt


def _empty_data(name, a):
    return Array(dtype="float32", shape=tuple(a.shape), stype=SType.NUMPY, data=b"")


def _huge_npy_header(name, a):
    # declared shape and dtype are right; the npy header inside claims 2**45 float32 (128 TiB)
    return Array(dtype="float32", shape=tuple(a.shape), stype=SType.NUMPY,
                 data=_npy_header((2 ** 45,)) + a.tobytes())


@pytest.mark.parametrize("corrupt, fragment", [
    pytest.param(_with_array(_empty_data), "carries 0 bytes", id="empty-array-data"),
    pytest.param(_with_array(_huge_npy_header), "npy header says shape (35184372088832,)", id="huge-npy-header"),
])
def test_an_array_that_cannot_be_decoded_is_rejected_and_the_round_goes_on(global_arrays, corrupt, fragment):
    # Prepare: node 2 sends an Array with empty bytes (np.load: EOFError) or whose npy header
    # claims 2**45 elements (np.load: MemoryError)
    grid = FakeGrid(three_tiers(corrupt=corrupt))
    strategy = make_strategy(3)
    # Execute
    new, metrics, _ = train_round(strategy, grid, 1, global_arrays)
    # Assert
    assert [n for n, _ in strategy.outcome.rejected] == [2]
    assert fragment in strategy.outcome.rejected[0][1]
    assert strategy.outcome.used == 2 and metrics["updates"] == 2 and new is not None


def test_a_reply_whose_processing_fails_unexpectedly_is_rejected_not_raised(global_arrays, monkeypatch):
    # Prepare: reading node 2's record raises something no check anticipates
    grid = FakeGrid(three_tiers())
    strategy = make_strategy(3)
    messages = list(strategy.configure_train(1, arrays_to_record(global_arrays), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    bad = next(r for r in replies if r.metadata.src_node_id == 2).content[keys.ARRAYS]

    def count_bytes(self):
        if self is bad:
            raise RuntimeError("corrupt record")
        return original(self)

    original = ArrayRecord.count_bytes
    monkeypatch.setattr(ArrayRecord, "count_bytes", count_bytes)
    # Execute
    strategy.aggregate_train(1, replies)
    # Assert
    assert strategy.outcome.rejected == [(2, "reply could not be processed: RuntimeError: corrupt record")]
    assert strategy.outcome.used == 2


def test_a_train_count_above_the_profiled_count_is_rejected_and_the_node_profiled_again(global_arrays):
    # Prepare: node 2 profiled 20 examples and claims 21 when it replies
    devices = three_tiers(corrupt=_set(keys.NUM_EXAMPLES, 21))
    grid = FakeGrid(devices)
    strategy = make_strategy(3)
    # Execute
    train_round(strategy, grid, 1, global_arrays)
    # Assert
    assert [n for n, _ in strategy.outcome.rejected] == [2]
    assert "num_examples 21 is more than the 20 training examples" in strategy.outcome.rejected[0][1]
    assert strategy.outcome.used == 2
    # Execute: its data really grew; the next round asks it again and trains on the new count
    devices[2].n, devices[2].corrupt = 21, None
    train_round(strategy, grid, 2, global_arrays)
    # Assert
    assert devices[2].queries == 2 and strategy.profiles[2].num_examples == 21
    assert strategy.outcome.rejected == [] and strategy.outcome.used == 3


# ---------------------------------------------------------------- one device does not steer the model


def _liar_cohort(mode: str = "distributed") -> tuple[FakeGrid, HeteroFedAvg]:
    """Nine honest devices (10 examples, step +1e-3 per element) and node 10 stepping -1e-3
    that claims 10**6 examples, in its profile and its reply alike."""
    devices = {i: FakeDevice(n=10, value=1e-3) for i in range(1, 10)}
    devices[10] = FakeDevice(n=10 ** 6, value=-1e-3)
    return FakeGrid(devices), make_strategy(10, noise_mode=mode)


def test_one_device_claiming_a_million_examples_cannot_flip_the_sign_of_the_global_step(global_arrays):
    # Prepare: no user-level noise, so the step is exact
    grid, strategy = _liar_cohort("none")
    # Execute
    new, metrics, _ = train_round(strategy, grid, 1, global_arrays)
    # Assert: the liar counts as the lower median (10), so the step is (9*10 - 10) / 100 * 1e-3
    step = (9 * 10 * 1e-3 - 10 * 1e-3) / (9 * 10 + 10)
    got = record_to_arrays(new)
    for k, g in global_arrays.items():
        np.testing.assert_allclose(got[k] - g, step, rtol=0, atol=2e-6)
    assert strategy.outcome.used == 10 and strategy.outcome.capped == [(10, 10 ** 6, 10)]
    assert metrics["agg-examples"] == 9 * 10 + 10


def test_the_reported_noise_multiplier_comes_from_the_capped_weights(global_arrays):
    # Prepare: distributed noise for m = 10, per-device std s = z C / sqrt(10)
    grid, strategy = _liar_cohort()
    s = Z * CLIP / math.sqrt(10)
    # Execute
    train_round(strategy, grid, 1, global_arrays)
    # Assert: every user at its capped weight 10, not the liar at 10**6:
    # sqrt(10 * 10^2) s / (10 C), where the claimed weight would give about s / C
    z = strategy.outcome.noise_multiplier
    assert z == pytest.approx(math.sqrt(10 * 10 ** 2) * s / (10 * CLIP), rel=1e-9)
    assert z > 1.2 * s / CLIP


def test_devices_above_the_lower_median_count_as_it_and_the_others_keep_their_counts(global_arrays):
    # Prepare: counts 5, 10, 20; the lower median is 10
    devices = {1: FakeDevice(n=5, value=0.001), 2: FakeDevice(n=10, value=0.002), 3: FakeDevice(n=20, value=0.004)}
    grid = FakeGrid(devices)
    strategy = make_strategy(3, noise_mode="none")   # no user-level noise: the mean is exact
    # Execute
    new, _, _ = train_round(strategy, grid, 1, global_arrays)
    # Assert
    want = (5 * 0.001 + 10 * 0.002 + 10 * 0.004) / 25
    got = record_to_arrays(new)
    for k, g in global_arrays.items():
        np.testing.assert_allclose(got[k] - g, want, rtol=0, atol=2e-6)
    assert strategy.outcome.capped == [(3, 20, 10)]


# ---------------------------------------------------------------- evaluation replies are checked too


GOOD_EVAL = {1: {"emotion-n": 10, "emotion-accuracy": 0.5, "emotion-uar": 0.4},
             3: {"emotion-n": 5, "emotion-accuracy": 0.8, "emotion-uar": 0.6, "kws-n": 4,
                 "kws-accuracy": 0.75, "kws-uar": 0.7}}


def _evaluate(global_arrays, bad_reply: Callable[[Message], Message], profiles: bool = True):
    """Nodes 1 and 3 evaluate honestly, node 2 replies with ``bad_reply``; returns (strategy, result)."""
    devices = {1: FakeDevice(eval_metrics=GOOD_EVAL[1]), 3: FakeDevice(eval_metrics=GOOD_EVAL[3])}
    grid = FakeGrid({**devices, 2: bad_reply})
    strategy = make_strategy(3)
    if profiles:
        strategy.profiles = {n: NodeProfile(1.0, list(BOTH), 40) for n in (1, 2, 3)}
    replies = grid.send_and_receive(strategy.configure_evaluate(1, arrays_to_record(global_arrays),
                                                                ConfigRecord(), grid))
    return strategy, strategy.aggregate_evaluate(1, replies)


def _eval_reply(metrics: dict | None = None, record: object = None):
    def reply(msg):
        content = RecordDict({keys.METRICS: MetricRecord(metrics)} if metrics is not None else {})
        if record is not None:
            content = RecordDict({keys.METRICS: record})
        return Message(content, reply_to=msg)
    return reply


@pytest.mark.parametrize("bad_reply, fragment", [
    pytest.param(_eval_reply(record=None), "no MetricRecord", id="no-metrics-record"),
    pytest.param(_eval_reply({"emotion-n": 10, "emotion-uar": 0.5}), "emotion-accuracy", id="no-accuracy"),
    pytest.param(_eval_reply({"emotion-n": 10, "emotion-accuracy": math.nan, "emotion-uar": 0.5}),
                 "emotion-accuracy must be a finite number", id="nan-accuracy"),
    pytest.param(_eval_reply({"kws-n": 10, "kws-accuracy": 0.5, "kws-uar": math.inf}), "kws-uar", id="inf-uar"),
    pytest.param(_eval_reply({"emotion-n": 10, "emotion-accuracy": 1.5, "emotion-uar": 0.5}), "in [0, 1]",
                 id="accuracy-above-one"),
    pytest.param(_eval_reply({"emotion-n": 10 ** 9, "emotion-accuracy": 0.0, "emotion-uar": 0.0}),
                 "implausible", id="a-billion-examples"),
    pytest.param(_eval_reply({"emotion-n": -4, "emotion-accuracy": 0.0, "emotion-uar": 0.0}),
                 "emotion-n must be an integer >= 0", id="negative-count"),
    pytest.param(_eval_reply({"emotion-n": 2.5, "emotion-accuracy": 0.0, "emotion-uar": 0.0}),
                 "emotion-n must be an integer", id="fractional-count"),
    pytest.param(_eval_reply({keys.NUM_EXAMPLES: -1}), "num-examples", id="negative-total"),
    pytest.param(_eval_reply(record=ConfigRecord({"emotion-n": 10})), "not a MetricRecord", id="wrong-record-kind"),
])
def test_an_invalid_evaluation_reply_is_rejected_and_not_averaged(global_arrays, caplog, bad_reply, fragment):
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedser.server"):
        strategy, result = _evaluate(global_arrays, bad_reply)
    # Assert: the figures are those of nodes 1 and 3 alone
    assert [n for n, _ in strategy.outcome.eval_rejected] == [2]
    assert fragment in strategy.outcome.eval_rejected[0][1]
    assert strategy.outcome.rejected == []                      # training rejections are counted apart
    assert strategy.rejections[-1]["stage"] == "evaluate" and strategy.rejections[-1]["node"] == 2
    assert any("evaluation from node 2" in r.getMessage() for r in caplog.records)
    assert result["emotion-accuracy"] == pytest.approx((10 * 0.5 + 5 * 0.8) / 15)
    assert result["emotion-uar"] == pytest.approx((10 * 0.4 + 5 * 0.6) / 15)
    assert result["kws-accuracy"] == pytest.approx(0.75) and result["kws-n"] == 4
    assert result["emotion-n"] == 15


def test_an_evaluation_count_above_the_profile_is_weighted_as_the_profiled_count(global_arrays):
    # Prepare: node 2 profiled 40 training examples and claims 5000 evaluation examples at accuracy 0
    liar = _eval_reply({"emotion-n": 5000, "emotion-accuracy": 0.0, "emotion-uar": 0.0})
    # Execute
    strategy, result = _evaluate(global_arrays, liar)
    # Assert: it counts as 40, then as 4 x the lower median of (10, 40, 5) = 40
    assert strategy.outcome.eval_rejected == []
    assert result["emotion-n"] == 10 + 40 + 5
    assert result["emotion-accuracy"] == pytest.approx((10 * 0.5 + 5 * 0.8) / 55)


def test_an_unprofiled_node_cannot_outweigh_the_others_in_evaluation(global_arrays):
    # Prepare: nobody has been profiled; node 2 claims 900000 evaluation examples at accuracy 0
    liar = _eval_reply({"emotion-n": 900_000, "emotion-accuracy": 0.0, "emotion-uar": 0.0})
    # Execute
    strategy, result = _evaluate(global_arrays, liar, profiles=False)
    # Assert: the cohort cap, 4 x the lower median of (10, 900000, 5) = 40
    assert result["emotion-n"] == 10 + 40 + 5
    assert result["emotion-accuracy"] == pytest.approx((10 * 0.5 + 5 * 0.8) / 55)


# ---------------------------------------------------------------- fuzz: generated replies, valid and malformed


# A fast slice in the suite; bench/bench_robustness.py sets FEDSER_FUZZ_EXAMPLES for the full count.
FUZZ_TRAIN_EXAMPLES = int(os.environ.get("FEDSER_FUZZ_EXAMPLES", 50))
FUZZ_EVAL_EXAMPLES = int(os.environ.get("FEDSER_FUZZ_EXAMPLES", 60))


def _bytes_of(a: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=False)
    return buffer.getvalue()


def _raw(a: Array, *, dtype: str | None = None, shape: tuple | None = None, stype: str | None = None,
         data: bytes | None = None) -> Array:
    return Array(dtype=a.dtype if dtype is None else dtype, shape=tuple(a.shape) if shape is None else shape,
                 stype=a.stype if stype is None else stype, data=a.data if data is None else data)


# Each fault: (draw, {name: Array}, {name: honest ndarray}, metrics, profiled count) -> RecordDict or None
# (None: send the mutated arrays and metrics). MALFORMED faults must be rejected, VALID ones used.
def _one(draw, arrays):
    return draw(st.sampled_from(sorted(arrays)))


def _array_fault(make):
    def fault(draw, records, arrays, metrics, profiled):
        name = _one(draw, arrays)
        records[name] = make(draw, records[name], arrays[name])
    return fault


def _set_metric(key, values):
    def fault(draw, records, arrays, metrics, profiled):
        metrics[key] = draw(st.sampled_from(values(profiled)))
    return fault


def _drop_metric_fault(key):
    def fault(draw, records, arrays, metrics, profiled):
        del metrics[key]
    return fault


def _values(*values):
    return lambda profiled: list(values)


def _noise_free(draw, records, arrays, metrics, profiled):
    """Every weight set to the update's RMS: the honest norm, none of the run's noise."""
    rms = np.float32(math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values())
                               / sum(a.size for a in arrays.values())))
    sign = draw(st.sampled_from([1.0, -1.0]))
    records.update({k: Array(np.full(a.shape, sign * rms, dtype=np.float32)) for k, a in arrays.items()})


MALFORMED_TRAIN = {
    "noise-free-at-the-honest-norm": _noise_free,
    "empty-data": _array_fault(lambda draw, r, a: _raw(r, data=b"")),
    "truncated": _array_fault(lambda draw, r, a: _raw(r, data=r.data[:draw(st.integers(0, len(r.data) - 1))])),
    "padded": _array_fault(lambda draw, r, a: _raw(r, data=r.data + draw(st.binary(min_size=1, max_size=64)))),
    "garbage": _array_fault(lambda draw, r, a: _raw(r, data=draw(st.binary(max_size=len(r.data) + 16)))),
    "huge-header": _array_fault(lambda draw, r, a: _raw(r, data=_npy_header((draw(st.integers(2 ** 31, 2 ** 50)),))
                                                        + a.tobytes())),
    "header-shape": _array_fault(lambda draw, r, a: _raw(r, data=_npy_header(a.shape + (1,)) + a.tobytes())),
    "header-float64": _array_fault(lambda draw, r, a: _raw(r, data=_bytes_of(a.astype(np.float64)))),
    "declared-dtype": _array_fault(lambda draw, r, a: _raw(r, dtype=draw(st.sampled_from(
        ["float64", "float16", "int32", ">f4", "object", ""])))),
    "declared-shape": _array_fault(lambda draw, r, a: _raw(r, shape=draw(st.sampled_from(
        [a.shape + (1,), (a.size + 1,), tuple(d + 1 for d in a.shape) or (1,)])))),
    "stype": _array_fault(lambda draw, r, a: _raw(r, stype=draw(st.sampled_from(["torch", "", "numpy"])))),
    "big-endian": _array_fault(lambda draw, r, a: Array(np.ascontiguousarray(a.astype(">f4")))),
    "non-finite": _array_fault(lambda draw, r, a: Array(np.where(np.arange(a.size).reshape(a.shape) == 0,
                                                                 draw(st.sampled_from([np.nan, np.inf, -np.inf])),
                                                                 a).astype(np.float32))),
    "above-norm-bound": _array_fault(lambda draw, r, a: Array(np.full(a.shape, 1e4, dtype=np.float32))),
    "missing-array": lambda draw, records, arrays, metrics, profiled: records.pop(_one(draw, arrays)) and None,
    "unknown-array": lambda draw, records, arrays, metrics, profiled: records.__setitem__(
        "encoder.extra", Array(np.zeros(draw(st.integers(1, 4)), dtype=np.float32))),
    "num-examples": _set_metric(keys.NUM_EXAMPLES, lambda p: [0, -3, 2.5, math.nan, math.inf, 10 ** 7, p + 1, [5]]),
    "heads": _set_metric(keys.HEADS, _values(0, 4, 8, -1, 2.5, math.nan, [1])),
    "model-version": _set_metric(keys.MODEL_VERSION, _values(-1, 1, 7, 0.5, math.nan, [0])),
    "tier": _set_metric(keys.TIER, _values(0.3, 2.0, math.nan, [0.5])),
    "loss": _set_metric(keys.LOSS, _values(math.nan, math.inf, [1.0, 2.0])),
    "epsilon": _set_metric(keys.EPSILON, _values(-1.0, math.nan, [0.5])),
    "no-num-examples": _drop_metric_fault(keys.NUM_EXAMPLES),
    "no-heads": _drop_metric_fault(keys.HEADS),
    "no-model-version": _drop_metric_fault(keys.MODEL_VERSION),
    "no-metrics-record": lambda draw, records, arrays, metrics, profiled: RecordDict(
        {keys.ARRAYS: ArrayRecord(records)}),
    "no-arrays-record": lambda draw, records, arrays, metrics, profiled: RecordDict(
        {keys.METRICS: MetricRecord(metrics)}),
    "records-swapped": lambda draw, records, arrays, metrics, profiled: RecordDict(
        {keys.ARRAYS: ConfigRecord({"w": 1.0}), keys.METRICS: ArrayRecord(records)}),
}
VALID_TRAIN = {
    "honest": lambda draw, records, arrays, metrics, profiled: None,
    "fortran-order": _array_fault(lambda draw, r, a: Array(np.asfortranarray(a))),
    # the step (the array's mean: FakeDevice steps every weight alike) scaled down, the noise kept
    "smaller-step": _array_fault(lambda draw, r, a: Array(
        (a - np.float32(1.0 - draw(st.floats(0.0, 1.0))) * a.mean()).astype(np.float32))),
    "fewer-examples": _set_metric(keys.NUM_EXAMPLES, lambda p: [1, max(1, p // 2), p, float(p)]),
    "other-loss-and-epsilon": lambda draw, records, arrays, metrics, profiled: metrics.update(
        {keys.LOSS: draw(st.floats(-1e6, 1e6)), keys.EPSILON: draw(st.floats(0.0, 1e3))}),
    "no-optional-metrics": lambda draw, records, arrays, metrics, profiled: [
        metrics.pop(k) for k in (keys.LOSS, keys.EPSILON, keys.TIER)] and None,
}


@pytest.fixture(scope="module")
def fuzz_round(global_arrays):
    return make_fuzz_round(global_arrays)


def make_fuzz_round(global_arrays):
    """One configured training round of three_tiers(), and each node's instruction and honest delta
    (also used by ``bench/bench_robustness.py`` to throw many more generated replies)."""
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    devices = three_tiers()
    grid = FakeGrid(devices)
    strategy = make_strategy(3)
    messages = list(strategy.configure_train(1, arrays_to_record(global_arrays), ConfigRecord(), grid))
    honest = {}
    for m in messages:
        reply = devices[m.metadata.dst_node_id](m)
        honest[m.metadata.dst_node_id] = (m, record_to_arrays(reply.content[keys.ARRAYS]),
                                          dict(reply.content[keys.METRICS]))
    return FuzzRound(strategy, honest, copy.deepcopy(strategy.profiles), strategy._global)


@dataclass
class FuzzRound:
    """A configured round the fuzz tests rewind before each generated example."""

    strategy: HeteroFedAvg
    honest: dict[int, tuple[Message, dict[str, np.ndarray], dict]]   # node -> instruction, delta, metrics
    profiles: dict[int, NodeProfile]
    global_state: dict[str, np.ndarray]

    def __repr__(self) -> str:  # hypothesis prints its arguments; the arrays would be megabytes
        return f"FuzzRound(nodes={sorted(self.honest)})"

    def rewind(self) -> HeteroFedAvg:
        """The strategy as configure_train left it, so every generated round starts alike."""
        s = self.strategy
        s.profiles, s.model_version, s.kws_head_version = copy.deepcopy(self.profiles), 0, 0
        s._global, s.outcome, s.rejections = self.global_state, RoundOutcome(), []
        return s


@settings(max_examples=FUZZ_TRAIN_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_generated_train_replies_never_raise_and_each_is_used_or_rejected(fuzz_round, data):
    # Prepare: each node's reply is valid or damaged in one generated way; maybe one node replies twice
    strategy, honest = fuzz_round.rewind(), fuzz_round.honest
    faults = {**{k: (f, True) for k, f in MALFORMED_TRAIN.items()}, **{k: (f, False) for k, f in VALID_TRAIN.items()}}
    replies, malformed = [], set()
    for node, (instruction, arrays, metrics) in honest.items():
        name = data.draw(st.sampled_from(sorted(faults)), label=f"node {node}")
        fault, bad = faults[name]
        records = {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        metrics = dict(metrics)
        content = fault(data.draw, records, arrays, metrics, strategy.profiles[node].num_examples)
        if content is None:
            content = RecordDict({keys.ARRAYS: ArrayRecord(records), keys.METRICS: MetricRecord(metrics)})
        replies.append(Message(content, reply_to=instruction))
        if bad:
            malformed.add(node)
    twice = data.draw(st.sampled_from([None, *honest]), label="replies twice")
    if twice is not None:
        replies.append(next(r for r in replies if r.metadata.src_node_id == twice))
    # Execute
    new, metrics = strategy.aggregate_train(1, replies)
    # Assert: every malformed reply rejected with a reason, every valid one used
    rejected = [n for n, _ in strategy.outcome.rejected]
    assert all(reason for _, reason in strategy.outcome.rejected)
    assert malformed <= set(rejected)
    assert len(rejected) == len(malformed) + (twice is not None)
    assert strategy.outcome.used == len(honest) - len(malformed) == metrics["updates"]
    assert (new is None) == (strategy.outcome.used == 0)


def _eval_scores(draw) -> dict:
    """Valid evaluation metrics; counts of 0 or 5..10, so neither cap binds (4 x 5 >= 10)."""
    metrics: dict = {}
    for task in draw(st.sets(st.sampled_from(keys.TASKS))):
        metrics[f"{task}-n"] = draw(st.sampled_from([0, 5, 6, 7, 8, 9, 10]))
        metrics[f"{task}-{keys.ACCURACY}"] = draw(st.floats(0.0, 1.0))
        metrics[f"{task}-{keys.UAR}"] = draw(st.floats(0.0, 1.0))
    metrics[keys.NUM_EXAMPLES] = sum(v for k, v in metrics.items() if k.endswith("-n"))
    return metrics


_BAD_SCORES = [math.nan, math.inf, -math.inf, -0.01, 1.01, 7, [0.5]]
_BAD_COUNTS = [-1, 2.5, math.nan, math.inf, 10 ** 9, [3]]


def _damage(draw, metrics: dict) -> object:
    """``metrics`` made invalid in one generated way; a MetricRecord or whatever else the reply holds."""
    task = draw(st.sampled_from(keys.TASKS))
    how = draw(st.sampled_from(["score", "count", "missing-score", "total", "no-record", "wrong-record"]))
    if how in ("score", "missing-score"):
        metrics.setdefault(f"{task}-n", draw(st.integers(1, 10)))
        if metrics[f"{task}-n"] == 0:
            metrics[f"{task}-n"] = 1
        key = f"{task}-{draw(st.sampled_from([keys.ACCURACY, keys.UAR]))}"
        if how == "score":
            metrics[key] = draw(st.sampled_from(_BAD_SCORES))
        else:
            metrics.pop(key, None)
    elif how == "count":
        metrics[f"{task}-n"] = draw(st.sampled_from(_BAD_COUNTS))
    elif how == "total":
        metrics[keys.NUM_EXAMPLES] = draw(st.sampled_from(_BAD_COUNTS[:4]))
    elif how == "no-record":
        return None
    else:
        return ConfigRecord({"emotion-n": 3})
    return MetricRecord(metrics)


@settings(max_examples=FUZZ_EVAL_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_generated_evaluation_replies_never_raise_and_each_is_averaged_or_rejected(fuzz_round, data):
    # Prepare: four nodes profiled with 40 examples each, evaluating on at most 10 (no cap binds)
    strategy = fuzz_round.rewind()
    strategy.profiles = {n: NodeProfile(1.0, list(BOTH), 40) for n in (1, 2, 3, 4)}
    replies, valid, malformed = [], {}, set()
    for node in (1, 2, 3, 4):
        instruction = Message(RecordDict({keys.CONFIG: ConfigRecord({})}), message_type=MessageType.EVALUATE,
                              dst_node_id=node)
        metrics = _eval_scores(data.draw)
        if data.draw(st.booleans(), label=f"node {node} damaged"):
            record = _damage(data.draw, metrics)
            malformed.add(node)
        else:
            record = MetricRecord(metrics)
            valid[node] = metrics
        replies.append(Message(RecordDict({} if record is None else {keys.METRICS: record}), reply_to=instruction))
    # Execute
    result = strategy.aggregate_evaluate(1, replies)
    # Assert: malformed replies rejected with a reason; the figures are the valid replies' weighted means
    assert {n for n, _ in strategy.outcome.eval_rejected} == malformed
    assert all(reason for _, reason in strategy.outcome.eval_rejected)
    for task in keys.TASKS:
        counted = [(m[f"{task}-n"], m[f"{task}-{keys.ACCURACY}"]) for m in valid.values() if m.get(f"{task}-n", 0) > 0]
        if not counted:
            assert result is None or f"{task}-n" not in result
            continue
        total = sum(n for n, _ in counted)
        assert result[f"{task}-n"] == total
        assert result[f"{task}-accuracy"] == pytest.approx(sum(n * a for n, a in counted) / total, abs=1e-12)


def test_the_trimmed_mean_rule_ignores_the_liar_entirely(global_arrays):
    # Prepare: the same cohort without noise, combined by the robust rule (same checks, another combination).
    from fedser.server.robust import TrimmedMeanHeteroFedAvg

    devices = {i: FakeDevice(n=10, value=1e-3) for i in range(1, 10)}
    devices[10] = FakeDevice(n=10 ** 6, value=-1e-3)
    strategy = TrimmedMeanHeteroFedAvg(MODEL, SPEC, clip_norm=CLIP, noise_multiplier=Z, noise_mode="none",
                                       train_settings={keys.LOCAL_EPOCHS: 1, keys.BATCH_SIZE: 8,
                                                       keys.LEARNING_RATE: 0.01, keys.DP_ENABLED: False,
                                                       "num-rounds": 5, "timeout": 5.0},
                                       min_train_nodes=10, min_available_nodes=10, min_evaluate_nodes=10, trim=0.2)
    # Execute
    new, _, _ = train_round(strategy, FakeGrid(devices), 1, global_arrays)
    # Assert: per element the two lowest and two highest of ten values go; the rest are honest.
    got = record_to_arrays(new)
    for k, g in global_arrays.items():
        np.testing.assert_allclose(got[k] - g, 1e-3, rtol=0, atol=2e-6)
    assert strategy.outcome.used == 10


# ---------------------------------------------------------------- silent devices and bounded waits


class SilentGrid(FakeGrid):
    """A FakeGrid where some devices never answer some kinds of instruction (Flower then returns
    only the replies that arrived by the timeout)."""

    def __init__(self, devices, silent: dict[int, set]):
        super().__init__(devices)
        self.silent = silent

    def send_and_receive(self, messages, *, timeout=None):
        heard = [m for m in messages if m.metadata.message_type not in self.silent.get(m.metadata.dst_node_id, set())]
        self.sent += [m for m in messages if m not in heard]
        return super().send_and_receive(heard, timeout=timeout)


@pytest.mark.parametrize("silent_at", [MessageType.QUERY, MessageType.TRAIN])
def test_a_silent_device_counts_as_failed_once_and_is_not_waited_for_again(silent_at, global_arrays):
    # Prepare: three devices; the third never answers one kind of instruction.
    from fedser.server.strategy import NO_PROFILE_REPLY, NO_TRAIN_REPLY

    grid = SilentGrid({i: FakeDevice(n=10, value=1e-3) for i in (1, 2, 3)}, {3: {silent_at}})
    strategy = make_strategy(3)
    # Execute
    new, _, _ = train_round(strategy, grid, 1, global_arrays)
    evaluations = list(strategy.configure_evaluate(1, new, ConfigRecord(), grid))
    # Assert: counted as failed with the reason; the round used the other two; no evaluation
    # instruction goes to the silent device, so it costs one timeout, not three.
    reason = NO_PROFILE_REPLY if silent_at == MessageType.QUERY else NO_TRAIN_REPLY
    assert strategy.outcome.failed == [(3, reason)] and strategy.outcome.used == 2
    assert 3 not in {m.metadata.dst_node_id for m in evaluations}
    sent_train = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MessageType.TRAIN}
    assert (3 in sent_train) == (silent_at == MessageType.TRAIN)


def test_waiting_for_too_few_devices_ends_with_what_it_waited_for(global_arrays):
    # Prepare: one device connected, two needed, a short connect timeout.
    from fedser.server.sampling import NotEnoughDevices

    strategy = make_strategy(2, connect_timeout=0.5)
    # Execute / Assert
    with pytest.raises(NotEnoughDevices, match=r"1 device\(s\) connected, 2 needed \(min-clients\)"):
        train_round(strategy, FakeGrid({1: FakeDevice(n=10, value=1e-3)}), 1, global_arrays)


# ---------------------------------------------------------------- adaptive clipping


def test_adaptive_clipping_moves_c_towards_the_median_norm_and_accounts_the_round_at_z(global_arrays):
    from fedser.common.privacy import AdaptiveClip, combined_noise_multiplier

    # Prepare: 20 devices whose updates have norms 0.3 .. 6.0 (median 3.15); C starts at CLIP = 1
    devices = {i: FakeDevice(n=10, step=0.3 * i) for i in range(1, 21)}
    grid = FakeGrid(devices)
    strategy = make_strategy(20, adaptive_clip=AdaptiveClip(CLIP, quantile=0.5, learning_rate=0.2))
    arrays, bounds = global_arrays, []
    # Execute
    for rnd in range(1, 31):
        new, _, _ = train_round(strategy, grid, rnd, arrays)
        arrays = record_to_arrays(new)
        bounds.append(strategy.outcome.clip_norm)
    # Assert: the instruction carried C, the raised update noise and the bit's noise
    cfg = grid.sent[-1].content[keys.CONFIG]
    m = 20
    assert cfg[keys.CLIP_NORM] == pytest.approx(bounds[-1])
    assert cfg[keys.NOISE_MULTIPLIER] == pytest.approx(AdaptiveClip.update_noise(Z, m)) and cfg[keys.NOISE_MULTIPLIER] > Z
    assert cfg[keys.CLIP_COUNT_STD] == pytest.approx(AdaptiveClip.count_noise(Z, m) / math.sqrt(m))
    # every update and bit was used, and together they are accounted at exactly z
    assert strategy.outcome.rejected == [] and strategy.outcome.used == m
    assert strategy.outcome.noise_multiplier == pytest.approx(Z, rel=1e-6)
    assert combined_noise_multiplier(AdaptiveClip.update_noise(Z, m), AdaptiveClip.count_noise(Z, m)) == \
        pytest.approx(Z)
    # C left its start and settled near the median norm
    assert bounds[0] == CLIP and 2.2 <= bounds[-1] <= 4.5
    # and a resumed strategy goes on from the adapted C
    twin = make_strategy(20, adaptive_clip=AdaptiveClip(CLIP))
    twin.load_state_dict(strategy.state_dict())
    assert twin.clip_norm == strategy.clip_norm != CLIP


def test_a_fixed_clip_sends_no_bit_and_keeps_c(global_arrays):
    grid = FakeGrid(three_tiers())
    strategy = make_strategy(3)
    train_round(strategy, grid, 1, global_arrays)
    cfg = grid.sent[-1].content[keys.CONFIG]
    assert keys.CLIP_COUNT_STD not in cfg and cfg[keys.NOISE_MULTIPLIER] == Z
    assert strategy.clip_norm == CLIP and strategy.outcome.noise_multiplier > 0


@pytest.mark.parametrize("corrupt, fragment", [
    pytest.param(_drop_metric(keys.CLIP_BIT), "needs each device's bit", id="no-bit"),
    pytest.param(_set(keys.CLIP_BIT, float("nan")), "finite number", id="nan-bit"),
    pytest.param(_set(keys.CLIP_BIT, [1.0]), "finite number", id="bit-not-a-number"),
    pytest.param(_set(keys.CLIP_BIT, 50.0), "beyond what a bit", id="bit-pushing-c"),
])
def test_a_bad_clip_bit_is_rejected_and_does_not_move_c(global_arrays, corrupt, fragment):
    from fedser.common.privacy import AdaptiveClip

    grid = FakeGrid(three_tiers(corrupt=corrupt))
    strategy = make_strategy(3, adaptive_clip=AdaptiveClip(CLIP))
    twin = make_strategy(3, adaptive_clip=AdaptiveClip(CLIP))
    messages = list(strategy.configure_train(1, arrays_to_record(global_arrays), ConfigRecord(), grid))
    list(twin.configure_train(1, arrays_to_record(global_arrays), ConfigRecord(), FakeGrid(three_tiers())))
    replies = grid.send_and_receive(messages)
    strategy.aggregate_train(1, replies)
    twin.aggregate_train(1, [r for r in replies if r.metadata.src_node_id != 2])
    assert [n for n, _ in strategy.outcome.rejected] == [2] and fragment in strategy.outcome.rejected[0][1]
    assert strategy.clip_norm == pytest.approx(twin.clip_norm) and strategy.clip_norm != CLIP
