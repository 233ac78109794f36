"""The ServerApp round loop (``FederatedRun``) end to end in one process, without a network.

A fake Grid hands every instruction to fedser's real ClientApp (``fedser.client.app.app``),
called as ``app(message, context)`` with each device's node config. Two devices on tiny
synthesized corpora: one RAVDESS-layout emotion folder at width 1.0 and one Speech
Commands-layout keyword folder at width 0.5, with sample-level DP-SGD on. A 2-round run is
checked through the files it leaves, then resumed to 3 rounds.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedser.client.app import app as client_app
from fedser.common.bundle import load_bundle
from fedser.common.models import build_model
from fedser.common.params import state_to_arrays
from fedser.common.privacy import AdaptiveClip, combined_noise_multiplier, update_noise_std
from fedser.common.records import arrays_to_record
from fedser.server.app import FederatedRun
from fedser.server.checkpoint import load_checkpoint, load_initial_model
from fedser.server.settings import RunSettings

SR = 16000
EMOTION_NODE, KWS_NODE = 11, 22


def _tone(path: Path, freq: float, seed: int, seconds: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.03 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), SR, subtype="PCM_16")


def _make_corpora(root: Path) -> tuple[Path, Path]:
    """A RAVDESS-layout emotion folder (8 clips) and a Speech Commands-layout folder (6 clips)."""
    emotion, kws = root / "ravdess", root / "speech_commands"
    for actor in (1, 2):
        for code, freq in (("01", 220.0), ("05", 440.0)):           # neutral, angry
            for rep in (1, 2):
                _tone(emotion / f"Actor_{actor:02d}" / f"03-01-{code}-01-01-{rep:02d}-{actor:02d}.wav",
                      freq + 15 * actor, seed=actor * 100 + rep)
    for word, freq in (("yes", 600.0), ("no", 900.0)):
        for i, speaker in enumerate(("0a7c2a8d", "0b09edd3", "1c1ff4a1")):
            _tone(kws / word / f"{speaker}_nohash_{i}.wav", freq, seed=i)
    return emotion, kws


class InProcessGrid:
    """Grid.get_node_ids / send_and_receive, answered by fedser's ClientApp in this process."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict):
        self.node_configs = node_configs
        self.run_config = run_config
        self.log: list[tuple[str, int, int]] = []       # (message type, node, server round)
        self.replies: list[Message] = []
        self.states: dict[int, RecordDict] = {}          # each node's Context.state, kept as a SuperNode does

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.log.append((m.metadata.message_type, node, int(m.content["config"]["server-round"])))
            context = Context(run_id=1, node_id=node, node_config=self.node_configs[node],
                              state=self.states.setdefault(node, RecordDict()), run_config=self.run_config)
            replies.append(client_app(m, context))
        self.replies += replies
        return replies


