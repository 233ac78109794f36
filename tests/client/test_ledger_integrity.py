"""The ledger cannot under-count: concurrent agents, deleted and edited ledgers, moved data folders.

Each test's fedser home (and so its device identity) is its own (``tests/client/conftest.py``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import stat
import threading
from collections import Counter
from pathlib import Path

import pytest

from fedser.client import cli
from fedser.client.device import DeviceSettings
from fedser.client.ledger import (
    IDENTITY_FILE, RESET_LOG, DeviceIdentity, LedgerCorruptError, LedgerMissingError, PrivacyLedger,
)
from fedser.common.privacy import SpendRecord, epsilon_of

DELTA = 1e-5
SPEND = SpendRecord(1.0, 0.01, 1000)  # epsilon ~2.10 at DELTA
TINY = SpendRecord(1.0, 0.1, 10)     # what plan_round gives 100 examples, batch 10, 1 epoch, floor 1


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    return tmp_path / "device" / "ledger.json"


def _backup(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def _two_rounds(path: Path) -> float:
    ledger = PrivacyLedger(path, 8.0, DELTA)
    ledger.record(SPEND, round=1, model_version="v1")
    ledger.record(SPEND, round=2, model_version="v2")
    return epsilon_of([SPEND, SPEND], DELTA)


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


# -- two agents on one ledger -----------------------------------------------------------------


def _agent(path: str, home: str, tag: str, n: int, start, planned: bool) -> None:
    """One device agent (a real process): ``n`` rounds, each one round_lock or a bare record."""
    ledger = PrivacyLedger(path, max_epsilon=1e9, delta=DELTA, home=home)
    start.wait(120)
    for i in range(n):
        if planned:
            # What the ClientApp does: read, decide, record, with no other process in between.
            with ledger.round_lock():
                seen = ledger.rounds_joined
                plan = ledger.plan_round([100], batch_size=10, epochs=1, rounds_left=1, floor=1.0)
                ledger.record(plan.spend[0], round=seen, model_version=tag)
        else:
            ledger.record(TINY, round=i, model_version=tag)


@pytest.mark.parametrize("planned", [False, True], ids=["record", "round_lock"])
def test_two_agents_recording_40_rounds_each_keep_all_80(ledger_path, fedser_home, planned):
    # Prepare: two processes that start together on one ledger of a device with no identity yet
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    agents = [ctx.Process(target=_agent, args=(str(ledger_path), str(fedser_home), tag, 40, start, planned))
              for tag in ("a", "b")]
    for p in agents:
        p.start()
    # Execute
    start.set()
    for p in agents:
        p.join(300)
    # Assert: every record kept, one identity made, and under round_lock each round saw all before it
    assert [p.exitcode for p in agents] == [0, 0]
    ledger = PrivacyLedger(ledger_path, 1e9, DELTA)
    assert ledger.rounds_joined == 80
    assert Counter(e.model_version for e in ledger.entries) == {"a": 40, "b": 40}
    assert ledger.epsilon() == pytest.approx(epsilon_of([TINY] * 80, DELTA))
    assert DeviceIdentity.load(fedser_home).has_ledgered(ledger_path)
    if planned:
        assert [e.round for e in ledger.entries] == list(range(80))


def test_round_lock_is_reentrant_for_its_holder_and_makes_other_threads_wait(ledger_path):
    # Prepare
    holder = PrivacyLedger(ledger_path, 8.0, DELTA)
    other = PrivacyLedger(ledger_path, 8.0, DELTA)
    recorded = threading.Event()
    thread = threading.Thread(target=lambda: (other.record(SPEND, round=2, model_version="b"), recorded.set()))
    # Execute
    with holder.round_lock():
        thread.start()
        waited = not recorded.wait(0.5)
        holder.record(SPEND, round=1, model_version="a")   # the holder passes its own lock
    thread.join(30)
    # Assert: the other thread recorded only after the round, on top of it
    assert waited and recorded.is_set()
    assert [e.round for e in PrivacyLedger(ledger_path, 8.0, DELTA).entries] == [1, 2]


# -- the device identity ----------------------------------------------------------------------


def test_identity_is_made_once_private_and_signs_the_ledger(ledger_path, fedser_home):
    # Execute
    _two_rounds(ledger_path)
    identity = DeviceIdentity.load(fedser_home)
    state = json.loads(ledger_path.read_text())
    # Assert
    assert stat.S_IMODE((fedser_home / IDENTITY_FILE).stat().st_mode) == 0o600
    assert state["version"] == 2 and state["device_id"] == identity.device_id
    assert identity.has_ledgered(ledger_path)
    assert PrivacyLedger(ledger_path, 8.0, DELTA).verified is True
    assert DeviceIdentity.load_or_create(fedser_home) == identity


def test_a_ledger_of_another_device_is_refused(ledger_path, tmp_path):
    # Prepare: the ledger was signed by the device of another fedser home
    _two_rounds(ledger_path)
    # Execute / Assert
    with pytest.raises(LedgerCorruptError, match="signed by device"):
        PrivacyLedger(ledger_path, 8.0, DELTA, home=tmp_path / "another home")


def test_a_ledger_whose_identity_was_deleted_is_refused(ledger_path, fedser_home):
    # Prepare: deleting the identity must not be a way to a fresh budget
    _two_rounds(ledger_path)
    (fedser_home / IDENTITY_FILE).unlink()
    # Execute / Assert
    with pytest.raises(LedgerCorruptError) as err:
        PrivacyLedger(ledger_path, 8.0, DELTA)
    assert str(fedser_home / IDENTITY_FILE) in str(err.value) and "restore" in str(err.value)


# -- deleted ledgers --------------------------------------------------------------------------


def test_deleted_ledger_and_backup_of_a_known_device_are_refused(ledger_path):
    # Prepare
    _two_rounds(ledger_path)
    ledger_path.unlink()
    _backup(ledger_path).unlink()
    # Execute
    with pytest.raises(LedgerMissingError) as err:
        PrivacyLedger(ledger_path, 8.0, DELTA)
    # Assert: names the files, refuses to reset, says how to restore or start over knowingly
    msg = str(err.value)
    assert str(ledger_path) in msg and str(_backup(ledger_path)) in msg and "zero spend" in msg
    assert "Restore" in msg and f"fedser-client ledger reset --yes --ledger {ledger_path}" in msg


def test_ledger_reset_yes_starts_a_deleted_ledger_over_and_logs_it(ledger_path, fedser_home, capsys):
    # Prepare
    _two_rounds(ledger_path)
    ledger_path.unlink()
    _backup(ledger_path).unlink()
    # Execute: without --yes nothing happens; with it the device starts over
    refused = cli.main(["ledger", "reset", "--ledger", str(ledger_path)])
    still_missing = pytest.raises(LedgerMissingError, PrivacyLedger, ledger_path, 8.0, DELTA)
    capsys.readouterr()
    code = cli.main(["ledger", "reset", "--yes", "--ledger", str(ledger_path), "--reason", "disk replaced"])
    out = capsys.readouterr().out
    ledger = PrivacyLedger(ledger_path, 8.0, DELTA)
    ledger.record(SPEND, round=3, model_version="v3")
    # Assert: refused, then reset, printed and logged in the fedser home
    assert refused == 2 and still_missing
    assert code == 0 and "reset" in out and str(fedser_home / RESET_LOG) in out
    (line,) = (fedser_home / RESET_LOG).read_text().splitlines()
    logged = json.loads(line)
    assert logged["ledger"] == str(ledger_path) and logged["found"] == "missing"
    assert logged["reason"] == "disk replaced" and logged["device_id"] == DeviceIdentity.load(fedser_home).device_id
    assert PrivacyLedger(ledger_path, 8.0, DELTA).epsilon() == pytest.approx(epsilon_of([SPEND], DELTA))


def test_ledger_reset_moves_an_existing_ledger_aside(ledger_path, fedser_home):
    # Prepare
    _two_rounds(ledger_path)
    # Execute
    assert cli.main(["ledger", "reset", "--yes", "--ledger", str(ledger_path)]) == 0
    # Assert: nothing deleted, the new ledger is empty, the log says what was there
    aside = sorted(p.name for p in ledger_path.parent.iterdir())
    assert len(aside) == 2 and all(".reset-" in name for name in aside)
    assert PrivacyLedger(ledger_path, 8.0, DELTA).rounds_joined == 0
    assert json.loads((fedser_home / RESET_LOG).read_text())["found"] == "2 entries, 2000 DP-SGD steps"


# -- edited ledgers ---------------------------------------------------------------------------


def _edit(path: Path, how: str) -> None:
    """What someone lowering the recorded spend would try."""
    state = json.loads(path.read_text())
    state["entries"][0]["noise_multiplier"] = 50.0
    plain = hashlib.sha256(_canonical(state["entries"])).hexdigest()
    if how == "sha256-recomputed":
        state["sha256"] = plain
        state["hmac"] = hashlib.sha256(_canonical({k: state[k] for k in ("format", "version", "device_id",
                                                                          "entries")})).hexdigest()
    elif how == "key-deleted":
        state["sha256"] = plain
        del state["hmac"]
    elif how == "downgraded-to-v1":
        state = {"format": state["format"], "version": 1, "sha256": plain, "entries": state["entries"]}
    path.write_text(json.dumps(state))


EDITS = ["sha256-recomputed", "key-deleted", "downgraded-to-v1"]


@pytest.mark.parametrize("how", EDITS)
def test_edited_ledger_fails_its_hmac_and_the_backup_is_used(ledger_path, caplog, how):
    # Prepare
    spent = _two_rounds(ledger_path)
    _edit(ledger_path, how)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedser.client.ledger"):
        ledger = PrivacyLedger(ledger_path, 8.0, DELTA)
    # Assert: the noise 50 never counts
    assert ledger.epsilon() == pytest.approx(spent)
    assert str(ledger_path) in caplog.text and "unreadable" in caplog.text
    assert {"sha256-recomputed": "HMAC-SHA256", "key-deleted": "'hmac' is missing",
            "downgraded-to-v1": "never rewritten as version 1"}[how] in caplog.text


@pytest.mark.parametrize("how", EDITS)
def test_edited_ledger_and_backup_are_refused_as_corrupt(ledger_path, how):
    # Prepare
    _two_rounds(ledger_path)
    _edit(ledger_path, how)
    _edit(_backup(ledger_path), how)
    # Execute / Assert
    with pytest.raises(LedgerCorruptError, match="cannot be read"):
        PrivacyLedger(ledger_path, 8.0, DELTA)


# -- version-1 ledgers ------------------------------------------------------------------------


def _v1(path: Path, spends: list[SpendRecord], checksum: bool = True) -> None:
    entries = [{**s.to_dict(), "round": i, "model_version": i, "timestamp": 1.0} for i, s in enumerate(spends)]
    state = {"format": "fedser-privacy-ledger", "version": 1, "entries": entries}
    if checksum:
        state["sha256"] = hashlib.sha256(_canonical(entries)).hexdigest()
    for p in (path, _backup(path)):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(state))


def test_a_valid_version_1_ledger_is_migrated_once_and_signed(ledger_path, fedser_home, caplog):
    # Prepare
    _v1(ledger_path, [SPEND, SPEND])
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedser.client.ledger"):
        ledger = PrivacyLedger(ledger_path, 8.0, DELTA)
    # Assert: same spend, both copies rewritten as signed version 2, the migration logged
    assert ledger.epsilon() == pytest.approx(epsilon_of([SPEND, SPEND], DELTA)) and ledger.verified
    for p in (ledger_path, _backup(ledger_path)):
        state = json.loads(p.read_text())
        assert state["version"] == 2 and state["device_id"] == DeviceIdentity.load(fedser_home).device_id
    assert "migrated" in caplog.text and str(ledger_path) in caplog.text


def test_a_version_1_ledger_without_its_checksum_is_refused(ledger_path):
    _v1(ledger_path, [SPEND], checksum=False)
    with pytest.raises(LedgerCorruptError, match="version-1"):
        PrivacyLedger(ledger_path, 8.0, DELTA)


# -- where the ledger lives -------------------------------------------------------------------


def test_the_ledger_path_does_not_change_when_the_data_folder_moves(tmp_path, fedser_home):
    # Prepare: a device that has trained on its data folder
    data = tmp_path / "recordings"
    data.mkdir()
    before = DeviceSettings.from_node_config({"data": str(data)}).ledger
    PrivacyLedger(before, 8.0, DELTA).record(SPEND, round=1, model_version=1)
    # Execute
    (tmp_path / "moved").mkdir()
    moved = data.rename(tmp_path / "moved" / "recordings")
    after = DeviceSettings.from_node_config({"data": str(moved)}).ledger
    # Assert: the same ledger, named by the device, with its spend
    assert after == before == str(DeviceIdentity.load(fedser_home).default_ledger)
    assert PrivacyLedger(after, 8.0, DELTA).epsilon() == pytest.approx(epsilon_of([SPEND], DELTA))


def test_an_explicit_ledger_and_a_simulated_devices_ledger_keep_their_paths(tmp_path):
    explicit = DeviceSettings.from_node_config({"data": str(tmp_path), "ledger": str(tmp_path / "l.json")})
    simulated = DeviceSettings.from_node_config({"partition-id": 4}, {"partitions-dir": str(tmp_path / "parts"),
                                                                     "run-dir": str(tmp_path / "run")})
    assert explicit.ledger == str(tmp_path / "l.json")
    assert simulated.ledger == str(tmp_path / "run" / "devices" / "device-4" / "ledger.json")


def test_a_ledger_named_by_the_data_path_is_adopted_once(tmp_path, fedser_home):
    # Prepare: a ledger where an older fedser kept it, named by the data folder's path
    data = tmp_path / "recordings"
    key = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:12]
    _v1(fedser_home / f"ledger-{key}.json", [SPEND])
    # Execute
    path = DeviceSettings.from_node_config({"data": str(data)}).ledger
    # Assert: moved to the device's own name, and read (and migrated) with its spend
    assert path == str(DeviceIdentity.load(fedser_home).default_ledger)
    assert not (fedser_home / f"ledger-{key}.json").exists()
    assert PrivacyLedger(path, 8.0, DELTA).epsilon() == pytest.approx(epsilon_of([SPEND], DELTA))


# -- fedser-client status ---------------------------------------------------------------------


def test_status_shows_identity_path_lock_spend_and_hmac(ledger_path, fedser_home, capsys):
    # Prepare
    spent = _two_rounds(ledger_path)
    device_id = DeviceIdentity.load(fedser_home).device_id
    # Execute: once as JSON, once as text while another thread holds the ledger's lock
    assert cli.main(["status", "--ledger", str(ledger_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with PrivacyLedger(ledger_path, 8.0, DELTA).round_lock():
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(30)
    try:
        assert cli.main(["status", "--ledger", str(ledger_path)]) == 0
    finally:
        release.set()
        thread.join(30)
    text = capsys.readouterr().out
    # Assert
    assert shown["device_id"] == device_id and shown["path"] == str(ledger_path)
    assert shown["hmac_verified"] is True and shown["lock_held"] is False
    assert shown["epsilon"] == pytest.approx(spent) and shown["max_epsilon"] == 8.0
    assert device_id in text and str(ledger_path) in text and "held by another" in text
    assert "HMAC              verified" in text and "epsilon spent" in text


def test_status_of_the_default_ledger_refuses_a_deleted_one(fedser_home, capsys):
    # Prepare: this device's own ledger, then gone
    path = DeviceIdentity.load_or_create(fedser_home).default_ledger
    PrivacyLedger(path, 8.0, DELTA).record(SPEND, round=1, model_version=1)
    for p in (path, _backup(path)):
        os.unlink(p)
    # Execute
    code = cli.main(["status"])
    # Assert
    assert code == 2 and "ledger reset --yes" in capsys.readouterr().err
