"""The compose test bed, run for real: SuperLink, server app and three devices as separate hosts.

The namespace sandbox (``deploy/netns.py``, what ``deploy/netns_runner.py`` runs) starts the
services of ``deploy/docker-compose.yml`` (TLS, SuperNode authentication, non-root users, secrets
and data volumes) each in a network namespace of its own, on a bridge, with the compose file's
commands. One bed serves every drill below, in order,
because a federation costs minutes on a small machine:

1. round 1 runs over TLS with every device; the run volume fills (checkpoint, metrics);
2. devices without a trusted certificate or a registered key are refused, and never get the model;
3. during round 2, client-3's link is cut (the cable pulled): the round completes once the
   SuperLink declares the node gone, whether or not client-3's late reply still makes it in
   (it is counted exactly once, as used or as failed); the link comes back and client-3 rejoins
   in round 3, its ledger intact;
4. during round 3 the server app is killed (every process of it) and started again: it resumes
   after round 2 and finishes; no device's spend is lost or counted twice, and the run volume
   holds the whole run (3 rounds over TLS, the final model, the report).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedser.client.ledger import PrivacyLedger
from fedser.common.certs import generate_ca_and_server_cert, generate_node_keypair
from fedser.tools.commands import testbed
from fedser.common.privacy import UserLevelAccountant
from fedser.server.checkpoint import load_checkpoint

BASE = Path(__file__).resolve().parents[2] / "deploy" / "docker-compose.yml"

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROUNDS = 3
CLIENTS = ("client-1", "client-2", "client-3")
BUDGET = {"client-1": 8.0, "client-2": 8.0, "client-3": 4.0}   # as in the base compose file


@dataclass
class Bed:
    compose: object
    bed: object
    root: Path
    events: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def progress(self) -> str:
        path = self.run_dir / "progress.log"
        return path.read_text() if path.exists() else ""

    def log(self, name: str) -> str:
        path = self.bed.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, predicate, timeout: float, what: str, poll: float = 1.0, watch=("serverapp", "superlink")):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            for name in watch:
                if not self.bed.running(name):
                    pytest.fail(f"{name} exited while waiting for {what}; its log ends:\n{self.bed.log_tail(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; progress:\n{self.progress()}")
            time.sleep(poll)

    def node_status(self, node_id: int) -> str | None:
        """The SuperLink's view of a node (``flwr supernode ls``, asked from inside the server app)."""
        # The connection fedser-server wrote for its own flwr calls.
        argv = ["env", "FLWR_HOME=/var/lib/fedser/run/.flwr", "flwr", "supernode", "ls", "fedser", "--format", "json"]
        done = self.bed.exec("serverapp", argv, timeout=60)
        text = done.stdout
        try:
            nodes = json.loads(text[text.find("{"):]).get("nodes", [])
        except ValueError:
            return None
        return next((str(n.get("status")) for n in nodes if int(n.get("node-id", -1)) == node_id), None)

    def ledger(self, name: str) -> PrivacyLedger:
        state = self.root / name / "state"     # the device container's fedser home
        return PrivacyLedger(state / "ledger.json", max_epsilon=BUDGET[name], delta=1e-5, home=state)


def _skip_reason(netns) -> str | None:
    return netns.netns_available()


@pytest.fixture(scope="module")
def bed(compose, netns, deploy_testbed, tmp_path_factory):
    why = _skip_reason(netns)
    if why:
        pytest.skip(f"test bed needs network namespaces: {why}")
    from fedser.tools.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("testbed")
    corpus = root / "corpus"
    synthesize_corpus(corpus, n_speakers=4, emotions=("neutral", "angry", "sad"), statements=1, repetitions=1,
                      command_words=("yes", "no", "up", "down"), command_repetitions=1, unknown_words=("bed",),
                      unknown_repetitions=1, noise_seconds=0.0, workers=2, overwrite=True, progress=False)
    bed_dir = root / "bed"
    testbed.prepare(bed_dir, 3, [str(corpus / "commands"), str(corpus / "emotion")])
    env = deploy_testbed.compose_env(bed_dir, rounds=ROUNDS, min_clients=3, local_epochs=1)
    started = time.monotonic()
    services = netns.NetnsBed([BASE], root / "netns", env=env)
    try:
        services.up(timeout=180)
        yield Bed(compose, services, bed_dir, {"started": started})
    finally:
        services.down()
        shutil.rmtree(root / "netns" / "roots", ignore_errors=True)
        print(f"\ntest bed: {time.monotonic() - started:.0f} s from start to teardown")