def _ledger_rounds(path: Path) -> list[int]:
    return sorted(e["round"] for e in json.loads(path.read_text())["entries"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run 2 rounds, snapshot the run directory and ledgers, then resume the same run to 3 rounds."""
    root = tmp_path_factory.mktemp("loop")
    emotion, kws = _make_corpora(root / "data")
    run_dir = root / "run"
    nodes = {
        EMOTION_NODE: {"data": str(emotion), "tier": 1.0, "ledger": str(root / "ledger-11.json"),
                       "cache": str(root / "cache"), "holdout": 0.25, "max-epsilon": 1000.0},
        KWS_NODE: {"data": str(kws), "tier": 0.5, "ledger": str(root / "ledger-22.json"),
                   "cache": str(root / "cache"), "holdout": 0.25, "max-epsilon": 1000.0},
    }
    # batch size above every device's data: one DP-SGD step per epoch at sample rate 1,
    # which keeps the accounting fast; the DP-SGD noise is the server's floor.
    run_config = {"run-dir": str(run_dir), "num-server-rounds": 2, "min-clients": 2, "batch-size": 64,
                  "local-epochs": 1, "dp": True, "dp-noise-multiplier": 1.0, "clip-norm": 2.0,
                  "noise-multiplier": 1.0, "noise-mode": "distributed", "seed": 0}
    with pytest.MonkeyPatch.context() as mp:
        # Messages built outside a running ServerApp need the identity Flower's runtime sets.
        mp.setattr(TaskIdentity, "_run_id", 1)
        mp.setattr(TaskIdentity, "_node_id", 0)
        mp.setattr(TaskIdentity, "_task_id", 1)

        first_grid = InProcessGrid(nodes, run_config)
        FederatedRun(RunSettings.from_run_config(run_config)).execute(first_grid)
        first_dir = root / "after-2-rounds"
        shutil.copytree(run_dir, first_dir)
        first_ledgers = {n: _ledger_rounds(Path(c["ledger"])) for n, c in nodes.items()}

        resumed_config = {**run_config, "num-server-rounds": 3, "resume": True}
        second_grid = InProcessGrid(nodes, resumed_config)
        FederatedRun(RunSettings.from_run_config(resumed_config)).execute(second_grid)
        second_ledgers = {n: _ledger_rounds(Path(c["ledger"])) for n, c in nodes.items()}
    return {"first_dir": first_dir, "run_dir": run_dir, "first_grid": first_grid, "second_grid": second_grid,
            "first_ledgers": first_ledgers, "second_ledgers": second_ledgers}


def _rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


# ---------------------------------------------------------------- the 2-round run


def test_a_run_leaves_checkpoint_metrics_plots_and_the_model_bundle(runs):
    # Prepare
    d = runs["first_dir"]
    # Assert
    for name in ("checkpoint.pt", "metrics.csv", "metrics.json", "accuracy.png", "privacy_and_traffic.png",
                 "model.fedser", "progress.log"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    for png in ("accuracy.png", "privacy_and_traffic.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(d.glob(".checkpoint-*")) and not list(d.glob(".bundle-*"))


def test_each_round_has_a_row_with_privacy_traffic_and_participation(runs):
    # Prepare
    rows = _rows(runs["first_dir"])
    # Assert
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["clients-sampled"] == 2 and r["clients-used"] == 2
        assert r["clients-rejected"] == 0 and r["clients-declined"] == 0 and r["clients-failed"] == 0
        assert r["bytes-sent"] > 0 and r["bytes-received"] > 0
        assert 0 < r["user-epsilon"] < math.inf and r["user-delta"] == 1e-5
        assert r["max-device-epsilon"] > 0
        # the KWS head is trained by one of two devices: its share carries 1/sqrt(2) of the update's
        # noise (raised by adaptive clipping, the default), composed with the noise on the clip bits
        assert r["round-noise-multiplier"] == pytest.approx(combined_noise_multiplier(
            AdaptiveClip.update_noise(1.0, 2) / math.sqrt(2), AdaptiveClip.count_noise(1.0, 2)))
    assert rows[1]["user-epsilon"] > rows[0]["user-epsilon"]          # privacy spent accumulates
    assert [r["model-version"] for r in rows] == [1, 2]
    assert [r["kws-head-version"] for r in rows] == [1, 2]
    # the emotion device receives the full model, the KWS device its half-width slice
    assert rows[0]["bytes-sent"] > rows[0]["bytes-received"]


def test_the_csv_holds_the_same_rounds_as_the_json(runs):
    # Prepare
    with open(runs["first_dir"] / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    rows = _rows(runs["first_dir"])
    # Assert
    assert [int(r["round"]) for r in table] == [1, 2]
    assert [float(r["user-epsilon"]) for r in table] == pytest.approx([r["user-epsilon"] for r in rows])
    assert [int(r["bytes-sent"]) for r in table] == [r["bytes-sent"] for r in rows]


def test_the_bundle_is_the_checkpointed_global_model(runs):
    # Prepare
    d = runs["first_dir"]
    # Execute
    bundle = load_bundle(d)
    model = bundle.build_model()
    state = load_checkpoint(d)
    # Assert
    assert state.round == 2
    assert bundle.meta["mode"] == "federated" and bundle.meta["rounds"] == 2
    assert bundle.meta["model_version"] == 2 and bundle.meta["kws_head_version"] == 2
    assert bundle.meta["privacy"]["user_level"]["epsilon"] == pytest.approx(_rows(d)[-1]["user-epsilon"])
    assert set(bundle.tasks) == {"emotion", "kws"}
    built = state_to_arrays(model)
    for k, a in state.arrays.items():
        np.testing.assert_array_equal(built[k], a)
    # and it is not the untrained model
    initial = state_to_arrays(build_model(bundle.model_config))
    assert any(not np.array_equal(built[k], initial[k]) for k in initial)
    # The model the devices started from is recorded beside it, for audits, and differs from it.
    start = load_initial_model(d)
    assert set(start) == set(built)
    assert any(not np.array_equal(built[k], start[k]) for k in start)


def test_only_model_arrays_and_scalar_metrics_cross_the_wire(runs):
    # Prepare
    grid = runs["first_grid"]
    names = set(load_checkpoint(runs["first_dir"]).arrays)
    # Assert: every reply carries named model arrays and scalar metrics, nothing else
    assert grid.replies
    for reply in grid.replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        for key, record in reply.content.items():
            if isinstance(record, ArrayRecord):
                assert key == "arrays" and set(record) <= names
            else:
                assert isinstance(record, MetricRecord), (key, type(record))
                assert all(isinstance(v, (int, float)) for v in record.values())
    assert not any(isinstance(r, ConfigRecord) for reply in grid.replies for r in reply.content.values())


def test_the_first_run_profiles_each_device_once_then_trains_and_evaluates_every_round(runs):
    # Prepare
    log = runs["first_grid"].log
    # Assert
    queries = [(n, r) for kind, n, r in log if kind == MessageType.QUERY]
    assert sorted(queries) == [(EMOTION_NODE, 1), (KWS_NODE, 1)]
    for rnd in (1, 2):
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            assert sorted(n for k, n, r in log if k == kind and r == rnd) == [EMOTION_NODE, KWS_NODE]


# ---------------------------------------------------------------- the resumed run


def test_resume_continues_at_the_next_round_only(runs):
    # Prepare
    log = runs["second_grid"].log
    # Assert: round 3 and nothing else went to the devices; profiles came from the checkpoint
    assert {r for _, _, r in log} == {3}
    assert not any(kind == MessageType.QUERY for kind, _, _ in log)
    assert sorted((k, n) for k, n, _ in log) == sorted(
        [(MessageType.TRAIN, EMOTION_NODE), (MessageType.TRAIN, KWS_NODE),
         (MessageType.EVALUATE, EMOTION_NODE), (MessageType.EVALUATE, KWS_NODE)])


def test_resume_appends_round_three_once_and_keeps_the_earlier_rows(runs):
    # Prepare
    before, after = _rows(runs["first_dir"]), _rows(runs["run_dir"])
    with open(runs["run_dir"] / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    # Assert
    assert [r["round"] for r in after] == [1, 2, 3]
    assert [int(r["round"]) for r in table] == [1, 2, 3]
    assert after[:2] == before
    assert after[2]["model-version"] == 3 and after[2]["user-epsilon"] > after[1]["user-epsilon"]
    summary = json.loads((runs["run_dir"] / "metrics.json").read_text())["summary"]
    assert summary["rounds"] == 3
    assert "resuming after round 2" in (runs["run_dir"] / "progress.log").read_text()


def test_resume_counts_each_round_once_in_the_server_and_device_accounts(runs):
    # Prepare
    state = load_checkpoint(runs["run_dir"])
    # Assert: the user-level accountant composed exactly 3 rounds
    assert state.round == 3
    assert sum(h["steps"] for h in state.accountant["history"]) == 3
    # every device ledger holds rounds 1 and 2 after the first run, and round 3 once after the resume
    for node in (EMOTION_NODE, KWS_NODE):
        assert runs["first_ledgers"][node] == [1, 2]
        assert runs["second_ledgers"][node] == [1, 2, 3]
    bundle = load_bundle(runs["run_dir"])
    assert bundle.meta["rounds"] == 3 and bundle.meta["model_version"] == 3


# ---------------------------------------------------------------- the loop with scripted devices (fast)


class ScriptedDevice:
    """Answers like a device without training: its update is a small constant in every element sent,
    plus the user-level noise the instruction asks for."""

    def __init__(self, tier: float, heads_mask: int, value: float = 1e-4):
        self.tier, self.heads_mask, self.value = tier, heads_mask, value

    def __call__(self, msg: Message) -> Message:
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return Message(RecordDict({"metrics": MetricRecord({"tier": self.tier, "heads": self.heads_mask,
                                                                "num-examples": 10})}), reply_to=msg)
        if kind == MessageType.TRAIN:
            cfg = msg.content["config"]
            std = update_noise_std(cfg["clip-norm"], cfg["noise-multiplier"], cfg["noise-mode"],
                                   cfg["expected-clients"])
            rng = np.random.default_rng(int(cfg["model-version"]))
            arrays = {k: (np.full(v.shape, self.value) + rng.normal(0.0, std, v.shape)).astype(np.float32)
                      for k, v in msg.content["arrays"].items()}
            metrics = {"num-examples": 10, "heads": self.heads_mask, "tier": self.tier,
                       "model-version": int(cfg["model-version"]), "loss": 1.0, "epsilon": 0.5}
            if "clip-count-std" in cfg:   # adaptive clipping: the update is far inside C
                metrics["clip-bit"] = 1.0 + float(rng.normal(0.0, cfg["clip-count-std"]))
            return Message(RecordDict({"arrays": arrays_to_record(arrays), "metrics": MetricRecord(metrics)}),
                           reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 4, "emotion-n": 4,
                                                            "emotion-accuracy": 0.5, "emotion-uar": 0.5})}),
                       reply_to=msg)


class Killed(Exception):
    """Stands for the server process dying."""


class ScriptedGrid:
    def __init__(self, devices: dict, kill_at_round: int | None = None):
        self.devices, self.kill_at_round = devices, kill_at_round
        self.log: list[tuple[str, int, int]] = []

    def get_node_ids(self):
        return list(self.devices)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            rnd = int(m.content["config"]["server-round"])
            if rnd == self.kill_at_round and m.metadata.message_type == MessageType.TRAIN:
                raise Killed(f"killed in round {rnd}")
            self.log.append((m.metadata.message_type, m.metadata.dst_node_id, rnd))
            replies.append(self.devices[m.metadata.dst_node_id](m))
        return replies


@pytest.fixture
def identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _scripted_config(run_dir: Path, **extra) -> dict:
    return {"run-dir": str(run_dir), "num-server-rounds": 2, "min-clients": 2, "clip-norm": 2.0,
            "noise-multiplier": 1.0, "noise-mode": "distributed", **extra}


def test_a_server_killed_mid_round_resumes_from_the_last_complete_round(tmp_path, identity):
    # Prepare: the server dies while sending round 2's training instructions
    devices = {1: ScriptedDevice(1.0, 3), 2: ScriptedDevice(0.25, 1)}
    config = _scripted_config(tmp_path / "run")
    with pytest.raises(Killed):
        FederatedRun(RunSettings.from_run_config(config)).execute(ScriptedGrid(devices, kill_at_round=2))
    assert load_checkpoint(tmp_path / "run").round == 1
    assert not (tmp_path / "run" / "model.fedser").exists()
    # Execute
    grid = ScriptedGrid(devices)
    FederatedRun(RunSettings.from_run_config({**config, "resume": True})).execute(grid)
    # Assert
    assert {r for _, _, r in grid.log} == {2}
    state = load_checkpoint(tmp_path / "run")
    assert state.round == 2 and [r["round"] for r in state.rows] == [1, 2]
    assert [r["round"] for r in _rows(tmp_path / "run")] == [1, 2]
    assert sum(h["steps"] for h in state.accountant["history"]) == 2
    assert load_bundle(tmp_path / "run").meta["model_version"] == 2


@pytest.mark.parametrize("every, evaluated", [(1, [1, 2, 3, 4]), (2, [2, 4]), (3, [3, 4]), (0, [4])])
def test_devices_evaluate_every_n_rounds_and_after_the_last(tmp_path, identity, every, evaluated):
    devices = {1: ScriptedDevice(1.0, 3), 2: ScriptedDevice(0.5, 2)}
    grid = ScriptedGrid(devices)
    config = _scripted_config(tmp_path / "run", **{"num-server-rounds": 4, "evaluate-every": every})
    FederatedRun(RunSettings.from_run_config(config)).execute(grid)
    asked = sorted({r for kind, _, r in grid.log if kind == MessageType.EVALUATE})
    assert asked == evaluated
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]   # every round still trains and is reported
    assert [r["round"] for r in rows if r.get("emotion-accuracy") not in (None, "")] == evaluated


def test_resume_without_a_checkpoint_starts_at_round_one(tmp_path, identity):
    # Prepare
    devices = {1: ScriptedDevice(1.0, 3), 2: ScriptedDevice(0.5, 2)}
    grid = ScriptedGrid(devices)
    # Execute
    FederatedRun(RunSettings.from_run_config(_scripted_config(tmp_path, resume=True))).execute(grid)
    # Assert
    assert [r["round"] for r in _rows(tmp_path)] == [1, 2]
    assert {r for _, _, r in grid.log} == {1, 2}
    assert "no checkpoint yet" in (tmp_path / "progress.log").read_text()


def test_a_round_without_a_valid_update_keeps_the_model_and_spends_no_user_privacy(tmp_path, identity):
    # Prepare: both devices send NaN updates
    devices = {1: ScriptedDevice(1.0, 3, value=float("nan")), 2: ScriptedDevice(0.5, 1, value=float("nan"))}
    config = _scripted_config(tmp_path, **{"num-server-rounds": 1})
    run = FederatedRun(RunSettings.from_run_config(config))
    # Execute
    run.execute(ScriptedGrid(devices))
    # Assert
    [row] = _rows(tmp_path)
    assert row["clients-used"] == 0 and row["clients-rejected"] == 2
    assert row["model-version"] == 0 and row["user-epsilon"] == 0.0
    assert row["round-noise-multiplier"] == "inf"          # nothing released (JSON has no infinity)
    state = load_checkpoint(tmp_path)
    assert state.accountant["history"] == []
    assert len(state.strategy["rejections"]) == 2
    torch.manual_seed(0)   # the run's seed: the initial model again
    initial = state_to_arrays(build_model(run.model_config))
    shipped = load_bundle(tmp_path).state
    for k, a in initial.items():
        np.testing.assert_array_equal(state.arrays[k], a)
        np.testing.assert_array_equal(shipped[k], a)
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"]["rejections"] == 2


def test_no_user_level_noise_is_reported_as_an_infinite_epsilon(tmp_path, identity):
    # Prepare
    devices = {1: ScriptedDevice(1.0, 3), 2: ScriptedDevice(1.0, 1)}
    config = _scripted_config(tmp_path, **{"num-server-rounds": 1, "noise-mode": "none"})
    # Execute
    FederatedRun(RunSettings.from_run_config(config)).execute(ScriptedGrid(devices))
    # Assert
    [row] = _rows(tmp_path)
    assert row["clients-used"] == 2 and row["user-epsilon"] == "inf"
    summary = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    assert summary["user-epsilon"] == "inf" and "no user-level" in summary["user-note"]
    assert row["emotion-accuracy"] == 0.5 and row["emotion-n"] == 8


# ---------------------------------------------------------------- public pretraining, head-only rounds


def test_public_pretraining_then_head_only_rounds_never_move_the_encoder(tmp_path):
    # Prepare: the server has public speech with both labels; devices train the heads alone under DP,
    # with distributed user-level noise on.
    emotion, kws = _make_corpora(tmp_path / "data")
    public_emotion, public_kws = _make_corpora(tmp_path / "public")
    nodes = {
        EMOTION_NODE: {"data": str(emotion), "tier": 1.0, "ledger": str(tmp_path / "ledger-11.json"),
                       "cache": "none", "holdout": 0.25, "max-epsilon": 1000.0},
        KWS_NODE: {"data": str(kws), "tier": 0.5, "ledger": str(tmp_path / "ledger-22.json"),
                   "cache": "none", "holdout": 0.25, "max-epsilon": 1000.0},
    }
    run_config = {"run-dir": str(tmp_path / "run"), "num-server-rounds": 1, "min-clients": 2, "batch-size": 64,
                  "local-epochs": 1, "dp": True, "dp-noise-multiplier": 1.0, "noise-mode": "distributed",
                  "public-corpus": str(public_emotion), "kws-corpus": str(public_kws), "kws-pretrain-epochs": 2,
                  "train-scope": "heads", "seed": 0}
    torch.manual_seed(0)
    untrained = state_to_arrays(build_model(FederatedRun(RunSettings.from_run_config(run_config)).model_config))

    # Execute: one round, then resume for a second.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskIdentity, "_run_id", 1)
        mp.setattr(TaskIdentity, "_node_id", 0)
        mp.setattr(TaskIdentity, "_task_id", 1)
        FederatedRun(RunSettings.from_run_config(run_config)).execute(InProcessGrid(nodes, run_config))
        after_one = load_checkpoint(tmp_path / "run").arrays
        resumed = {**run_config, "num-server-rounds": 2, "resume": True}
        FederatedRun(RunSettings.from_run_config(resumed)).execute(InProcessGrid(nodes, resumed))
    after_two = load_checkpoint(tmp_path / "run").arrays

    # Assert: pretraining moved the encoder; the rounds moved the heads and never the encoder.
    encoder = [k for k in after_two if not k.startswith("heads.")]
    heads = [k for k in after_two if k.startswith("heads.")]
    assert any(not np.array_equal(after_one[k], untrained[k]) for k in encoder)
    assert all(np.array_equal(after_two[k], after_one[k]) for k in encoder)
    assert any(not np.array_equal(after_two[k], after_one[k]) for k in heads)
    progress = (tmp_path / "run" / "progress.log").read_text()
    assert "pretraining on public speech" in progress and "pretrained emotion: " in progress and "; kws: " in progress
    assert load_bundle(tmp_path / "run").meta["corpus"]["public_pretraining"] == str(public_emotion)


# ---------------------------------------------------------------- adaptive clipping, real ClientApp


def _two_devices(tmp_path: Path) -> dict[int, dict]:
    """Node configs of the two synthesized devices: emotion at width 1.0, keywords at 0.5."""
    emotion, kws = _make_corpora(tmp_path / "data")
    return {EMOTION_NODE: {"data": str(emotion), "tier": 1.0, "ledger": str(tmp_path / "l11.json"),
                            "cache": str(tmp_path / "cache"), "holdout": 0.25, "max-epsilon": 1000.0},
             KWS_NODE: {"data": str(kws), "tier": 0.5, "ledger": str(tmp_path / "l22.json"),
                        "cache": str(tmp_path / "cache"), "holdout": 0.25, "max-epsilon": 1000.0}}


def test_adaptive_clipping_through_the_real_client_app_moves_c_and_keeps_the_accounted_z(tmp_path, identity):
    from fedser.common import keys
    from fedser.common.privacy import UserLevelAccountant

    # Prepare: the two synthesized devices (one DP-SGD step an epoch), C adapting to the median update norm
    nodes = _two_devices(tmp_path)
    config = _scripted_config(tmp_path / "run", **{"num-server-rounds": 2, "dp": True, "dp-noise-multiplier": 1.0,
                                                   "batch-size": 64, "clip-quantile": 0.5, "evaluate-every": 0})
    grid = InProcessGrid(nodes, config)
    # Execute
    FederatedRun(RunSettings.from_run_config(config)).execute(grid)
    # Assert: every training reply carried its noised bit and nothing else about its norm
    trained = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    assert len(trained) == 4 and not any(r.has_error() for r in trained)
    for reply in trained:
        metrics = reply.content[keys.METRICS]
        assert keys.CLIP_BIT in metrics and "update-norm" not in metrics
    rows = _rows(tmp_path / "run")
    assert [r["clients-used"] for r in rows] == [2, 2] and all(r["clients-rejected"] == 0 for r in rows)
    # C moved from the configured 2.0 after round 1
    assert rows[0]["clip-norm"] == 2.0 and rows[1]["clip-norm"] != 2.0
    # Accounted: each head has one contributor, so its elements carry z_u*C/sqrt(2) (distributed, m = 2),
    # and the count of bits its noise (std max(m/20, z) = 1 on the sum); together one Gaussian mechanism.
    z_u = AdaptiveClip.update_noise(1.0, 2)
    want = combined_noise_multiplier(z_u / math.sqrt(2), AdaptiveClip.count_noise(1.0, 2))
    assert [r["round-noise-multiplier"] for r in rows] == pytest.approx([want, want])
    accountant = UserLevelAccountant(1.0, 2, 2)
    accountant.step(2, noise_multiplier=want)
    assert rows[-1]["user-epsilon"] == pytest.approx(accountant.epsilon(1e-5))


# ---------------------------------------------------------------- secure aggregation, real ClientApp


def test_secure_aggregation_through_the_real_client_app_trains_on_sums_alone(tmp_path, identity):
    from fedser.common import keys

    # Prepare: the two synthesized devices, distributed noise, the server sees only the sum
    nodes = _two_devices(tmp_path)
    config = _scripted_config(tmp_path / "run", **{"num-server-rounds": 2, "dp": True, "dp-noise-multiplier": 1.0,
                                                   "batch-size": 64, "evaluate-every": 0,
                                                   "secure-aggregation": True})
    grid = InProcessGrid(nodes, config)
    # Execute
    FederatedRun(RunSettings.from_run_config(config)).execute(grid)
    # Assert: each round took setup, share-keys, train and unmask from both devices, none declined
    assert not any(r.has_error() for r in grid.replies)
    trained = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    assert len(trained) == 4
    for reply in trained:   # one masked word vector; no loss, no clip bit, no float array
        assert list(reply.content["arrays"]) == [keys.MASKED]
        assert reply.content["arrays"][keys.MASKED].dtype == "uint64"
        assert not {"loss", "clip-bit"} & set(reply.content["metrics"])
    assert sum(keys.SECAGG in r.content for r in grid.replies) == 2 * 3 * 2
    rows = _rows(tmp_path / "run")
    assert [r["clients-used"] for r in rows] == [2, 2] and [r["model-version"] for r in rows] == [1, 2]
    assert all(r["secagg-aborted"] == "" for r in rows) and rows[1]["clip-norm"] != 2.0
    # the device state holds no secret once a round is over
    assert all("fedser-secagg" not in state for state in grid.states.values())
