"""Ctrl-C and SIGTERM mid-round: the whole process tree goes, nothing is left listening, files stay whole.

Real ``fedser demo``, ``fedser-server start`` and ``fedser-client start`` processes on the tiny
synthesized corpus. Each is signalled while a round is in flight (a device holds its training
instruction), as a terminal's Ctrl-C (SIGINT to the foreground process group) or ``systemctl
stop`` / ``docker stop`` (SIGTERM to the main process) would. Every process a command started
carries the test's tag in its environment, SuperLink, SuperExec, ServerApp, SuperNodes and
ClientApps included, so "nothing left" is checked over all of them, not just the one signalled.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from fedser.client.ledger import PrivacyLedger
from fedser.common import processes as process_tree
from fedser.common.certs import generate_ca_and_server_cert
from fedser.server.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

HOST = "127.0.0.1"
# Seconds from the signal until no process of the tree is left. By design every launcher sends SIGTERM,
# then SIGKILL after 10 s (measured alone: 3-6 s); the margin is for a loaded 2-core CI, where the
# other test worker is extracting features at the same time. What the drills catch is a process
# that never goes.
GONE_WITHIN = 45.0


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_gone(processes, name: str = "") -> float:
    """Seconds until no process tagged ``name`` is alive; fails after ``GONE_WITHIN``."""
    start = time.monotonic()
    while processes.pids(name):
        if time.monotonic() - start > GONE_WITHIN:
            left = processes.pids(name)
            names = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[:2] for p in left
                     if Path(f"/proc/{p}/cmdline").exists()]
            pytest.fail(f"{len(left)} process(es) still alive {GONE_WITHIN:.0f} s after the signal: {names}")
        time.sleep(0.1)
    return time.monotonic() - start


def _assert_ledger_whole(path: Path, home: str | Path) -> None:
    """The ledger at ``path`` reads whole (signed by the device whose fedser home is ``home``)."""
    if not path.exists():
        return
    ledger = PrivacyLedger(path, max_epsilon=8.0, delta=1e-5, home=home)   # raises if unreadable
    assert 0 <= ledger.epsilon() <= 8.0 + 1e-9
    backup = Path(str(path) + ".bak")
    if backup.exists():
        older = PrivacyLedger(backup, max_epsilon=8.0, delta=1e-5, home=home)
        assert len(older.entries) <= len(ledger.entries)


def _train_message_seen(log: Path) -> bool:
    return log.exists() and "Receiving: train message" in log.read_text(errors="replace")


# Heavy: in the default suite on a fresh clone, beside the other worker's tests, the trees were still
# alive 45 s after the signal; alone and in the heavy step they end in 3-6 s. Cause not yet found.
@pytest.mark.heavy
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_signalled_mid_round_leaves_nothing_running(sig, processes, corpus_parts, tmp_path):
    # Prepare: a demo of two devices waiting in round 1.
    out = tmp_path / "demo"
    argv = [process_tree.executable("fedser"), "demo", "--out", str(out), "--clients", "2", "--rounds", "3",
            "--public", "0", "--quiet", "--threads", "1"]
    for part in corpus_parts:
        argv += ["--data", part]
    demo = processes.start("demo", argv)
    processes.wait_until(lambda: any(_train_message_seen(p) for p in (out / "logs").glob("device-*.log")),
                         300, "a device to hold its round-1 instruction", watch=[demo])
    fleet_port = int(re.search(r"on 127\.0\.0\.1:(\d+)", demo.log_path.read_text()).group(1))
    started = len(processes.pids())

    # Execute: Ctrl-C reaches the whole foreground group; SIGTERM only the demo process.
    if sig == signal.SIGINT:
        os.killpg(demo.pid, sig)
    else:
        demo.send_signal(sig)
    seconds = _wait_gone(processes)

    # Assert
    assert started >= 6, "the demo, server, SuperLink and two agents with their SuperNodes were running"
    assert demo.wait(timeout=5) != 0
    assert not _listening(fleet_port)
    for device in (out / "devices").glob("device-*"):
        _assert_ledger_whole(device / "ledger.json", processes.env["FEDSER_HOME"])
    if (out / "checkpoint.pt").exists():
        load_checkpoint(out)
    print(f"\n{signal.Signals(sig).name}: {started} processes gone in {seconds:.1f} s")


@pytest.mark.heavy
def test_agent_and_server_signalled_mid_round_leave_nothing_running(processes, device_manifests, tmp_path):
    # Prepare: a server (2 devices per round) and two agents; round 1 under way.
    run_dir = tmp_path / "run"
    certs = generate_ca_and_server_cert(run_dir / "certs")
    fleet_port, control_port = process_tree.free_port(HOST), process_tree.free_port(HOST)
    server = processes.start("server", [
        process_tree.executable("fedser-server"), "start", "--run-dir", str(run_dir), "--host", HOST, "--port",
        str(fleet_port), "--control-port", str(control_port), "--certs", str(run_dir / "certs"), "--rounds", "3",
        "--min-clients", "2", "--config", "local-epochs=1", "--no-supernode-auth"])
    agents = []
    for i in range(2):
        folder = tmp_path / f"device-{i}"
        agents.append(processes.start(f"device-{i}", [
            process_tree.executable("fedser-client"), "start", "--server", f"{HOST}:{fleet_port}", "--data",
            str(device_manifests.manifests[i]), "--root-cert", str(certs.ca_cert), "--ledger",
            str(folder / "ledger.json"), "--port", str(process_tree.free_port(HOST)), "--log",
            str(folder / "supernode.log"), "--threads", "1"]))
    processes.wait_until(lambda: _train_message_seen(tmp_path / "device-0" / "supernode.log"), 300,
                         "device 0 to hold its round-1 instruction", watch=[server, *agents])
    in_device = len(processes.pids("device-0"))

    # Execute: SIGTERM to the agent (systemctl stop), then Ctrl-C to the server's terminal.
    agents[0].send_signal(signal.SIGTERM)
    agent_s = _wait_gone(processes, "device-0")
    os.killpg(server.pid, signal.SIGINT)
    server_s = _wait_gone(processes, "server")

    # Assert: the agent stopped its SuperNode and ClientApp; the server its SuperLink and ServerApp.
    assert in_device >= 2, "the agent and its SuperNode were running"
    assert agents[0].wait(timeout=5) == 0
    assert server.wait(timeout=5) == 130
    assert not _listening(fleet_port) and not _listening(control_port)
    assert agents[1].poll() is None, "the other device's agent keeps going (its SuperNode retries)"
    _assert_ledger_whole(tmp_path / "device-0" / "ledger.json", processes.env["FEDSER_HOME"])
    if (run_dir / "checkpoint.pt").exists():
        load_checkpoint(run_dir)
    print(f"\nagent gone in {agent_s:.1f} s ({in_device} processes); server gone in {server_s:.1f} s")


@pytest.mark.heavy
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["sigterm"])
def test_testbed_up_signalled_mid_round_leaves_no_service_or_namespace(sig, processes, corpus_parts, tmp_path):
    # Prepare: the namespace runner (root) with a prepared bed of three devices, round 1 under way.
    import subprocess

    from fedser.tools.commands import testbed

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    runner = testbed.deploy_module("netns", deploy)
    why = runner.netns_available()
    if why:
        pytest.skip(f"the test bed needs network namespaces: {why}")

    def namespaces() -> set[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {line.split()[0] for line in listed.splitlines() if line.strip()}

    before = namespaces()
    bed_dir = tmp_path / "bed"
    testbed.prepare(bed_dir, 3, corpus_parts)
    up = processes.start("testbed", [process_tree.executable("fedser"), "testbed", "up", "--testbed", str(bed_dir),
                                     "--runner", "netns", "--rounds", "3", "--compose-dir", str(deploy)])
    processes.wait_until(lambda: _train_message_seen(bed_dir / "netns" / "logs" / "client-1.log"), 300,
                         "client-1 to hold its round-1 instruction", watch=[up])
    made = namespaces() - before
    # The services run in those namespaces with the compose file's environment (no test tag).
    services = {int(pid) for ns in made
                for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()}
    started = len(processes.pids()) + len(services)

    # Execute
    if sig == signal.SIGINT:
        os.killpg(up.pid, sig)
    else:
        up.send_signal(sig)
    seconds = _wait_gone(processes)
    deadline = time.monotonic() + GONE_WITHIN
    while any(Path(f"/proc/{pid}").exists() for pid in services) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in services if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]

    # Assert: every service and the runner are gone, and so are the namespaces it made.
    assert len(made) == 5 and len(services) >= 5, (made, services)   # superlink, serverapp, three devices
    assert not left, left
    assert up.wait(timeout=5) != 0
    assert not made & namespaces(), made & namespaces()
    for i in (1, 2, 3):
        _assert_ledger_whole(bed_dir / f"client-{i}" / "state" / "ledger.json", bed_dir / f"client-{i}" / "state")
    if (bed_dir / "run" / "checkpoint.pt").exists():
        load_checkpoint(bed_dir / "run")
    print(f"\n{signal.Signals(sig).name}: {started} processes of the test bed gone in {seconds:.1f} s")
