"""Faults of a real federation: a device that dies mid-round, a server killed mid-run and resumed.

Real ``fedser-server start`` (SuperLink over TLS + the ServerApp run) and ``fedser-client start``
(a SuperNode per device) processes on localhost, on the tiny synthesized corpus. A process is
"killed" with SIGKILL together with everything it started, as when its machine loses power.

Both faults happen in one federation, because each run of it costs minutes on a small machine:
three devices, two needed per round, ``ROUNDS`` rounds. Device 2 dies holding its round-1
training instruction; after round 1 the server dies too and is started again with ``--resume``
on the same port, certificates and run directory; devices 0 and 1 (whose SuperNodes keep
retrying, and keep their node ids in the SuperLink's database) finish the run with it.
"""
from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedser.client.ledger import PrivacyLedger
from fedser.common import processes as process_tree
from fedser.common.certs import generate_ca_and_server_cert
from fedser.common.privacy import UserLevelAccountant
from fedser.server.checkpoint import load_checkpoint

# Heavy (`make test-slow`, CI's second step): one federation of several minutes; the compose test
# bed's drills (also heavy) cut a device and kill the server as well, across hosts.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.heavy,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

HOST = "127.0.0.1"
ROUNDS = 2
# Room for a round counted twice. A device that took round 2 from the server before it was killed
# has recorded that spend (before training: a ledger never under-counts) and trains round 2 again
# for the resumed server. Calibrated to its budget alone, a device plans all of it for the two
# rounds and would rightly decline the repeat, so the scenario would depend on when the kill lands;
# at this server noise floor each round spends little enough for a third.
NOISE_FLOOR = ("--config", "dp-noise-multiplier=3.0")


def _server_argv(run_dir: Path, port: int, rounds: int, min_clients: int, *extra: str) -> list[str]:
    return [process_tree.executable("fedser-server"), "start", "--run-dir", str(run_dir), "--host", HOST,
            "--port", str(port), "--control-port", str(process_tree.free_port(HOST)), "--certs", str(run_dir / "certs"),
            "--rounds", str(rounds),
            "--min-clients", str(min_clients), "--config", "local-epochs=1", "--no-supernode-auth", *extra]


def _device_argv(port: int, manifest: Path, ca: Path, folder: Path, tier: str = "1.0") -> list[str]:
    # --no-prepare: the scenario needs all three devices online before round 1 starts; feature
    # preparation before joining takes each device a different time on a busy machine, so a
    # device that prepares last would join after two others had already started the round.
    return [process_tree.executable("fedser-client"), "start", "--server", f"{HOST}:{port}", "--data", str(manifest),
            "--no-prepare", "--tier", tier, "--root-cert", str(ca), "--ledger", str(folder / "ledger.json"),
            "--port", str(process_tree.free_port(HOST)), "--log", str(folder / "supernode.log")]


def _progress(run_dir: Path) -> str:
    path = run_dir / "progress.log"
    return path.read_text() if path.exists() else ""


