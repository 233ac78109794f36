"""HeteroFedAvg on Flower Messages built in-process: a fake Grid routes each instruction to a fake device."""
from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedser.common import keys
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model, head_of
from fedser.common.params import state_to_arrays
from fedser.common.records import arrays_to_record, model_from_config, record_to_arrays
from fedser.common.slicing import slice_state
from fedser.server.strategy import HeteroFedAvg, NodeProfile

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


@pytest.fixture(scope="module")
def global_arrays() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return state_to_arrays(build_model(MODEL))


# ---------------------------------------------------------------- fakes


@dataclass
class FakeDevice:
    """Answers the three instructions as a well-behaved fedser device would, unless told otherwise.

    Its update is the constant ``value`` in every element it was sent (so the L2 norm is
    ``value * sqrt(elements)``), scaled to L2 norm ``step`` when ``value`` is None.
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
            arrays = {k: np.full(a.shape, value, dtype=np.float32) for k, a in sent.items()}
            metrics = {keys.NUM_EXAMPLES: self.n, keys.HEADS: keys.heads_to_mask(self.heads), keys.TIER: self.tier,
                       keys.MODEL_VERSION: int(cfg[keys.MODEL_VERSION]), keys.LOSS: 1.5, keys.EPSILON: 0.75}
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
                            train_settings={}, min_train_nodes=2, min_available_nodes=2)
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
