"""The device privacy ledger: persistence, budget checks, corruption handling, SIGKILL durability."""
from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedser.client.ledger import LedgerCorruptError, PrivacyLedger
from fedser.common.errors import ConfigError, PrivacyBudgetExceeded
from fedser.common.privacy import plan_spend, SpendRecord, epsilon_of

DELTA = 1e-5
SPEND = SpendRecord(1.0, 0.01, 1000)  # epsilon ~2.10 at DELTA


@pytest.fixture
def ledger_path(tmp_path):
    return tmp_path / "device" / "ledger.json"


# -- plan_spend -------------------------------------------------------------------------------


def test_plan_spend_counts_steps_per_epoch_and_sample_rate():
    assert plan_spend(1000, 32, 2, 1.1) == SpendRecord(1.1, 0.032, 64)   # ceil(1000/32) = 32
    assert plan_spend(10, 64, 3, 1.0) == SpendRecord(1.0, 1.0, 3)        # batch larger than data


def test_plan_spend_names_bad_arguments():
    with pytest.raises(ConfigError) as err:
        plan_spend(0, 32, 0, 1.0)
    assert "n=0" in str(err.value) and "epochs=0" in str(err.value)


# -- recording and reading --------------------------------------------------------------------


def test_new_ledger_has_spent_nothing_and_writes_nothing(ledger_path):
    # Execute
    ledger = PrivacyLedger(ledger_path, max_epsilon=8.0, delta=DELTA)
    summary = ledger.summary()
    # Assert
    assert ledger.epsilon() == 0.0
    assert summary["rounds_joined"] == 0 and summary["last_model_version"] is None
    assert not ledger_path.exists()


def test_record_persists_and_a_reopened_ledger_recomputes_epsilon(ledger_path):
    # Prepare
    ledger = PrivacyLedger(ledger_path, max_epsilon=8.0, delta=DELTA)
    # Execute
    ledger.record(SPEND, round=1, model_version="v1")
    ledger.record(SpendRecord(1.2, 0.02, 50), round=2, model_version="v2")
    reopened = PrivacyLedger(ledger_path, max_epsilon=8.0, delta=DELTA)
    # Assert
    expected = epsilon_of([SPEND, SpendRecord(1.2, 0.02, 50)], DELTA)
    assert reopened.epsilon() == pytest.approx(expected)
    assert reopened.epsilon() > epsilon_of([SPEND], DELTA)
    assert reopened.rounds_joined == 2
    assert reopened.last_model_version == "v2"
    assert reopened.steps == 1050


def test_record_leaves_no_temp_files_and_a_matching_backup(ledger_path):
    # Execute
    PrivacyLedger(ledger_path, 8.0, DELTA).record(SPEND, round=1, model_version=3)
    # Assert
    assert sorted(p.name for p in ledger_path.parent.iterdir()) == ["ledger.json", "ledger.json.bak"]
    assert ledger_path.read_text() == ledger_path.with_name("ledger.json.bak").read_text()


def test_summary_reports_spend_against_budget(ledger_path):
    # Prepare
    ledger = PrivacyLedger(ledger_path, max_epsilon=3.0, delta=DELTA)
    ledger.record(SPEND, round=4, model_version="7")
    # Execute
    s = ledger.summary()
    # Assert
    assert s["epsilon"] == pytest.approx(2.10, abs=0.01)
    assert s["max_epsilon"] == 3.0 and s["remaining_epsilon"] == pytest.approx(3.0 - s["epsilon"])
    assert s["delta"] == DELTA and s["rounds_joined"] == 1 and s["last_round"] == 4
    assert s["last_model_version"] == "7" and s["steps"] == 1000 and s["exhausted"] is False
    json.dumps(s)  # the CLI may print it as JSON


def test_two_ledgers_on_one_path_never_drop_each_others_records(ledger_path):
    # Prepare: both opened before either records
    a = PrivacyLedger(ledger_path, 8.0, DELTA)
    b = PrivacyLedger(ledger_path, 8.0, DELTA)
    # Execute
    a.record(SPEND, round=1, model_version="v1")
    b.record(SPEND, round=2, model_version="v2")   # b appends to what a wrote, not to its stale copy
    a.reload()
    # Assert
    assert a.rounds_joined == b.rounds_joined == 2
    assert a.epsilon() == pytest.approx(epsilon_of([SPEND, SPEND], DELTA))