def _rounds(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


@dataclass
class FaultyRun:
    root: Path
    run_dir: Path
    checkpoint_round_at_kill: int | None
    killed_server_processes: int
    first_server: object
    resumed_server: object
    device_dirs: list[Path]


@pytest.fixture(scope="module")
def faulty_run(module_processes, device_manifests) -> FaultyRun:
    processes = module_processes
    root = processes.root
    run_dir = root / "run"
    certs = generate_ca_and_server_cert(run_dir / "certs")
    port = process_tree.free_port(HOST)
    device_dirs = [root / f"device-{i}" for i in range(3)]
    try:
        # Prepare: the server, then three devices.
        server = processes.start("server", _server_argv(run_dir, port, ROUNDS, 2, *NOISE_FLOOR))
        processes.wait_until(lambda: (run_dir / "logs" / "superlink.log").exists(), 60, "the SuperLink",
                             watch=[server])
        devices = [processes.start(f"device-{i}", _device_argv(port, device_manifests.manifests[i], certs.ca_cert,
                                                               device_dirs[i]))
                   for i in range(3)]
        doomed_log = device_dirs[2] / "supernode.log"
        processes.wait_until(lambda: doomed_log.exists() and "Receiving: train message" in doomed_log.read_text(),
                             240, "device 2 to receive its round-1 training instruction", watch=[server, *devices])
        # The round starts once two devices are online; device 2 must have been one of its three.
        assert "round 1/%d done" % ROUNDS not in _progress(run_dir), \
            "device 2 joined after round 1 had started (it came online late); the scenario needs it in round 1"

        # Execute: device 2 dies holding its instruction (agent, SuperNode and ClientApp at once) ...
        processes.kill("device-2", signal.SIGKILL)
        processes.wait_until(lambda: "round 1/%d done" % ROUNDS in _progress(run_dir), 300, "round 1",
                             watch=[server, *devices[:2]])
        # ... then the server's machine (fedser-server, SuperLink, SuperExec, ServerApp) ...
        killed = processes.kill("server", signal.SIGKILL)
        at_kill = load_checkpoint(run_dir)
        # ... which comes back on the same port with the same certificates and run directory.
        resumed = processes.start("server-resumed", _server_argv(run_dir, port, ROUNDS, 2, "--resume", *NOISE_FLOOR))
        processes.wait_until(lambda: resumed.poll() is not None, 420, "the resumed run to finish",
                             watch=devices[:2])
        return FaultyRun(root, run_dir, at_kill.round if at_kill else None, killed, server, resumed, device_dirs)
    finally:
        processes.stop_all()


def test_round_completes_without_a_device_that_dies_mid_round(faulty_run):
    # Assert
    first = _rounds(faulty_run.run_dir)[0]
    assert first["round"] == 1
    assert first["clients-sampled"] == 3
    assert first["clients-used"] == 2
    # Once the dead node's heartbeats stop, the SuperLink answers its instruction with a
    # "node unavailable" error (within two heartbeat periods, 60 s), so the round ends without
    # waiting for the round timeout, and the report counts the node as failed.
    assert first["clients-failed"] == 1, first
    assert first["clients-rejected"] == first["clients-declined"] == 0
    assert first["model-version"] == 1


def test_server_killed_mid_run_resumes_without_losing_or_repeating_a_round(faulty_run, fedser_state):
    # Prepare
    run_dir = faulty_run.run_dir
    out = faulty_run.resumed_server.log_path.read_text()

    # Assert: the kill took the whole server down after round 1 was checkpointed.
    assert faulty_run.killed_server_processes >= 3, "fedser-server, the SuperLink and its SuperExec should have died"
    assert faulty_run.first_server.returncode == -signal.SIGKILL
    assert faulty_run.checkpoint_round_at_kill == 1
    # The resumed run went on from round 2 and finished.
    assert faulty_run.resumed_server.returncode == 0, out[-4000:]
    assert "resuming after round 1" in _progress(run_dir)
    rows = _rounds(run_dir)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), rows
    assert all(r["clients-used"] == 2 for r in rows), rows
    assert [r["model-version"] for r in rows] == list(range(1, ROUNDS + 1))
    final = load_checkpoint(run_dir)
    assert final.round == ROUNDS and [r["round"] for r in final.rows] == list(range(1, ROUNDS + 1))
    # The user-level accountant composed exactly one step per round, across the restart.
    accountant = UserLevelAccountant(1.0, 1, 1)
    accountant.load_state_dict(final.accountant)
    assert accountant.rounds == ROUNDS, final.accountant
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    assert summary["rounds"] == ROUNDS
    assert summary["user-epsilon"] == pytest.approx(accountant.epsilon(summary["user-delta"]))
    assert (run_dir / "model.fedser").is_file()
    for device_dir in faulty_run.device_dirs[:2]:
        ledger = PrivacyLedger(device_dir / "ledger.json", max_epsilon=8.0, delta=1e-5,
                               home=fedser_state["FEDSER_HOME"])
        # Spend is recorded before training, so every round the device trained in is on its
        # ledger (one trained for the killed run and again for the resumed run counts twice).
        assert {e.round for e in ledger.entries} >= set(range(1, ROUNDS + 1))
        assert 0 < ledger.epsilon() <= 8.0


def test_terminated_server_stops_its_superlink_and_serverapp(processes, tmp_path):
    # Prepare: a server waiting for devices (the SuperLink, its SuperExec and the ServerApp run
    # in sessions of their own).
    run_dir = tmp_path / "run"
    server = processes.start("server", _server_argv(run_dir, process_tree.free_port(HOST), 1, 2))
    processes.wait_until(lambda: "submitted" in server.log_path.read_text(), 120, "the run to be submitted",
                         watch=[server])
    assert len(processes.pids("server")) >= 3

    # Execute: what `systemctl stop` or `docker stop` does.
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=60)

    # Assert: nothing of the server is left running.
    assert code == 130, server.log_path.read_text()[-3000:]
    processes.wait_until(lambda: not processes.pids("server"), 20, "the SuperLink and ServerApp to exit")
