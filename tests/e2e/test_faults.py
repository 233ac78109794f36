"""Faults of a real federation: a server killed mid-run and resumed, a device that dies mid-round.

Real ``fedser-server start`` (SuperLink over TLS + the ServerApp run) and ``fedser-client start``
(a SuperNode per device) processes on localhost, on the tiny synthesized corpus. A process is
"killed" with SIGKILL together with everything it started, as when its machine loses power.
"""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from fedser.client.ledger import PrivacyLedger
from fedser.common import launch
from fedser.common.certs import generate_ca_and_server_cert
from fedser.common.privacy import UserLevelAccountant
from fedser.server.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

HOST = "127.0.0.1"


def _server_argv(run_dir: Path, port: int, rounds: int, min_clients: int, *extra: str) -> list[str]:
    return [launch.executable("fedser-server"), "start", "--run-dir", str(run_dir), "--host", HOST,
            "--port", str(port), "--certs", str(run_dir / "certs"), "--rounds", str(rounds),
            "--min-clients", str(min_clients), "--config", "local-epochs=1", *extra]


def _device_argv(port: int, manifest: Path, ca: Path, folder: Path, tier: str = "1.0") -> list[str]:
    return [launch.executable("fedser-client"), "start", "--server", f"{HOST}:{port}", "--data", str(manifest),
            "--tier", tier, "--root-cert", str(ca), "--ledger", str(folder / "ledger.json"),
            "--port", str(launch.free_port(HOST)), "--log", str(folder / "supernode.log")]


def _progress(run_dir: Path) -> str:
    path = run_dir / "progress.log"
    return path.read_text() if path.exists() else ""


def _rounds(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


def test_server_killed_mid_run_resumes_without_losing_or_repeating_a_round(processes, device_manifests, tmp_path):
    # Prepare: a server for 3 rounds and two devices.
    run_dir = tmp_path / "run"
    certs = generate_ca_and_server_cert(run_dir / "certs")
    port = launch.free_port(HOST)
    server = processes.start("server", _server_argv(run_dir, port, 3, 2))
    processes.wait_until(lambda: (run_dir / "logs" / "superlink.log").exists(), 60, "the SuperLink", watch=[server])
    devices = [processes.start(f"device-{i}", _device_argv(port, device_manifests.manifests[i], certs.ca_cert,
                                                           tmp_path / f"device-{i}"))
               for i in range(2)]
    processes.wait_until(lambda: "round 1/3 done" in _progress(run_dir), 240, "round 1", watch=[server, *devices])

    # Execute: the server's machine dies (SuperLink, SuperExec, ServerApp and the CLI at once) ...
    killed = processes.kill("server", signal.SIGKILL)
    after_kill = load_checkpoint(run_dir)
    # ... and comes back on the same port with the same certificates and run directory.
    resumed = processes.start("server-resumed", _server_argv(run_dir, port, 3, 2, "--resume"))
    processes.wait_until(lambda: resumed.poll() is not None, 420, "the resumed run to finish", watch=devices)

    # Assert
    out = resumed.log_path.read_text()
    assert killed >= 3, "the SuperLink, SuperExec and ServerApp processes should all have been running"
    assert server.returncode == -signal.SIGKILL
    assert after_kill is not None and after_kill.round == 1
    assert resumed.returncode == 0, out[-4000:]
    assert "resuming after round 1" in _progress(run_dir)
    rows = _rounds(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3], rows
    assert all(r["clients-used"] == 2 for r in rows), rows
    final = load_checkpoint(run_dir)
    assert final.round == 3 and [r["round"] for r in final.rows] == [1, 2, 3]
    accountant = UserLevelAccountant(1.0, 1, 1)
    accountant.load_state_dict(final.accountant)
    assert accountant.rounds == 3, final.accountant
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    assert summary["user-epsilon"] == pytest.approx(accountant.epsilon(summary["user-delta"]))
    assert (run_dir / "model.fedser").is_file()
    for i in range(2):
        ledger = PrivacyLedger(tmp_path / f"device-{i}" / "ledger.json", max_epsilon=8.0, delta=1e-5)
        # Spend is recorded before training: every round the device trained in is on its ledger
        # (a round trained for the killed run and again for the resumed one is counted twice).
        assert {e.round for e in ledger.entries} >= {1, 2, 3}
        assert 0 < ledger.epsilon() <= 8.0


def test_round_completes_without_a_device_that_dies_mid_round(processes, device_manifests, tmp_path):
    # Prepare: three devices, two needed per round.
    run_dir = tmp_path / "run"
    certs = generate_ca_and_server_cert(run_dir / "certs")
    port = launch.free_port(HOST)
    server = processes.start("server", _server_argv(run_dir, port, 1, 2))
    processes.wait_until(lambda: (run_dir / "logs" / "superlink.log").exists(), 60, "the SuperLink", watch=[server])
    devices = [processes.start(f"device-{i}", _device_argv(port, device_manifests.manifests[i], certs.ca_cert,
                                                           tmp_path / f"device-{i}"))
               for i in range(3)]
    doomed_log = tmp_path / "device-2" / "supernode.log"
    processes.wait_until(lambda: doomed_log.exists() and "Receiving: train message" in doomed_log.read_text(),
                         240, "device 2 to receive its training instruction", watch=[server, *devices])

    # Execute: device 2 dies holding its instruction (agent, SuperNode and ClientApp at once).
    processes.kill("device-2", signal.SIGKILL)
    processes.wait_until(lambda: server.poll() is not None, 300, "the run to finish", watch=devices[:2])

    # Assert
    out = server.log_path.read_text()
    assert server.returncode == 0, out[-4000:]
    rows = _rounds(run_dir)
    assert len(rows) == 1
    print(rows[0])
    print(_progress(run_dir))