def test_plan_round_spreads_the_budget_left_and_projects_the_spend(ledger_path):
    # Prepare
    ledger = PrivacyLedger(ledger_path, max_epsilon=2.5, delta=DELTA)
    ledger.record(SpendRecord(1.0, 0.01, 500), round=1, model_version=1)
    # Execute: two tasks of 200 and 100 examples, batch 16, 1 epoch, this round and 2 more.
    plan = ledger.plan_round([200, 100], batch_size=16, epochs=1, rounds_left=3)
    # Assert: the spend is per task at the chosen noise, and the whole rest of the run fits.
    assert [(r.sample_rate, r.steps) for r in plan.spend] == [(16 / 200, 13), (16 / 100, 7)]
    assert all(r.noise_multiplier == plan.noise_multiplier for r in plan.spend)
    assert plan.projected_epsilon == pytest.approx(epsilon_of(ledger.history + plan.spend, DELTA))
    rest = [SpendRecord(plan.noise_multiplier, r.sample_rate, 3 * r.steps) for r in plan.spend]
    assert epsilon_of(ledger.history + rest, DELTA) <= 2.5
    assert ledger.rounds_joined == 1  # planning records nothing


def test_plan_round_never_goes_below_the_noise_floor(ledger_path):
    ledger = PrivacyLedger(ledger_path, max_epsilon=50.0, delta=DELTA)
    assert ledger.plan_round([200], 16, 1, 1, floor=3.0).noise_multiplier == 3.0


def test_plan_round_refuses_a_round_the_budget_cannot_afford(ledger_path):
    # Prepare: a device that has spent almost all of its budget.
    ledger = PrivacyLedger(ledger_path, max_epsilon=2.5, delta=DELTA)
    ledger.record(SpendRecord(0.6, 0.5, 200), round=1, model_version=1)
    assert ledger.epsilon() > 2.5
    # Execute / Assert
    with pytest.raises(PrivacyBudgetExceeded, match="budget 2.5"):
        ledger.plan_round([200], 16, 1, 1)
    assert ledger.rounds_joined == 1


def test_record_validates_its_arguments(ledger_path):
    ledger = PrivacyLedger(ledger_path, 8.0, DELTA)
    with pytest.raises(ConfigError, match="SpendRecord"):
        ledger.record((1.0, 0.01, 10), round=1, model_version=1)
    with pytest.raises(ConfigError, match="round='1'"):
        ledger.record(SPEND, round="1", model_version=1)


def test_constructor_names_bad_budget_and_delta(ledger_path):
    with pytest.raises(ConfigError) as err:
        PrivacyLedger(ledger_path, max_epsilon=0.0, delta=2.0)
    assert "max_epsilon=0.0" in str(err.value) and "delta=2.0" in str(err.value)


# -- state_dict -------------------------------------------------------------------------------


def test_state_dict_round_trips_into_a_new_ledger(tmp_path):
    # Prepare
    src = PrivacyLedger(tmp_path / "a.json", 8.0, DELTA)
    src.record(SPEND, round=1, model_version="v1")
    src.record(SpendRecord(2.0, 0.1, 20), round=2, model_version="v2")
    # Execute
    state = json.loads(json.dumps(src.state_dict()))
    dst = PrivacyLedger(tmp_path / "b.json", 8.0, DELTA)
    dst.load_state_dict(state)
    # Assert: loaded and persisted
    assert dst.state_dict() == src.state_dict()
    assert PrivacyLedger(tmp_path / "b.json", 8.0, DELTA).epsilon() == pytest.approx(src.epsilon())


def test_load_state_dict_refuses_to_forget_recorded_spend(tmp_path):
    # Prepare
    ledger = PrivacyLedger(tmp_path / "a.json", 8.0, DELTA)
    ledger.record(SPEND, round=1, model_version="v1")
    empty = PrivacyLedger(tmp_path / "empty.json", 8.0, DELTA).state_dict()
    # Execute / Assert
    with pytest.raises(ConfigError, match="under-count"):
        ledger.load_state_dict(empty)
    assert PrivacyLedger(tmp_path / "a.json", 8.0, DELTA).rounds_joined == 1


# -- damaged files ----------------------------------------------------------------------------


def _two_rounds(path):
    ledger = PrivacyLedger(path, 8.0, DELTA)
    ledger.record(SPEND, round=1, model_version="v1")
    ledger.record(SPEND, round=2, model_version="v2")
    return epsilon_of([SPEND, SPEND], DELTA)