def test_services_are_separate_hosts_with_their_own_addresses(bed):
    # Execute
    seen = {name: bed.bed.exec(name, ["python", "-c", "import socket, os; print(socket.gethostbyname("
                                      "socket.gethostname()), os.getuid(), socket.gethostbyname('superlink'))"])
            for name in ("superlink", "client-1")}

    # Assert: every service has its address; names resolve as on a compose network; nobody is root.
    for name, done in seen.items():
        assert done.returncode == 0, done.stderr
        ip, uid, superlink = done.stdout.split()
        assert ip == bed.bed.ip[name] and superlink == bed.bed.ip["superlink"]
        assert uid == str(testbed.CONTAINER_UID)
    assert len(set(bed.bed.ip.values())) == len(bed.bed.services)


def test_round_one_completes_over_tls_and_fills_the_run_volume(bed):
    # Execute
    bed.wait(lambda: "round 1/%d done" % ROUNDS in bed.progress(), 300, "round 1")
    # Cut client-3 once it holds its round-2 instruction (drill 3 follows on from here).
    bed.wait(lambda: "round 2/%d: training" % ROUNDS in bed.progress(), 60, "round 2 to start")
    bed.wait(lambda: bed.log("client-3").count("Receiving: train message") >= 2, 120,
             "client-3 to receive its round-2 instruction")
    bed.bed.link("client-3", up=False)
    bed.events["cut"] = time.monotonic()

    # Assert: TLS with SuperNode authentication: every device key was registered and is in use.
    server_log = bed.log("serverapp")
    assert "SuperLink at superlink:8000 (TLS)" in server_log
    assert len(re.findall(r"registered device key \d of /run/secrets/supernodes.pub", server_log)) == 3
    assert "--enable-supernode-auth" in " ".join(bed.bed.services["superlink"].command)
    rows = json.loads((bed.run_dir / "metrics.json").read_text())["rounds"]
    assert rows[0]["round"] == 1 and rows[0]["clients-used"] == 3, rows
    assert load_checkpoint(bed.run_dir).round == 1
    for name in ("checkpoint.pt", "metrics.csv", "accuracy.png", "progress.log"):
        assert (bed.run_dir / name).is_file(), name
    # Each device trained on its own data volume and keeps its ledger in its own state volume.
    for name in CLIENTS:
        assert bed.ledger(name).rounds_joined >= 1, name


def test_devices_without_trust_or_a_registered_key_are_refused(bed, tmp_path):
    # Prepare: three intruders, each run as client-1's service (same network, image and data)
    # but with a stranger's CA, no CA at all (system trust store), or an unregistered key.
    stranger = generate_ca_and_server_cert(tmp_path / "stranger").ca_cert
    unknown_key, _ = generate_node_keypair(tmp_path / "keys", "intruder")
    for path in (tmp_path, stranger, unknown_key):   # the services run unprivileged
        path.chmod(0o755 if path.is_dir() else 0o644)
    ca = "/run/secrets/ca.pem"

    def base(port: int) -> list[str]:   # beside client-1's own SuperNode, so another local port
        return ["flower-supernode", "--superlink", "superlink:9092", "--max-wait-time", "10", "--port", str(port)]

    attempts = {
        "wrong CA": base(9201) + ["--root-certificates", str(stranger), "--auth-supernode-private-key",
                                  "/run/secrets/client-1.key"],
        "no CA": base(9202) + ["--auth-supernode-private-key", "/run/secrets/client-1.key"],
        "unregistered key": base(9203) + ["--root-certificates", ca, "--auth-supernode-private-key",
                                          str(unknown_key)],
    }
    exposed = bed.bed.services["client-1"]
    exposed.mounts.append(bed.compose.Mount(str(tmp_path), str(tmp_path), True))

    # Execute
    try:
        with ThreadPoolExecutor(len(attempts)) as pool:
            futures = {what: pool.submit(bed.bed.exec, "client-1", argv, 90) for what, argv in attempts.items()}
            results = {what: f.result() for what, f in futures.items()}
    finally:
        exposed.mounts.pop()

    # Assert: each exits with Flower's connection error and says why; none ever got an instruction.
    for what, done in results.items():
        out = done.stdout + done.stderr
        assert done.returncode not in (0, 124), f"{what}: {out[-2000:]}"
        assert "Exit Code: 305" in out, f"{what}: {out[-2000:]}"
        assert "Receiving:" not in out, what
    assert "CERTIFICATE_VERIFY_FAILED" in results["wrong CA"].stdout + results["wrong CA"].stderr
    assert "CERTIFICATE_VERIFY_FAILED" in results["no CA"].stdout + results["no CA"].stderr
    assert "Failed to activate SuperNode" in results["unregistered key"].stdout + results["unregistered key"].stderr
    # The SuperLink logged the refusal of the unregistered key.
    assert "No SuperNode found with the given public key" in bed.log("superlink")


