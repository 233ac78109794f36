"""``fedser partition`` + ``fedser simulate``: the fedser ServerApp and ClientApp on Flower's
Simulation Engine (Ray), one virtual client per speaker partition."""
from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import pytest

from fedser.client.ledger import PrivacyLedger
from fedser.client.device import DeviceSettings
from fedser.common import processes as process_tree
from fedser.common.errors import ConfigError
from fedser.server.checkpoint import load_checkpoint

N_CLIENTS = 6
ROUNDS = 2


def _speakers(manifest: Path) -> set[str]:
    with manifest.open(newline="") as f:
        return {row["speaker"] for row in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.heavy   # two minutes of Ray start-up and rounds: `make test-slow`
def test_simulate_runs_virtual_clients_partitioned_by_speaker(tmp_path, corpus_parts, processes):
    # Prepare: six device folders of whole speakers and a held-out test split.
    parts = tmp_path / "parts"
    fedser = process_tree.executable("fedser")
    done = subprocess.run([fedser, "partition", *sum((["--data", p] for p in corpus_parts), []),
                           "--clients", str(N_CLIENTS), "--test", "0.2", "--out", str(parts)],
                          capture_output=True, text=True, timeout=120, env={**process_tree.flower_env(), **processes.env})
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "run"

    # Execute: 2 rounds on the Simulation Engine, every virtual client training each round,
    # two of them on half-width sub-models, with distributed noise under secure aggregation (the
    # virtual devices keep their keys and shares in their Context between the round's messages),
    # each device masking with its 2 neighbours on SecAgg+'s ring (the complete graph runs over
    # gRPC in tests/e2e/test_federation.py).
    t0 = time.monotonic()
    proc = processes.start("simulate", [fedser, "simulate", "--partitions", str(parts), "--rounds", str(ROUNDS),
                                        "--out", str(run_dir), "--config", "partition-tiers=1.0,1.0,0.5",
                                        "--config", "fraction-evaluate=0.5", "--config", "noise-mode=distributed",
                                        "--config", "secure-aggregation=true",
                                        "--config", "secure-aggregation-neighbours=2"])
    try:
        rc = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fedser simulate still running after 240 s; its log ends:\n"
                    f"{Path(proc.log_path).read_text(errors='replace')[-3000:]}")
    log = Path(proc.log_path).read_text(errors="replace")
    assert rc == 0, log[-4000:]

    # Assert: every round aggregated an update from each virtual client, accounted user-level
    # privacy over N = 6 clients, evaluated on the held-out speakers, and left a model bundle.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = metrics["rounds"]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["clients-used"] == N_CLIENTS and r["clients-rejected"] == 0 for r in rows), rows
    assert all(r["secagg-aborted"] == "" and r["secagg-dropped"] == 0 for r in rows), rows
    # t is 0.6 of a 3-device neighbourhood (2), not of the 6-device cohort (4)
    assert all(r["secagg-threshold"] == 2 for r in rows), rows
    assert metrics["summary"]["user-total_clients"] == N_CLIENTS
    assert rows[-1]["user-epsilon"] > rows[0]["user-epsilon"] > 0
    assert "server-kws-accuracy" in rows[-1] and "server-emotion-uar" in rows[-1]
    assert (run_dir / "model.fedser").exists() and (run_dir / "metrics.csv").exists()
    # Each virtual device kept its own privacy ledger in the run directory, charged by its training.
    for i in range(N_CLIENTS):
        ledger = PrivacyLedger(run_dir / "devices" / f"device-{i}" / "ledger.json", max_epsilon=8.0, delta=1e-5,
                               home=processes.env["FEDSER_HOME"])
        assert 0 < ledger.epsilon() <= 8.0, f"partition {i}: epsilon {ledger.epsilon()}"
    # partition-tiers 1.0,1.0,0.5 taken in turn: two of the six devices ran half-width models.
    profiles = load_checkpoint(run_dir).strategy["profiles"]
    assert sorted(p["tier"] for p in profiles.values()) == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    # A speaker is on one device only, and never in the server's test split.
    device_speakers = [_speakers(parts / f"device-{i}" / "data.csv") for i in range(N_CLIENTS)]
    assert sum(len(s) for s in device_speakers) == len(set().union(*device_speakers))
    assert not set().union(*device_speakers) & _speakers(parts / "test.csv")
    print(f"simulation of {N_CLIENTS} clients x {ROUNDS} rounds: {time.monotonic() - t0:.0f} s")


# ---------------------------------------------------------------- a virtual device's settings

def test_virtual_device_reads_its_partition_from_the_run_config(tmp_path):
    run_config = {"partitions-dir": str(tmp_path / "parts"), "run-dir": str(tmp_path / "run"),
                  "partition-tiers": "1.0,0.5,0.25", "partition-max-epsilon": 3.0}
    s = DeviceSettings.from_node_config({"partition-id": 4, "num-partitions": 6}, run_config)
    assert s.data == str(tmp_path / "parts" / "device-4" / "data.csv")
    assert s.tier == 0.5 and s.max_epsilon == 3.0
    assert s.ledger == str(tmp_path / "run" / "devices" / "device-4" / "ledger.json")


def test_node_config_wins_over_partition_defaults(tmp_path):
    run_config = {"partitions-dir": str(tmp_path / "parts"), "partition-tiers": "0.25"}
    s = DeviceSettings.from_node_config({"partition-id": 0, "data": "/mine.csv", "tier": 1.0}, run_config)
    assert s.data == "/mine.csv" and s.tier == 1.0


def test_virtual_device_without_partitions_dir_is_a_clear_error():
    with pytest.raises(ConfigError, match="partitions-dir"):
        DeviceSettings.from_node_config({"partition-id": 0, "num-partitions": 2}, {"run-dir": "/r"})
    with pytest.raises(ConfigError, match="data is required"):
        DeviceSettings.from_node_config({}, {})