def test_truncated_main_file_falls_back_to_backup_with_a_warning(ledger_path, caplog):
    # Prepare
    spent = _two_rounds(ledger_path)
    text = ledger_path.read_text()
    ledger_path.write_text(text[: len(text) // 2])
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedser.client.ledger"):
        ledger = PrivacyLedger(ledger_path, 8.0, DELTA)
    # Assert: nothing lost, and the user is told
    assert ledger.epsilon() == pytest.approx(spent)
    assert str(ledger_path) in caplog.text and "unreadable" in caplog.text


def test_edited_main_file_fails_its_checksum_and_backup_is_used(ledger_path, caplog):
    # Prepare: lower the recorded steps but keep the JSON valid
    spent = _two_rounds(ledger_path)
    state = json.loads(ledger_path.read_text())
    state["entries"][0]["steps"] = 1
    ledger_path.write_text(json.dumps(state))
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedser.client.ledger"):
        ledger = PrivacyLedger(ledger_path, 8.0, DELTA)
    # Assert
    assert ledger.epsilon() == pytest.approx(spent)
    assert "checksum" in caplog.text


def test_missing_main_file_uses_the_backup(ledger_path, caplog):
    # Prepare
    spent = _two_rounds(ledger_path)
    ledger_path.unlink()
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedser.client.ledger"):
        ledger = PrivacyLedger(ledger_path, 8.0, DELTA)
    # Assert
    assert ledger.epsilon() == pytest.approx(spent)
    assert "missing" in caplog.text


def test_the_copy_with_more_entries_wins(ledger_path):
    # Prepare: a backup that lags one record behind (a kill between the two writes)
    ledger = PrivacyLedger(ledger_path, 8.0, DELTA)
    ledger.record(SPEND, round=1, model_version="v1")
    older = ledger_path.read_text()
    ledger.record(SPEND, round=2, model_version="v2")
    backup = ledger_path.with_name("ledger.json.bak")
    backup.write_text(older)
    # Execute / Assert: lagging backup is ignored; lagging main is not trusted either
    assert PrivacyLedger(ledger_path, 8.0, DELTA).rounds_joined == 2
    newer = ledger_path.read_text()
    ledger_path.write_text(older)
    backup.write_text(newer)
    assert PrivacyLedger(ledger_path, 8.0, DELTA).rounds_joined == 2


@pytest.mark.parametrize("backup", ["corrupt", "missing"])
def test_unreadable_ledger_without_a_good_backup_raises_instead_of_resetting(ledger_path, backup):
    # Prepare
    _two_rounds(ledger_path)
    ledger_path.write_text('{"format": "fedser-privacy-ledger", "entr')
    bak = ledger_path.with_name("ledger.json.bak")
    if backup == "corrupt":
        bak.write_bytes(b"\x00\xff garbage")
    else:
        bak.unlink()
    # Execute
    with pytest.raises(LedgerCorruptError) as err:
        PrivacyLedger(ledger_path, 8.0, DELTA)
    # Assert: names the file, refuses to reset, says how to recover
    msg = str(err.value)
    assert str(ledger_path) in msg and "zero spend" in msg and "Restore" in msg


# -- durability under SIGKILL -----------------------------------------------------------------

_CHILD_ONCE = textwrap.dedent("""
    import os, signal, sys
    from fedser.client.ledger import PrivacyLedger
    from fedser.common.privacy import SpendRecord
    ledger = PrivacyLedger(sys.argv[1], max_epsilon=100.0, delta=1e-5)
    ledger.record(SpendRecord(1.0, 0.01, 1000), round=1, model_version="v1")
    os.kill(os.getpid(), signal.SIGKILL)  # the update would leave now: die before anything else runs
""")

_CHILD_LOOP = textwrap.dedent("""
    import sys
    from fedser.client.ledger import PrivacyLedger
    from fedser.common.privacy import SpendRecord
    ledger = PrivacyLedger(sys.argv[1], max_epsilon=1e9, delta=1e-5)
    for i in range(100000):
        ledger.record(SpendRecord(1.0, 0.01, 10), round=i, model_version=i)
        print(i, flush=True)
""")


def test_spend_survives_sigkill_right_after_record(ledger_path):
    # Execute
    proc = subprocess.run([sys.executable, "-c", _CHILD_ONCE, str(ledger_path)], capture_output=True,
                          timeout=60)
    # Assert
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert PrivacyLedger(ledger_path, 100.0, DELTA).epsilon() >= epsilon_of([SPEND], DELTA)


def test_sigkill_in_the_middle_of_writes_never_loses_an_acknowledged_record(ledger_path):
    # Prepare: a child that records as fast as it can and acknowledges each record on stdout
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_LOOP, str(ledger_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    acknowledged = -1
    deadline = time.monotonic() + 20
    # Execute: kill it at an arbitrary point while it is writing
    while acknowledged < 25 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    # Assert: the ledger opens and holds every record the child had acknowledged
    assert acknowledged >= 25, proc.stderr.read()
    ledger = PrivacyLedger(ledger_path, 1e9, DELTA)
    assert ledger.rounds_joined >= acknowledged + 1
    assert ledger.epsilon() >= epsilon_of([SpendRecord(1.0, 0.01, 10 * (acknowledged + 1))], DELTA)
    assert not math.isinf(ledger.epsilon())
