"""Secure aggregation through the ServerApp's round loop: the server learns the sum, never an update.

The devices here run fedser's real device-side protocol (``fedser.client.secure``: keys, shares,
masks) on updates the test chooses, so the sum the server must find is known exactly; the
ClientApp's own path (training, then masking) is checked at the end with the real ClientApp.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedser.client import secure
from fedser.common import keys
from fedser.common.models import build_model, head_of, trained_entries
from fedser.common.params import state_to_arrays
from fedser.common.privacy import update_noise_std
from fedser.common.records import model_from_config, record_to_arrays
from fedser.common.secagg import TARGET_RANGE, Layout
from fedser.common.slicing import slice_index
from fedser.server.app import FederatedRun
from fedser.server.checkpoint import load_checkpoint
from fedser.server.settings import RunSettings


class SecureDevice:
    """A device that runs the real secure-aggregation stages around an update the test picks:
    ``value`` in every element of its slice and heads, plus the noise its instruction asks for.

    ``fail_at`` names a stage it goes silent at ("setup", "share-keys", "train", "unmask");
    ``bad_share`` makes its unmask reply carry a corrupted share of that node's secret;
    ``decline_train`` makes it decline training with a budget reason; ``garbage`` makes it send
    random words in place of its masked input.
    """

    def __init__(self, node: int, tier: float, heads_mask: int, value: float, fail_at: str = "",
                 bad_share: int | None = None, decline_train: bool = False, garbage: bool = False):
        self.node, self.tier, self.heads_mask, self.value = node, tier, heads_mask, value
        self.fail_at, self.bad_share, self.decline_train = fail_at, bad_share, decline_train
        self.garbage = garbage
        self.state = RecordDict()
        self.padded: dict[str, np.ndarray] | None = None    # what it put into the sum (the test's truth)
        self.bit: float | None = None

    def __call__(self, msg: Message) -> Message | None:
        cfg = msg.content["config"]
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY and keys.SECAGG_STAGE in cfg:
            stage = cfg[keys.SECAGG_STAGE]
            if stage == self.fail_at:
                return None
            reply = secure.handle_stage(cfg, self.state, self.node)
            if stage == "unmask" and self.bad_share is not None:
                nodes, shares = list(reply[keys.SECAGG_NODES]), list(reply[keys.SECAGG_SHARES])
                i = nodes.index(self.bad_share)
                shares[i] = shares[i][:4] + bytes(b ^ 0x5A for b in shares[i][4:])
                reply[keys.SECAGG_SHARES] = shares
            return Message(RecordDict({keys.SECAGG: reply}), reply_to=msg)
        if kind == MessageType.QUERY:
            return Message(RecordDict({"metrics": MetricRecord({"tier": self.tier, "heads": self.heads_mask,
                                                                "num-examples": 10})}), reply_to=msg)
        if kind == MessageType.TRAIN:
            if self.fail_at == "train":
                return None
            if self.decline_train:
                return Message(error=_budget_error(), reply_to=msg)
            return self._train(msg, cfg)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 4, "emotion-n": 4,
                                                            "emotion-accuracy": 0.5, "emotion-uar": 0.5})}),
                       reply_to=msg)

    def _train(self, msg: Message, cfg) -> Message:
        secure.receive_shares(cfg, self.state, self.node)
        model_config, _ = model_from_config(cfg)
        global_model = build_model(model_config)
        std = update_noise_std(cfg["clip-norm"], cfg["noise-multiplier"], cfg["noise-mode"], cfg["expected-clients"])
        rng = np.random.default_rng(self.node)
        sent = {k: (np.full(v.shape, self.value) + rng.normal(0.0, std, v.shape)).astype(np.float32)
                for k, v in msg.content["arrays"].items()}
        self.bit = 1.0 + float(rng.normal(0.0, cfg["clip-count-std"])) if "clip-count-std" in cfg else None
        layout = Layout.of({k: tuple(v.shape) for k, v in global_model.state_dict().items()},
                           trained_entries(global_model, cfg["train-scope"]), self.bit is not None)
        heads = set(keys.mask_to_heads(self.heads_mask))
        self.padded = secure.padded_update(sent, slice_index(model_config, self.tier), layout, heads)
        masked = secure.masked_input(self.state, self.node, layout.flatten(self.padded, self.bit))
        if self.garbage:
            masked = np.random.default_rng(0).integers(0, 2**64, masked.size, dtype=np.uint64)
        metrics = {"num-examples": 10, "heads": self.heads_mask, "tier": self.tier,
                   "model-version": int(cfg["model-version"]), "epsilon": 0.5}
        return Message(RecordDict({"arrays": ArrayRecord({keys.MASKED: Array(masked)}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)


def _budget_error():
    from flwr.app import Error
    return Error(code=keys.DECLINE_BUDGET, reason="declined (privacy budget): epsilon 8 spent")


class Grid:
    """Hands each message to its device; a device that returns None stays silent (a dropout)."""

    def __init__(self, devices: dict[int, SecureDevice]):
        self.devices = devices
        self.received: list[Message] = []

    def get_node_ids(self):
        return list(self.devices)

    def send_and_receive(self, messages, *, timeout=None):
        replies = [self.devices[m.metadata.dst_node_id](m) for m in messages]
        replies = [r for r in replies if r is not None]
        self.received += replies
        return replies


@pytest.fixture(autouse=True)
def identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _config(run_dir: Path, **extra) -> dict:
    return {"run-dir": str(run_dir), "num-server-rounds": 1, "min-clients": 2, "clip-norm": 2.0,
            "noise-multiplier": 1.0, "noise-mode": "distributed", "secure-aggregation": True,
            "evaluate-every": 0, **extra}


def _run(tmp_path: Path, devices: dict[int, SecureDevice], **extra) -> tuple[FederatedRun, Grid, dict]:
    run = FederatedRun(RunSettings.from_run_config(_config(tmp_path / "run", **extra)))
    grid = Grid(devices)
    run.execute(grid)
    [row] = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    return run, grid, row


def _initial_model(run: FederatedRun) -> dict[str, np.ndarray]:
    import torch
    torch.manual_seed(run.s.seed)
    return state_to_arrays(build_model(run.model_config))


def _expected(initial: dict[str, np.ndarray], contributors: list[SecureDevice], run: FederatedRun) -> dict:
    """Per element, the initial value plus the mean of the contributors' padded updates that cover it."""
    out = {}
    for name, value in initial.items():
        if name not in contributors[0].padded:
            out[name] = value
            continue
        total, count = np.zeros(value.shape), np.zeros(value.shape)
        for d in contributors:
            head = head_of(name)
            if head is None or head in keys.mask_to_heads(d.heads_mask):
                total += d.padded[name]
                count[slice_index(run.model_config, d.tier)[name]] += 1
        out[name] = np.where(count > 0, value + total / np.maximum(count, 1), value)
    return out