def test_client_cut_mid_round_is_dropped_then_rejoins_with_its_ledger_intact(bed):
    # Prepare: client-3's link went down holding its round-2 instruction (previous test).
    if "cut" not in bed.events:
        pytest.skip("the two-round test did not reach the cut")
    node_id = int(re.search(r"SuperNode ID: (\d+)", bed.log("client-3")).group(1))

    # Execute: the SuperLink declares the node gone (missed heartbeats); the link comes back.
    bed.wait(lambda: bed.node_status(node_id) not in ("online", None), 150, "the SuperLink to mark client-3 offline",
             poll=5.0)
    bed.bed.link("client-3", up=True)
    bed.events["restored"] = time.monotonic()
    bed.wait(lambda: "round 2/%d done" % ROUNDS in bed.progress(), 300, "round 2")
    bed.wait(lambda: bed.log("client-3").count("Receiving: train message") >= 3, 180,
             "client-3 to rejoin with its round-3 instruction")

    # Assert: round 2 completed without waiting for client-3. Its reply, trained before the cut and
    # sent once the link was back, may or may not beat the round's end: every device is counted
    # exactly once (the two others used; client-3 used or failed, never both), and client-3 is
    # back for round 3.
    rows = json.loads((bed.run_dir / "metrics.json").read_text())["rounds"]
    row = rows[1]
    assert row["round"] == 2 and row["clients-sampled"] == 3, row
    assert row["clients-used"] + row["clients-failed"] + row["clients-rejected"] == 3, row
    assert row["clients-used"] >= 2 and row["clients-rejected"] == 0, row
    ledger = bed.ledger("client-3")
    # Spend is on disk before the update leaves: the round whose reply was lost is still counted
    # (one entry per task the device trained, the same number each round).
    rounds = Counter(e.round for e in ledger.entries)
    assert rounds[1] >= 1 and rounds[2] == rounds[1], rounds
    assert 0 < ledger.epsilon() <= BUDGET["client-3"]
    backup = PrivacyLedger(Path(str(ledger.path) + ".bak"), max_epsilon=BUDGET["client-3"], delta=1e-5,
                           home=ledger.path.parent)
    assert [e.to_dict() for e in backup.entries] == [e.to_dict() for e in ledger.entries]
    print(f"\nlink cut for {bed.events['restored'] - bed.events['cut']:.0f} s")


def test_server_killed_mid_round_resumes_without_losing_or_double_counting_spend(bed):
    # Prepare
    if "restored" not in bed.events:
        pytest.skip("the link drill did not complete")
    bed.wait(lambda: all(bed.log(c).count("Receiving: train message") >= 3 for c in CLIENTS),
             180, "round-3 instructions to reach every device")

    # Execute: every process of the server app dies at once, then the service starts again.
    killed = bed.bed.kill("serverapp")
    at_kill = load_checkpoint(bed.run_dir).round
    bed.bed.start("serverapp")
    code = bed.bed.wait("serverapp", timeout=420)

    # Assert: resumed after the last complete round and finished the run.
    assert killed >= 3, "fedser-server, its SuperExec and the ServerApp should have died"
    assert at_kill == 2
    assert code == 0, bed.bed.log_tail("serverapp", 60)
    assert "resuming after round 2" in bed.progress()
    rows = json.loads((bed.run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[2]["clients-used"] == 3, rows[2]
    final = load_checkpoint(bed.run_dir)
    accountant = UserLevelAccountant(1.0, 1, 1)
    accountant.load_state_dict(final.accountant)
    assert final.round == ROUNDS and accountant.rounds == ROUNDS, "the server's accountant composed one step a round"
    assert (bed.run_dir / "model.fedser").is_file()
    # Each device recorded exactly the trainings it did (one entry per task it trains): every
    # training it replied to, round 3 once or twice (a round-3 instruction of the killed run is
    # trained only if it reached the device before the run died), never fewer.
    for name in CLIENTS:
        ledger = bed.ledger(name)
        rounds = Counter(e.round for e in ledger.entries)
        per_training = rounds[1]
        trainings = bed.log(name).count("Sending: train message")
        assert per_training >= 1 and len(ledger.entries) == per_training * trainings, (name, rounds, trainings)
        assert rounds[2] == per_training and per_training <= rounds[3] <= 2 * per_training, (name, rounds)
        assert 0 < ledger.epsilon() <= BUDGET[name] + 1e-9


def test_report_is_left_in_the_run_volume(bed):
    # Prepare
    if not (bed.run_dir / "metrics.json").is_file():
        pytest.skip("no run to report on")

    # Execute: what `fedser testbed up` does once the server app has exited.
    from fedser.tools.commands.demo import report

    (bed.run_dir / "report.md").write_text(report(bed.run_dir) + "\n")

    # Assert
    text = (bed.run_dir / "report.md").read_text()
    assert f"{ROUNDS} rounds" in text and "user-level epsilon" in text
    for name in ("checkpoint.pt", "metrics.json", "metrics.csv", "model.fedser", "accuracy.png"):
        assert (bed.run_dir / name).is_file(), name
