"""A whole federation on this machine: ``fedser demo`` with three devices over TLS, two rounds,
with its defaults: public pretraining on a share of the speakers, DP fine-tuning on the devices.

``fedser demo`` runs as a subprocess and starts the real parts as separate processes:
``fedser-server start`` (flower-superlink + the ServerApp run) and one ``fedser-client start``
(flower-supernode) per device, on the tiny synthesized corpus. While it runs, a fourth device
that trusts the wrong certificate authority tries to join; it must never get the model.
Every test below reads what that one run left behind.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedser.client.ledger import PrivacyLedger
from fedser.common import processes as process_tree
from fedser.common.bundle import load_bundle
from fedser.common.certs import generate_ca_and_server_cert

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

CLIENTS = 3
ROUNDS = 2
MAX_EPSILON = 8.0
USER_NOISE = 1.0   # both privacy layers on: DP-SGD on devices, distributed user-level noise (secure aggregation)
_LISTENING = re.compile(r"Fleet API \(gRPC, TLS\) on 127\.0\.0\.1:(\d+)")


@dataclass
class DemoRun:
    out: Path
    returncode: int
    stdout: str
    seconds: float
    stranger: subprocess.Popen | None = None
    stranger_dir: Path | None = None
    lines: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def demo_run(module_processes, corpus_parts, device_manifests) -> DemoRun:
    processes = module_processes
    out = processes.root / "run"
    stranger_dir = processes.root / "stranger"
    stranger_ca = generate_ca_and_server_cert(processes.root / "stranger-ca").ca_cert
    argv = [process_tree.executable("fedser"), "demo", *[a for p in corpus_parts for a in ("--data", p)],
            "--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--local-epochs", "1",
            "--max-epsilon", str(MAX_EPSILON), "--user-noise", str(USER_NOISE), "--out", str(out),
            # A few pretraining epochs show the path; the default 60 only cost the suite time.
            "--config", "kws-pretrain-epochs=5"]
    t0 = time.monotonic()
    demo = processes.start("demo", argv, stdout=subprocess.PIPE)
    lines: list[str] = []
    port_seen = threading.Event()
    port: list[int] = []

    def read() -> None:
        for line in demo.stdout:
            lines.append(line)
            found = _LISTENING.search(line)
            if found and not port:
                port.append(int(found.group(1)))
                port_seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stranger = None
    if port_seen.wait(timeout=180):
        # A device that trusts another CA: the agent's first look at the port fails the TLS
        # handshake, and it stops before any SuperNode starts.
        stranger = processes.start("stranger", [
            process_tree.executable("fedser-client"), "start", "--server", f"127.0.0.1:{port[0]}",
            "--data", str(device_manifests.manifests[0]), "--root-cert", str(stranger_ca),
            "--ledger", str(stranger_dir / "ledger.json"), "--port", str(process_tree.free_port()),
            "--log", str(stranger_dir / "supernode.log"), "--max-restarts", "0"])
    try:
        returncode = demo.wait(timeout=540)
    except subprocess.TimeoutExpired:
        processes.kill("demo")
        returncode = demo.wait()
    reader.join(timeout=10)
    if stranger is not None:
        try:
            stranger.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    return DemoRun(out=out, returncode=returncode, stdout="".join(lines), seconds=time.monotonic() - t0,
                   stranger=stranger, stranger_dir=stranger_dir, lines=lines)


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["rounds"]


def test_demo_finishes_and_writes_a_complete_run_directory(demo_run):
    # Prepare
    out = demo_run.out

    # Assert
    assert demo_run.returncode == 0, demo_run.stdout[-4000:]
    print(f"\nfedser demo: {CLIENTS} devices, {ROUNDS} rounds in {demo_run.seconds:.0f} s")
    for name in ("checkpoint.pt", "metrics.csv", "metrics.json", "accuracy.png", "privacy_and_traffic.png",
                 "model.fedser", "report.md", "progress.log"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("accuracy.png", "privacy_and_traffic.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    with open(out / "metrics.csv", newline="") as f:
        assert [int(r["round"]) for r in csv.DictReader(f)] == list(range(1, ROUNDS + 1))
    for r in rows:
        assert (r["clients-sampled"], r["clients-used"]) == (CLIENTS, CLIENTS), r
        assert r["clients-rejected"] == r["clients-declined"] == r["clients-failed"] == 0, r
        assert r["bytes-sent"] > 0 and r["bytes-received"] > 0
        assert 0.0 <= r["server-kws-accuracy"] <= 1.0 and 0.0 <= r["server-emotion-accuracy"] <= 1.0
    assert [r["model-version"] for r in rows] == list(range(1, ROUNDS + 1))
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["rounds"] == ROUNDS
    assert all(r["round-noise-multiplier"] > 0 for r in rows), rows
    # User-level noise in the demo is distributed, so it runs under secure aggregation over the same
    # gRPC links: every round completed its four stages with all devices and revealed only the sum.
    assert all(r["secagg-aborted"] == "" and r["secagg-dropped"] == 0 and r["secagg-threshold"] == 2 for r in rows)
    assert 0 < summary["user-epsilon"] < float("inf") and summary["user-delta"] == pytest.approx(1e-5)
    bundle = load_bundle(out)
    assert bundle.meta["mode"] == "federated" and bundle.meta["rounds"] == ROUNDS
    assert set(bundle.tasks) == {"emotion", "kws"}
    report = (out / "report.md").read_text()
    assert f"{ROUNDS} rounds" in report and "user-level epsilon" in report
    assert "the server sees only the sum of each round's updates" in report
    # By default the server pretrains on the public share of the speakers; the devices fine-tune
    # the whole small model over the frozen encoders, and the report says how accuracy moved.
    assert (out / "devices" / "public.csv").stat().st_size > 0
    assert f"| server pretraining on public speech | {out / 'devices' / 'public.csv'} |" in report
    assert "| what devices trained (train-scope) | all |" in report
    assert "Held-out accuracy over the rounds: kws " in report
    assert "run complete" in (out / "progress.log").read_text()


def test_evaluate_cli_scores_the_federated_model_as_one_json_object(demo_run, corpus_parts, fedser_state):
    # Prepare
    assert demo_run.returncode == 0, demo_run.stdout[-4000:]
    commands = corpus_parts[0]

    # Execute
    done = subprocess.run([process_tree.executable("fedser"), "evaluate", str(demo_run.out), "--data", commands,
                           "--task", "kws", "--json", "--quiet"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, **fedser_state})

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)   # exactly one JSON document on stdout
    assert isinstance(report, dict)
    assert report["task"] == "kws"
    assert report["n"] == 25
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["uar"] <= 1.0


def test_every_device_keeps_a_ledger_of_its_sample_level_spend(demo_run, fedser_state):
    # Prepare
    assert demo_run.returncode == 0, demo_run.stdout[-4000:]
    rows = _rows(demo_run.out)

    # Execute
    ledgers = [PrivacyLedger(demo_run.out / "devices" / f"device-{i}" / "ledger.json",
                             max_epsilon=MAX_EPSILON, delta=1e-5, home=fedser_state["FEDSER_HOME"])
               for i in range(CLIENTS)]

    # Assert: DP was on, each device spent within its budget, every round is on its ledger.
    for ledger in ledgers:
        assert ledger.path.is_file() and ledger.backup_path.is_file()
        assert {e.round for e in ledger.entries} == set(range(1, ROUNDS + 1))
        assert 0.0 < ledger.epsilon() <= MAX_EPSILON
        assert all(e.spend.noise_multiplier > 0 for e in ledger.entries)
    # The server only saw what devices reported, and reports the largest.
    assert rows[-1]["max-device-epsilon"] == pytest.approx(max(x.epsilon() for x in ledgers), rel=1e-6)


def test_a_device_with_the_wrong_root_certificate_never_receives_the_model(demo_run):
    # Prepare
    assert demo_run.returncode == 0, demo_run.stdout[-4000:]
    stranger = demo_run.stranger
    assert stranger is not None, "the demo never said where its SuperLink listens:\n" + demo_run.stdout[-3000:]
    said = stranger.log_path.read_text()

    # Assert: the TLS handshake failed, the agent stopped at once saying why, no SuperNode ran, the
    # device never trained ...
    assert stranger.returncode == 2, said
    assert "does not trust" in said and "--root-cert" in said
    assert not (demo_run.stranger_dir / "supernode.log").exists()
    assert not (demo_run.stranger_dir / "ledger.json").exists()
    # ... and the server never counted a fourth device.
    assert all(r["clients-sampled"] == CLIENTS for r in _rows(demo_run.out))