def _assert_model(run: FederatedRun, expected: dict) -> None:
    got = load_checkpoint(run.run_dir).arrays
    for name, want in expected.items():
        # quantization: a step of 2 * range / 2**24 per device, far below the updates' noise
        np.testing.assert_allclose(got[name], want, atol=1e-4, err_msg=name)


def test_the_server_finds_the_mean_of_the_updates_while_holding_only_masked_inputs(tmp_path, monkeypatch):
    # Prepare: three tiers, three head sets; the per-update path must never run
    devices = {1: SecureDevice(1, 1.0, 3, 0.01), 2: SecureDevice(2, 0.5, 1, -0.02), 3: SecureDevice(3, 0.25, 2, 0.03)}
    monkeypatch.setattr("fedser.server.strategy.aggregate",
                        lambda *a, **k: pytest.fail("an individual update reached the aggregation"))
    # Execute
    run, grid, row = _run(tmp_path, devices)
    # Assert: the model moved by the per-element mean of what the devices put in
    _assert_model(run, _expected(_initial_model(run), list(devices.values()), run))
    assert row["clients-used"] == 3 and row["secagg-aborted"] == "" and row["secagg-threshold"] == 2
    # every training reply the server received is one uint64 vector that looks nothing like its update
    trained = [r for r in grid.received if r.metadata.message_type == MessageType.TRAIN]
    assert len(trained) == 3
    for reply in trained:
        record = reply.content["arrays"]
        assert list(record) == [keys.MASKED] and record[keys.MASKED].dtype == "uint64"
        assert "loss" not in reply.content["metrics"] and "clip-bit" not in reply.content["metrics"]
        masked = record[keys.MASKED].numpy()
        device = devices[reply.metadata.src_node_id]
        layout = run.strategy.layout
        truth = layout.flatten(device.padded, device.bit)
        # uniform over 64-bit words: about half of them in the upper half, no trace of the update
        assert 0.45 < np.mean(masked >= np.uint64(1 << 63)) < 0.55
        assert abs(np.corrcoef(masked.astype(np.float64), truth)[0, 1]) < 0.05
    # the clip bits' sum moved C as the three bits (each about 1) say: C falls below 2
    assert load_checkpoint(run.run_dir).strategy["clip_norm"] < 2.0
    # and the round is accounted with equal weights
    assert math.isfinite(row["round-noise-multiplier"]) and row["user-epsilon"] > 0


