"""Fixtures for end-to-end runs of the real federation (SuperLink + SuperNodes over TLS).

* ``federation_corpus``: a very small espeak-ng corpus (5 speakers; 3 emotions, 5 command words),
  synthesized once per session.
* ``device_manifests``: the corpus split by speaker into three device manifests and the
  server's held-out test manifest, exactly as ``fedser demo`` splits it.
* ``processes``: starts fedser's CLIs as subprocesses. Every process carries a tag in its
  environment, which its children (SuperLink, SuperExec, SuperNodes, ClientApps, which run in
  sessions of their own) inherit; teardown kills exactly the processes carrying this test's tag.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedser.common import processes as process_tree

TAG_VAR = "FEDSER_E2E_TAG"


@pytest.fixture(scope="session")
def federation_corpus(tmp_path_factory) -> Path:
    """``<root>/commands`` (Speech Commands layout, 25 clips) and ``<root>/emotion`` (RAVDESS, 15).

    Five speakers: ``fedser demo`` holds one out for its test and sets one apart as public speech,
    and three devices need one each.
    """
    from fedser.tools.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("tiny corpus")
    synthesize_corpus(root, n_speakers=5, emotions=("neutral", "angry", "sad"), statements=1, repetitions=1,
                      command_words=("yes", "no", "up", "down"), command_repetitions=1,
                      unknown_words=("bed",), unknown_repetitions=1, noise_seconds=0.0,
                      workers=2, overwrite=True, progress=False)
    return root


@pytest.fixture(scope="session")
def corpus_parts(federation_corpus) -> list[str]:
    """The ``--data`` arguments of the tiny corpus (both parts)."""
    return [str(federation_corpus / "commands"), str(federation_corpus / "emotion")]


@dataclass(frozen=True)
class Devices:
    manifests: list[Path]     # one data.csv per device (a device is a set of speakers)
    test_csv: Path            # the server's held-out speakers


@pytest.fixture(scope="session")
def device_manifests(tmp_path_factory, corpus_parts) -> Devices:
    from fedser.tools.commands.demo import prepare_devices

    out = tmp_path_factory.mktemp("devices")
    split = prepare_devices(corpus_parts, out, n_clients=3, test=0.2, seed=0)
    return Devices([Path(m) for m in split.devices], Path(split.test))


@pytest.fixture(scope="session")
def fedser_state(tmp_path_factory) -> dict[str, str]:
    """Environment that keeps every fedser and Flower file of the session under a temporary folder.

    The feature cache is shared by all runs of the session, so each utterance is featurised once.
    """
    root = tmp_path_factory.mktemp("fedser state")
    # One torch thread per process: a federation's processes share the machine's cores.
    return {"FEDSER_HOME": str(root / "home"), "FEDSER_CACHE": str(root / "cache"),
            "FLWR_HOME": str(root / "flwr"), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- processes


def _tagged_pids(tag: str, name: str = "") -> list[int]:
    """Live processes whose environment carries ``<tag>/<name>`` (any name when ``name`` is empty)."""
    prefix = f"{TAG_VAR}={tag}/".encode()
    wanted = prefix + name.encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            pid = int(environ.parent.name)
            if pid == os.getpid():
                continue
            entries = environ.read_bytes().split(b"\0")
            if any(e == wanted if name else e.startswith(prefix) for e in entries):
                stat = (environ.parent / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found


@dataclass
class Processes:
    """Start fedser CLIs with a per-test tag; kill them (and their descendants) by tag."""

    root: Path
    env: dict[str, str]
    tag: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:12]}")
    started: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, log: Path | None = None,
              stdout=None) -> subprocess.Popen:
        """Start ``argv`` in its own session with tag ``<tag>/<name>``; output to ``log`` or ``stdout``."""
        env = {**process_tree.flower_env(base=os.environ), **self.env, TAG_VAR: f"{self.tag}/{name}"}
        log = log or self.root / "logs" / f"{name}.out"
        log.parent.mkdir(parents=True, exist_ok=True)
        if stdout is None:
            with log.open("ab") as fh:
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)
        else:
            proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, text=True)
        proc.name = name
        proc.log_path = log
        self.started.append(proc)
        return proc

    def pids(self, name: str = "") -> list[int]:
        """Live processes started as ``name`` (all of this test's when empty), descendants included."""
        return _tagged_pids(self.tag, name)

    def kill(self, name: str = "", sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to every process tagged ``name`` (a machine that loses power); returns how many."""
        pids = self.pids(name)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for proc in self.started:
            if proc.name == name or not name:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        deadline = time.monotonic() + 10
        while self.pids(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        return len(pids)

    def wait_until(self, predicate, timeout: float, what: str, poll: float = 0.5, watch=()):
        """Poll ``predicate`` until it returns a truthy value; fail naming ``what`` after ``timeout`` s.

        Fails at once if one of the ``watch`` processes exits before the condition holds.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            for p in watch:
                if p.poll() is not None:
                    log = Path(p.log_path)
                    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                    pytest.fail(f"{p.name} exited with {p.returncode} while waiting for {what}; its log ends:\n{tail}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(poll)

    def stop_all(self) -> None:
        """SIGTERM what is left (agents stop their SuperNodes), then SIGKILL stragglers."""
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 15
        while any(p.poll() is None for p in self.started) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill("")


@pytest.fixture
def processes(tmp_path, fedser_state):
    procs = Processes(root=tmp_path, env=fedser_state)
    yield procs
    procs.stop_all()


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory, fedser_state):
    """Like ``processes``, for a module-scoped fixture that runs one federation for several tests."""
    procs = Processes(root=tmp_path_factory.mktemp("processes"), env=fedser_state)
    yield procs
    procs.stop_all()