def test_a_device_that_drops_out_after_sharing_keys_is_unmasked_from_the_others_shares(tmp_path):
    # Prepare: four devices (t = 3); device 4 shares its keys, then goes silent instead of training
    devices = {n: SecureDevice(n, 1.0, 3, 0.01 * n) for n in (1, 2, 3)}
    devices[4] = SecureDevice(4, 1.0, 3, 0.5, fail_at="train")
    # Execute
    run, _, row = _run(tmp_path, devices)
    # Assert: its pairwise masks were rebuilt from its mask key; the mean is the other three's
    _assert_model(run, _expected(_initial_model(run), [devices[n] for n in (1, 2, 3)], run))
    assert row["clients-used"] == 3 and row["secagg-dropped"] == 1 and row["clients-failed"] == 1


def test_a_device_that_drops_out_after_its_masked_input_still_counts(tmp_path):
    # Prepare: device 4 sends its masked input, then never answers the unmask stage
    devices = {n: SecureDevice(n, 1.0, 3, 0.01 * n) for n in (1, 2, 3)}
    devices[4] = SecureDevice(4, 1.0, 3, 0.04, fail_at="unmask")
    # Execute
    run, _, row = _run(tmp_path, devices)
    # Assert: its self-mask was rebuilt from the other three's shares
    _assert_model(run, _expected(_initial_model(run), list(devices.values()), run))
    assert row["clients-used"] == 4 and row["secagg-aborted"] == ""


def test_a_malformed_share_is_outvoted_by_the_good_ones(tmp_path):
    # Prepare: device 1 sends a corrupted share of device 2's self-mask seed
    devices = {n: SecureDevice(n, 1.0, 3, 0.01 * n, bad_share=2 if n == 1 else None) for n in (1, 2, 3, 4)}
    # Execute
    run, _, row = _run(tmp_path, devices)
    # Assert: device 2's seed was rebuilt from three good shares (its hash refused the others)
    _assert_model(run, _expected(_initial_model(run), list(devices.values()), run))
    assert row["secagg-aborted"] == ""


def test_fewer_survivors_than_the_threshold_abort_the_round_revealing_and_charging_nothing(tmp_path):
    # Prepare: three devices (t = 2); two go silent after sharing keys
    devices = {1: SecureDevice(1, 1.0, 3, 0.01), 2: SecureDevice(2, 1.0, 3, 0.02, fail_at="train"),
               3: SecureDevice(3, 1.0, 3, 0.03, fail_at="train")}
    # Execute
    run, grid, row = _run(tmp_path, devices)
    # Assert: no unmask stage was ever sent, the model is the initial one, the accountant untouched
    assert not [r for r in grid.received if keys.SECAGG in r.content
                and keys.SECAGG_SHARES in r.content[keys.SECAGG]]
    assert "fewer than the threshold 2" in row["secagg-aborted"]
    assert row["clients-used"] == 0 and row["model-version"] == 0 and row["user-epsilon"] == 0.0
    state = load_checkpoint(run.run_dir)
    assert state.accountant["history"] == []
    for name, value in _initial_model(run).items():
        np.testing.assert_array_equal(state.arrays[name], value)


def test_a_budget_exhausted_device_in_the_cohort_is_a_dropout_the_round_survives(tmp_path):
    # Prepare: device 3 has keys and shares but declines to train (its budget is spent)
    devices = {1: SecureDevice(1, 1.0, 3, 0.01), 2: SecureDevice(2, 0.5, 3, 0.02),
               3: SecureDevice(3, 1.0, 3, 0.03, decline_train=True)}
    # Execute
    run, _, row = _run(tmp_path, devices)
    # Assert
    _assert_model(run, _expected(_initial_model(run), [devices[1], devices[2]], run))
    assert row["clients-declined"] == 1 and row["clients-used"] == 2 and row["secagg-dropped"] == 1


def test_a_device_silent_at_setup_is_left_out_of_the_keys(tmp_path):
    # Prepare
    devices = {1: SecureDevice(1, 1.0, 3, 0.01), 2: SecureDevice(2, 1.0, 3, 0.02),
               3: SecureDevice(3, 1.0, 3, 0.03, fail_at="setup")}
    # Execute
    run, _, row = _run(tmp_path, devices)
    # Assert
    _assert_model(run, _expected(_initial_model(run), [devices[1], devices[2]], run))
    assert row["clients-used"] == 2 and row["clients-failed"] == 1


def test_with_neighbourhoods_each_device_masks_with_its_neighbours_and_the_sum_is_exact(tmp_path):
    # Prepare: ten devices, each with 4 neighbours (SecAgg+); one goes silent after sharing keys and
    # one after sending its masked input
    devices = {n: SecureDevice(n, (1.0, 0.5, 0.25)[n % 3], 3, 0.01 * n) for n in range(1, 9)}
    devices[9] = SecureDevice(9, 1.0, 3, 0.5, fail_at="train")
    devices[10] = SecureDevice(10, 1.0, 3, 0.07, fail_at="unmask")
    # Execute
    run, grid, row = _run(tmp_path, devices, **{"secure-aggregation-neighbours": 4, "min-clients": 10})
    # Assert: the mean of the nine that delivered, t a share of the 5-device neighbourhoods
    _assert_model(run, _expected(_initial_model(run), [devices[n] for n in range(1, 9)] + [devices[10]], run))
    assert row["clients-used"] == 9 and row["secagg-dropped"] == 1 and row["secagg-threshold"] == 3
    # each device sent ciphertexts to its 4 neighbours only, and they to it: a symmetric graph
    dsts = {r.metadata.src_node_id: r.content[keys.SECAGG][keys.SECAGG_DSTS] for r in grid.received
            if keys.SECAGG in r.content and keys.SECAGG_DSTS in r.content[keys.SECAGG]}
    assert sorted(dsts) == list(range(1, 11)) and all(len(d) == 4 for d in dsts.values())
    assert all(n in dsts[peer] for n, d in dsts.items() for peer in d)


@pytest.mark.parametrize("extra, message", [
    ({"secure-aggregation-neighbours": 3}, "even number >= 2"),
    ({"aggregation": "trimmed-mean"}, "reveals only their sum"),
    ({"min-clients": 1}, "min-clients >= 2"),
    ({"secure-aggregation-threshold": 0.5}, "above one half"),
])
def test_settings_that_cannot_work_with_secure_aggregation_are_named(tmp_path, extra, message):
    from fedser.common.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config(_config(tmp_path, **extra))


def test_a_masked_input_of_random_words_spoils_the_sum_which_is_refused_but_accounted(tmp_path):
    # Prepare: device 3 sends 64-bit noise instead of its masked input
    devices = {n: SecureDevice(n, 1.0, 3, 0.01, garbage=n == 3) for n in (1, 2, 3)}
    # Execute
    run, _, row = _run(tmp_path, devices)
    # Assert: the sum exceeds what three quantized inputs can reach, so the model stays; the honest
    # devices' noised updates were in the revealed sum, so the round is charged all the same
    state = load_checkpoint(run.run_dir)
    assert row["model-version"] == 0 and row["user-epsilon"] > 0
    assert "outside what quantized inputs can add up to" in state.strategy["rejections"][-1]["reasons"][0]
    for name, value in _initial_model(run).items():
        np.testing.assert_array_equal(state.arrays[name], value)
    assert 3 * TARGET_RANGE < 1 << 64
